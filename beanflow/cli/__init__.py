"""The ``beanflow`` command line: it parses arguments and reports errors; the work is done by
the library (``deployment.run_deployment``, ``BeanQueue``, ``spec``)."""

from __future__ import annotations

import datetime
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import click
from psycopg2 import errors as pg_errors
from sqlalchemy import exc, func

from .. import spec
from ..app import BeanQueue
from ..config import import_object, parse_duration
from ..deployment import Deployment, run_deployment, run_worker
from ..errors import BeanflowError, SpecError, TablesMissing, first_line
from ..models import TaskState
from ..models.jsonb import parse_json
from ..models.task import as_due_time
from ..ops import TASKS_FAILED, TASKS_PENDING, Operations, database_now, report_burst

logger = logging.getLogger("beanflow")


def fail(message: str, status: int = 2) -> NoReturn:
    """Print a one-line error and exit (2 for bad input, 1 for a failure at run time)."""
    click.echo(f"Error: {message}", err=True)
    sys.exit(status)


class Commands(click.Group):
    """The command group, and the one place where errors become messages and exit statuses:
    a bad file lists its problems (status 1), any other BeanflowError is one ``Error:`` line
    (status 2), a database that cannot be used or lacks the tables is one line (status 1)."""

    def invoke(self, context: click.Context) -> Any:
        try:
            return super().invoke(context)
        except SpecError as error:
            for problem in error.problems:
                click.echo(str(problem), err=True)
            where = error.problems[0].file if error.problems else "the file"
            click.echo(f"{where}: {len(error.problems)} problem(s)", err=True)
            sys.exit(1)
        except BeanflowError as error:
            fail(str(error), 1 if isinstance(error, TablesMissing) else 2)
        except exc.ProgrammingError as error:
            if not isinstance(error.orig, pg_errors.UndefinedTable):
                raise
            fail(str(TablesMissing(_create_tables_command(context))), 1)
        except exc.OperationalError as error:
            fail(f"cannot use the database: {first_line(error.orig or error)}", 1)


def _create_tables_command(context: click.Context) -> str:
    """The command that creates the tables where this one looked for them."""
    if context.meta.get("config_file"):
        return f"beanflow create-tables --config {context.meta['config_file']}"
    if context.params.get("app_path"):
        return f"beanflow -a {context.params['app_path']} create-tables"
    return "beanflow create-tables"


def load_app(path: str | None) -> BeanQueue:
    """The BeanQueue named by ``path`` (``package.module.app`` or ``package.module:app``), or
    one configured from BEANFLOW_* environment variables."""
    if path is None:
        return BeanQueue()
    try:
        app = import_object(path)
    except ImportError as error:
        fail(f"--app {path!r} cannot be loaded: {error}")
    if not isinstance(app, BeanQueue):
        fail(f"--app {path!r} is a {type(app).__name__}, not a BeanQueue")
    return app


def load_deployment(path: str) -> Deployment:
    """The deployment a file declares (its problems are reported by ``Commands``)."""
    click.get_current_context().meta["config_file"] = path
    return spec.load(path)


DEFAULT_FILE = "beanflow.yaml"


def deployment_or_app(config_file: str | None) -> tuple[BeanQueue, Deployment | None]:
    """The file given, else ./beanflow.yaml if it exists (and no ``-a`` was given), else the
    app of ``-a`` or of the BEANFLOW_* settings."""
    context = click.get_current_context()
    root = context.find_root()
    if config_file is None and root.params.get("app_path") is None and Path(DEFAULT_FILE).is_file():
        config_file = DEFAULT_FILE
    if config_file is not None:
        deployment = load_deployment(config_file)
        return deployment.app, deployment
    return root.obj(), None


class JsonFormatter(logging.Formatter):
    """One JSON object per log line, for machines, with the task's fields when the line is
    about a task."""

    FIELDS = (
        "task_id",
        "processor",
        "channel",
        "attempt",
        "state",
        "duration_ms",
        "worker",
        "summary",
    )

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}",
            "level": record.levelname,
            "logger": record.name,
            "pid": record.process,
            "message": record.getMessage(),
        }
        entry |= {key: getattr(record, key) for key in self.FIELDS if hasattr(record, key)}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


@click.group(cls=Commands)
@click.option(
    "-a",
    "--app",
    "app_path",
    metavar="MODULE.APP",
    help="The BeanQueue object to use (default: configured from BEANFLOW_* vars).",
)
@click.option(
    "--log-level",
    default="INFO",
    show_default=True,
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
    help="INFO: workers starting and stopping, failures, retries, a summary a minute; "
    "DEBUG: also each task's start and finish, each claim and commit.",
)
@click.option(
    "--log-format", default="text", show_default=True, type=click.Choice(["text", "json"])
)
@click.pass_context
def main(context: click.Context, app_path: str | None, log_level: str, log_format: str) -> None:
    """beanflow: a PostgreSQL task queue and workflow runner."""
    handler = logging.StreamHandler()
    handler.setFormatter(
        JsonFormatter()
        if log_format == "json"
        else logging.Formatter("%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s")
    )
    logging.basicConfig(level=log_level.upper(), handlers=[handler])
    # as `python -m` does: the project in the current folder is importable (`-a`, packages)
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    context.obj = lambda: load_app(app_path)
    context.meta["log"] = ["--log-level", log_level, "--log-format", log_format]


@main.command("create-tables")
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False),
    help="Use the database of this beanflow.yaml.",
)
@click.pass_obj
def create_tables(make_app: Callable[[], BeanQueue], config_file: str | None) -> None:
    """Create beanflow's tables in the configured database (idempotent)."""
    (load_deployment(config_file).app if config_file else make_app()).create_tables()
    click.echo("tables created")


# the reference spells it with an underscore
main.add_command(create_tables, "create_tables")


FAIL_ON_PENDING = click.option(
    "--fail-on-pending",
    is_flag=True,
    help=f"With --burst: exit with status {TASKS_PENDING} when tasks are still pending.",
)


@main.command()
@click.argument("channels", nargs=-1, required=True)
@click.option(
    "--burst",
    is_flag=True,
    help=f"Exit once no task is due, with a summary (status {TASKS_FAILED} if a task failed).",
)
@FAIL_ON_PENDING
@click.pass_obj
def process(
    make_app: Callable[[], BeanQueue],
    channels: tuple[str, ...],
    burst: bool,
    fail_on_pending: bool,
) -> None:
    """Run a worker on CHANNELS until SIGTERM or SIGINT."""
    app = make_app()
    started = database_now(app) if burst else None
    status = app.process_tasks(channels, burst=burst)
    if started is not None and status == 0:
        status = report_burst(app, channels, started, fail_on_pending)
    sys.exit(status)


@main.command()
@click.argument("channel")
@click.argument("names", nargs=-1, required=True, metavar="[MODULE] NAME")
@click.option(
    "-k",
    "--kwargs",
    "kwargs_json",
    default="{}",
    show_default=True,
    help="The task's arguments as a JSON object.",
)
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False),
    help="A beanflow.yaml declaring the processor NAME (default: ./beanflow.yaml if present).",
)
@click.option("--at", "at", help="Run at this ISO 8601 time (local time unless it has an offset).")
@click.option("--in", "delay", help="Run after this duration (30s, 5m, 1h).")
@click.option(
    "--wait",
    is_flag=True,
    help=f"Wait for the task to end (on LISTEN): print its result, or its failure and exit "
    f"with status {TASKS_FAILED}.",
)
@click.option("--timeout", help=f"With --wait: give up after this long (status {TASKS_PENDING}).")
def submit(
    channel: str,
    names: tuple[str, ...],
    kwargs_json: str,
    config_file: str | None,
    at: str | None,
    delay: str | None,
    wait: bool,
    timeout: str | None,
) -> None:
    """Enqueue a task for the processor NAME of CHANNEL; prints the task's id."""
    if len(names) > 2:
        fail(f"expected [MODULE] NAME after the channel, got {' '.join(names)!r}")
    if at is not None and delay is not None:
        fail("give --at or --in, not both")
    try:
        kwargs = parse_json(kwargs_json)
    except ValueError as error:
        fail(f"--kwargs is not valid JSON: {error}")
    try:
        scheduled_at = _when(at, delay)
    except ValueError as error:
        fail(str(error))
    if not isinstance(kwargs, dict):
        fail(f"--kwargs must be a JSON object, got {type(kwargs).__name__}")
    app, deployment = deployment_or_app(config_file)
    name = ":".join(names)
    processor = (deployment or app).resolve(channel, name)
    task = processor.run(**kwargs)
    if scheduled_at is not None:
        task.scheduled_at = scheduled_at
    try:
        seconds = None if timeout is None else parse_duration(timeout)
    except ValueError as error:
        fail(f"--timeout: {error}")
    ops = Operations(app)
    with app.session_factory() as session:
        session.add(task)
        if wait:
            ops.watch(session, task.id)
        session.commit()
        click.echo(str(task.id))
        task_id = task.id
    if wait:
        sys.exit(_report_end(ops.wait(task_id, seconds), seconds))


def _report_end(task: Any, timeout: float | None) -> int:
    """Print how a waited-for task ended; returns the exit status."""
    if task is None:
        click.echo(f"still not ended after {timeout:g}s", err=True)
        return TASKS_PENDING
    if task.state == TaskState.DONE:
        click.echo(json.dumps(task.result))
        return 0
    click.echo(f"{TaskState(task.state).value}: {task.error_message}", err=True)
    return TASKS_FAILED


def _when(at: str | None, delay: str | None) -> Any:
    if at is not None:
        try:
            moment = datetime.datetime.fromisoformat(at)
        except ValueError:
            raise ValueError(
                f"--at {at!r} is not an ISO 8601 time such as 2026-12-01T09:30:00+01:00"
            ) from None
        due = as_due_time(moment)
        if due is None:
            raise ValueError(f"--at {at!r} is out of range (years 1 to 9999, in UTC)")
        return due
    if delay is not None:
        try:
            return func.now() + datetime.timedelta(seconds=parse_duration(delay))
        except ValueError as error:
            raise ValueError(f"--in: {error}") from None
    return None


@main.command()
@click.argument("file", default="beanflow.yaml", type=click.Path(dir_okay=False))
def validate(file: str) -> None:
    """Check FILE (default beanflow.yaml): every problem as FILE:LINE:COL: key: message."""
    click.echo(spec.describe(spec.load(file, default=False), file))


@main.command()
@click.argument("file", default="beanflow.yaml", type=click.Path(dir_okay=False))
@click.option("--create-tables", is_flag=True, help="Create beanflow's tables if missing.")
@click.option(
    "--burst",
    is_flag=True,
    help=f"Process until no task is due, then exit with a summary (status {TASKS_FAILED} if a "
    "task failed).",
)
@FAIL_ON_PENDING
@click.option(
    "--metrics-port",
    type=click.IntRange(1, 65535),
    help="Serve /metrics (Prometheus) and /healthz on this port (over the file's metrics:).",
)
@click.option("--worker-channel", hidden=True)
@click.pass_context
def run(
    context: click.Context,
    file: str,
    create_tables: bool,
    burst: bool,
    fail_on_pending: bool,
    metrics_port: int | None,
    worker_channel: str | None,
) -> None:
    """Run what FILE declares: worker processes per channel and the cron schedules."""
    deployment = load_deployment(file)
    if worker_channel is not None:  # a worker process started by run_deployment
        sys.exit(run_worker(deployment, worker_channel, burst=burst))
    log_arguments = context.meta["log"]
    sys.exit(
        run_deployment(
            deployment,
            burst=burst,
            create_tables=create_tables,
            log_arguments=log_arguments,
            fail_on_pending=fail_on_pending,
            metrics_port=metrics_port,
        )
    )


from . import operations, workflows  # noqa: E402, F401 - registers their commands

if __name__ == "__main__":
    main()

"""The ``beanflow`` command line."""

from __future__ import annotations

import datetime
import json
import logging
import os
import sys
from collections.abc import Callable
from typing import Any, NoReturn

import click
from sqlalchemy import exc, func, inspect

from . import db, spec
from .app import BeanQueue
from .config import ConfigError, import_object
from .engine.pool import ChannelPlan, Supervisor
from .engine.queries import Queries
from .engine.schedules import Scheduler
from .spec.compile import seconds

# how a supervisor hands the resolved database URL to its workers (not on the command line,
# where `ps` would show its password)
WORKER_DATABASE_URL = "BEANFLOW_RUN_DATABASE_URL"

logger = logging.getLogger("beanflow")


def fail(message: str, status: int = 2) -> NoReturn:
    """Print a one-line error and exit (2 for bad input, 1 for a failure at run time)."""
    click.echo(f"Error: {message}", err=True)
    sys.exit(status)


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


def guarded(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn the errors a user can cause into one-line messages."""

    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except ConfigError as error:
            fail(str(error))
        except exc.OperationalError as error:
            fail(f"cannot use the database: {str(error.orig).strip().splitlines()[0]}", 1)

    run.__name__ = command.__name__
    run.__doc__ = command.__doc__
    return run


class JsonFormatter(logging.Formatter):
    """One JSON object per log line, for machines."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}",
            "level": record.levelname,
            "logger": record.name,
            "pid": record.process,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


@click.group()
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
    context.obj = lambda: guarded(load_app)(app_path)
    context.meta["log"] = ["--log-level", log_level, "--log-format", log_format]


def load_spec(path: str) -> BeanQueue:
    """The application a spec file declares, or exit 1 after printing its problems."""
    try:
        return spec.load(path)
    except spec.SpecError as error:
        for problem in error.problems:
            click.echo(str(problem), err=True)
        click.echo(f"{path}: {len(error.problems)} problem(s)", err=True)
        sys.exit(1)


@main.command("create-tables")
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False),
    help="Use the database of this beanflow.yaml.",
)
@click.pass_obj
@guarded
def create_tables(make_app: Callable[[], BeanQueue], config_file: str | None) -> None:
    """Create beanflow's tables in the configured database (idempotent)."""
    (load_spec(config_file) if config_file else make_app()).create_tables()
    click.echo("tables created")


# the reference spells it with an underscore
main.add_command(create_tables, "create_tables")


@main.command()
@click.argument("channels", nargs=-1, required=True)
@click.option("--burst", is_flag=True, help="Exit once no task is due.")
@click.pass_obj
@guarded
def process(make_app: Callable[[], BeanQueue], channels: tuple[str, ...], burst: bool) -> None:
    """Run a worker on CHANNELS until SIGTERM or SIGINT."""
    app = make_app()
    try:
        status = app.process_tasks(channels, burst=burst)
    except LookupError as error:
        fail(str(error))
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
    help="A beanflow.yaml declaring the processor NAME.",
)
@click.option("--at", "at", help="Run at this ISO 8601 time (local time unless it has an offset).")
@click.option("--in", "delay", help="Run after this duration (30s, 5m, 1h).")
@click.pass_obj
@guarded
def submit(
    make_app: Callable[[], BeanQueue],
    channel: str,
    names: tuple[str, ...],
    kwargs_json: str,
    config_file: str | None,
    at: str | None,
    delay: str | None,
) -> None:
    """Enqueue a task for the processor NAME of CHANNEL; prints the task's id."""
    if len(names) > 2:
        fail(f"expected [MODULE] NAME after the channel, got {' '.join(names)!r}")
    if at is not None and delay is not None:
        fail("give --at or --in, not both")
    try:
        kwargs = json.loads(kwargs_json)
    except ValueError as error:
        fail(f"--kwargs is not valid JSON: {error}")
    try:
        scheduled_at = _when(at, delay)
    except ValueError as error:
        fail(str(error))
    app = load_spec(config_file) if config_file else make_app()
    try:
        if not isinstance(kwargs, dict):
            raise ValueError(f"--kwargs must be a JSON object, got {type(kwargs).__name__}")
        task = app.resolve(channel, ":".join(names)).run(**kwargs)
    except (LookupError, ValueError) as error:
        fail(str(error))
    if scheduled_at is not None:
        task.scheduled_at = scheduled_at
    with app.session_factory() as session:
        session.add(task)
        session.commit()
        click.echo(str(task.id))


def _when(at: str | None, delay: str | None) -> Any:
    if at is not None:
        try:
            moment = datetime.datetime.fromisoformat(at)
        except ValueError:
            raise ValueError(
                f"--at {at!r} is not an ISO 8601 time such as 2026-12-01T09:30:00+01:00"
            ) from None
        return moment if moment.tzinfo else moment.astimezone()
    if delay is not None:
        try:
            return func.now() + datetime.timedelta(seconds=seconds(delay))
        except ValueError as error:
            raise ValueError(f"--in: {error}") from None
    return None


@main.command()
@click.argument("file", default="beanflow.yaml", type=click.Path(dir_okay=False))
def validate(file: str) -> None:
    """Check FILE (default beanflow.yaml): every problem as FILE:LINE:COL: key: message."""
    app = load_spec(file)
    click.echo(spec.describe(app, file))


@main.command()
@click.argument("file", default="beanflow.yaml", type=click.Path(dir_okay=False))
@click.option("--create-tables", is_flag=True, help="Create beanflow's tables if missing.")
@click.option("--burst", is_flag=True, help="Process until no task is due, then exit.")
@click.option("--worker-channel", hidden=True)
@click.pass_context
@guarded
def run(
    context: click.Context, file: str, create_tables: bool, burst: bool, worker_channel: str | None
) -> None:
    """Run what FILE declares: worker processes per channel and the cron schedules."""
    app = load_spec(file)
    if worker_channel is not None:  # a worker process started by the supervisor below
        app.config.DATABASE_URL = os.environ[WORKER_DATABASE_URL]
        plan = next(p for p in app.pool if p.channel == worker_channel)
        app.config.BATCH_SIZE = plan.batch_size or app.config.BATCH_SIZE
        app.config.POLL_TIMEOUT = plan.poll_timeout or app.config.POLL_TIMEOUT
        sys.exit(app.process_tasks([worker_channel], burst=burst))

    # resolved once (this may start the embedded server), then handed to the workers
    app.config.DATABASE_URL = os.environ[WORKER_DATABASE_URL] = db.database_url(app.config)
    if create_tables:
        app.create_tables()
    elif not inspect(app.engine).has_table(app.task_model.__tablename__):
        fail(
            "beanflow's tables do not exist in this database; run again with "
            "--create-tables, or run `beanflow create-tables`",
            1,
        )
    log = context.meta["log"]

    def command(plan: ChannelPlan) -> list[str]:
        return [
            sys.executable,
            "-m",
            "beanflow",
            *log,
            "run",
            file,
            "--worker-channel",
            plan.channel,
            *(["--burst"] if burst else []),
        ]

    plans = [plan for plan in app.pool if plan.workers > 0]
    scheduler = Scheduler(app, app.schedules) if app.schedules else None
    queries = Queries(app.task_model, app.worker_model, app.event_model)

    def due_channels() -> set[str]:
        with app.engine.connect() as connection:
            rows = connection.execute(
                queries.due_channels, {"channels": [plan.channel for plan in plans]}
            )
            return {row.channel for row in rows}

    supervisor = Supervisor(
        plans,
        command,
        scheduler,
        grace_period=app.config.SHUTDOWN_GRACE_PERIOD,
        burst=burst,
        due_channels=due_channels,
    )
    sys.exit(supervisor.run())


if __name__ == "__main__":
    main()

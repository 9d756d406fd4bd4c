"""The ``beanflow`` command line."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from typing import Any, NoReturn

import click
from sqlalchemy import exc

from .app import BeanQueue
from .config import ConfigError, import_object

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
@click.pass_context
def main(context: click.Context, app_path: str | None, log_level: str) -> None:
    """beanflow: a PostgreSQL task queue."""
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    context.obj = lambda: guarded(load_app)(app_path)


@main.command("create-tables")
@click.pass_obj
@guarded
def create_tables(make_app: Callable[[], BeanQueue]) -> None:
    """Create beanflow's tables in the configured database (idempotent)."""
    make_app().create_tables()
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
@click.pass_obj
@guarded
def submit(
    make_app: Callable[[], BeanQueue], channel: str, names: tuple[str, ...], kwargs_json: str
) -> None:
    """Enqueue a task for the processor NAME of CHANNEL; prints the task's id."""
    if len(names) > 2:
        fail(f"expected [MODULE] NAME after the channel, got {' '.join(names)!r}")
    name = ":".join(names)
    try:
        kwargs = json.loads(kwargs_json)
    except ValueError as error:
        fail(f"--kwargs is not valid JSON: {error}")
    app = make_app()
    try:
        if not isinstance(kwargs, dict):
            raise ValueError(f"--kwargs must be a JSON object, got {type(kwargs).__name__}")
        task = app.resolve(channel, name).run(**kwargs)
    except (LookupError, ValueError) as error:
        fail(str(error))
    with app.session_factory() as session:
        session.add(task)
        session.commit()
        click.echo(str(task.id))


if __name__ == "__main__":
    main()

"""The operations' commands: status, tasks, task, retry, cancel, purge, db. Each reads
``./beanflow.yaml`` when present (``--config`` to choose another; ``-a`` or BEANFLOW_*
settings otherwise) and goes through ``beanflow.ops``; tables are drawn with rich (plain when
stdout is not a terminal), ``--json`` prints data instead."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import click
from rich.console import Console
from rich.progress import Progress
from rich.table import Table
from sqlalchemy import inspect
from sqlalchemy.engine import make_url

from .. import db
from ..config import parse_duration
from ..dashboard import TOKEN_ENV, DashboardSettings, serve
from ..models import FINAL_STATES, EventType, TaskState, WorkerState
from ..ops import Operations, Retention, TaskFilter, format_age, operator, parse_moment
from . import DEFAULT_FILE, deployment_or_app, fail, main

config_option = click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False),
    help=f"The beanflow.yaml to use (default: ./{DEFAULT_FILE} when it exists).",
)
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON.")


def operations(config_file: str | None) -> Operations:
    app, deployment = deployment_or_app(config_file)
    return Operations(app, deployment.schedules if deployment else ())


def console() -> Console:
    """Colours and the terminal's width on a terminal; plain and 160 columns otherwise."""
    return Console(highlight=False, width=None if sys.stdout.isatty() else 160)


def _when(moment: datetime | None) -> str:
    return "-" if moment is None else moment.astimezone().strftime("%Y-%m-%d %H:%M:%S")


STATE_STYLES = {
    "PENDING": "cyan",
    "PROCESSING": "yellow",
    "DONE": "green",
    "FAILED": "bold red",
    "CANCELLED": "magenta",
}


def _state(state: Any) -> str:
    value = TaskState(state).value
    return f"[{STATE_STYLES[value]}]{value}[/]"


def task_data(task: Any) -> dict[str, Any]:
    """A task as JSON-ready data (its result only when loaded)."""
    data = {
        column.key: getattr(task, column.key)
        for column in inspect(type(task)).column_attrs
        if column.key in task.__dict__ or column.key != "result"
    }
    return json.loads(json.dumps(data, default=str))


def _print_json(data: Any) -> None:
    click.echo(json.dumps(data, default=str, indent=2))


def _since(text: str | None, option: str) -> datetime | None:
    """An ISO time, or a duration back from now (``1h``)."""
    if text is None:
        return None
    try:
        return parse_moment(text)
    except ValueError as error:
        fail(f"{option} {error}")


def _ids(values: tuple[str, ...]) -> list[uuid.UUID]:
    ids = []
    for value in values:
        try:
            ids.append(uuid.UUID(value))
        except ValueError:
            fail(f"{value!r} is not a task id")
    return ids


def filter_options(function: Callable[..., Any]) -> Callable[..., Any]:
    """The task filters shared by ``tasks`` and ``retry``."""
    options = [
        click.option("--channel", help="Only this channel."),
        click.option("--processor", help="Only this processor (NAME or MODULE:NAME)."),
        click.option("--since", help="Created at or after (30m, 1h, 7d, or an ISO time)."),
        click.option("--until", help="Created before (a duration back, or an ISO time)."),
        click.option("--parent", help="Only the children of this task."),
        click.option("--error", "error_text", help="Text in the error message."),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def make_filter(state: str | None, **given: Any) -> TaskFilter:
    return TaskFilter(
        state=TaskState(state.upper()) if state else None,
        channel=given.get("channel"),
        processor=given.get("processor"),
        since=_since(given.get("since"), "--since"),
        until=_since(given.get("until"), "--until"),
        parent=_ids((given["parent"],))[0] if given.get("parent") else None,
        error=given.get("error_text"),
    )


STATE_CHOICE = click.Choice([s.value for s in TaskState], case_sensitive=False)


@main.command()
@config_option
@json_option
def status(config_file: str | None, as_json: bool) -> None:
    """The queue at a glance: each channel's counts, the workers, the schedules."""
    ops = operations(config_file)
    with ops.app.session_factory() as session:
        counts, workers, schedules = (
            ops.counts(session),
            ops.workers(session, gone=5),
            ops.schedules(session),
        )
    if as_json:
        _print_json(
            {
                "channels": [dataclasses.asdict(c) for c in counts],
                "workers": [
                    {
                        "id": w.worker.id,
                        "name": w.worker.name,
                        "pid": w.worker.pid,
                        "state": w.worker.state,
                        "alive": w.alive,
                        "heartbeat_age": w.heartbeat_age.total_seconds(),
                        "channels": w.worker.channels,
                        "running": [t.id for t in w.running],
                    }
                    for w in workers
                ],
                "schedules": [
                    {
                        "name": s.schedule.name,
                        "cron": s.schedule.cron,
                        "timezone": s.schedule.timezone,
                        "next_tick": s.next_tick,
                        "last_tick": s.last_tick,
                        "last_task": s.last_task.id if s.last_task else None,
                    }
                    for s in schedules
                ],
            }
        )
        return
    out = console()
    table = Table(title="Channels", title_justify="left")
    for header in ("channel", "due", "scheduled", "running", "oldest due"):
        table.add_column(header, justify="left" if header == "channel" else "right")
    for header in ("done 1h", "failed 1h", "cancelled 1h"):
        table.add_column(header, justify="right")
    for c in counts:
        table.add_row(
            c.channel,
            f"{c.due:,}",
            f"{c.scheduled:,}",
            f"{c.running:,}",
            format_age(c.oldest_due_age),
            f"[green]{c.done_last_hour:,}[/]",
            f"[red]{c.failed_last_hour:,}[/]" if c.failed_last_hour else "0",
            f"{c.cancelled_last_hour:,}",
        )
    if not counts:
        table.add_row("[dim](no tasks pending, running or finished in the last hour)[/]")
    out.print(table)
    table = Table(title="Workers", title_justify="left")
    for header in ("worker", "pid", "state", "heartbeat", "channels", "running"):
        table.add_column(header)
    for w in workers:
        state = "[green]alive[/]" if w.alive else f"[red]{WorkerState(w.worker.state).value}[/]"
        if w.worker.state == "RUNNING" and not w.alive:
            state = "[red]silent[/]"
        table.add_row(
            f"{w.worker.name} {str(w.worker.id)[:8]}",
            str(w.worker.pid or "-"),
            state,
            f"{format_age(w.heartbeat_age)} ago",
            ", ".join(w.worker.channels),
            ", ".join(f"{t.name} {str(t.id)[:8]}" for t in w.running) or "-",
        )
    if not workers:
        table.add_row("[dim](none)[/]")
    out.print(table)
    if schedules:
        table = Table(title="Schedules", title_justify="left")
        for header in ("schedule", "cron", "next tick", "last tick", "its task"):
            table.add_column(header)
        for s in schedules:
            last = s.last_task
            table.add_row(
                s.schedule.name,
                f"{s.schedule.cron} ({s.schedule.timezone})",
                _when(s.next_tick),
                _when(s.last_tick),
                f"{str(last.id)[:8]} {_state(last.state)}" if last else "-",
            )
        out.print(table)


@main.command()
@config_option
@json_option
@click.option("--state", type=STATE_CHOICE, help="Only tasks in this state.")
@filter_options
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 1000))
@click.option("--after", help="The cursor printed at the end of the previous page.")
def tasks(
    config_file: str | None,
    as_json: bool,
    state: str | None,
    limit: int,
    after: str | None,
    **given: Any,
) -> None:
    """Tasks, newest first, with filters; pages with --after."""
    ops = operations(config_file)
    with ops.app.session_factory() as session:
        page = ops.tasks(session, make_filter(state, **given), after=after, limit=limit)
        rows = [task_data(task) for task in page.tasks]
    if as_json:
        _print_json({"tasks": rows, "next": page.next})
        return
    out = console()
    table = Table()
    for header in ("id", "state", "channel", "processor", "attempts", "created", "error"):
        table.add_column(header, no_wrap=header in ("id", "created"), overflow="ellipsis")
    for row in rows:
        table.add_row(
            str(row["id"]),
            _state(row["state"]),
            row["channel"],
            f"{row['module']}:{row['name']}",
            str(row["attempts"]),
            _when(datetime.fromisoformat(row["created_at"])),
            (row.get("error_message") or "").splitlines()[0][:60]
            if row.get("error_message")
            else "",
        )
    out.print(table)
    if page.next:
        out.print(f"next page: --after '{page.next}'")


@main.command()
@click.argument("task_id")
@config_option
@json_option
def task(task_id: str, config_file: str | None, as_json: bool) -> None:
    """One task: its arguments, result, timings, events with tracebacks, parent, children."""
    ops = operations(config_file)
    with ops.app.session_factory() as session:
        detail = ops.task(session, _ids((task_id,))[0])
        if detail is None:
            fail(f"no task {task_id}", 1)
        data = task_data(detail.task)
        events = [
            {
                "type": EventType(e.type).value,
                "at": e.created_at,
                "error": e.error_message,
                "exception_type": e.exception_type,
                "traceback": e.traceback,
                "scheduled_at": e.scheduled_at,
            }
            for e in detail.events
        ]
        parent = task_data(detail.parent) if detail.parent else None
        children = [task_data(child) for child in detail.children]
        requested = detail.cancel_requested
    if as_json:
        _print_json(
            {
                "task": data,
                "events": events,
                "parent": parent,
                "children": children,
                "child_count": detail.child_count,
                "cancel_requested_by": requested.requested_by if requested else None,
            }
        )
        return
    out = console()
    table = Table(show_header=False, box=None)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for key in ("id", "state", "channel", "module", "name", "attempts", "crash_count"):
        table.add_row(key, _state(data[key]) if key == "state" else str(data[key]))
    table.add_row("kwargs", json.dumps(data["kwargs"]))
    table.add_row("result", json.dumps(data.get("result")))
    for key in ("created_at", "scheduled_at", "started_at", "finished_at"):
        value = data.get(key)
        table.add_row(key, _when(datetime.fromisoformat(value)) if value else "-")
    if data.get("error_message"):
        table.add_row("error", f"[red]{data['error_message']}[/]")
    if requested:
        table.add_row("cancel", f"requested by {requested.requested_by}")
    if parent:
        table.add_row("parent", f"{parent['id']} {_state(parent['state'])} {parent['name']}")
    if children:
        more = detail.child_count - len(children)
        listed = "\n".join(f"{c['id']} {_state(c['state'])} {c['name']}" for c in children)
        table.add_row("children", listed + (f"\n… and {more} more" if more > 0 else ""))
    out.print(table, markup=True)
    out.print("\n[bold]Events[/]")
    for event in events:
        line = f"{_when(event['at'])}  {event['type']}"
        if event["error"]:
            line += f"  {event['error']}"
        out.print(line, markup=False)
        if event["traceback"]:
            out.print(event["traceback"].rstrip(), markup=False, style="dim")
    if not events:
        out.print("[dim](no events: EVENTS is off, or retention removed them)[/]")


@main.command()
@click.argument("task_ids", nargs=-1)
@config_option
@click.option("--cancelled", is_flag=True, help="Retry cancelled tasks instead of failed ones.")
@filter_options
def retry(
    task_ids: tuple[str, ...], config_file: str | None, cancelled: bool, **given: Any
) -> None:
    """Take failed (or --cancelled) tasks back to PENDING: TASK_IDS, or every one matching
    the filters (e.g. --channel images --since 1h). Their attempts start again from 0."""
    ops = operations(config_file)
    by = operator()
    if task_ids:
        with ops.app.session_factory() as session:
            total = ops.retry(session, _ids(task_ids), by)
            session.commit()
    else:
        if not any(given.values()):
            fail("give task ids, or filters (--channel, --processor, --since, …) to retry by")
        total = ops.retry_all(make_filter("CANCELLED" if cancelled else "FAILED", **given), by)
    click.echo(f"{total} task(s) retried")


@main.command()
@click.argument("task_ids", nargs=-1, required=True)
@config_option
@click.option("--descendants", is_flag=True, help="Cancel every task below them too.")
def cancel(task_ids: tuple[str, ...], config_file: str | None, descendants: bool) -> None:
    """Cancel tasks: pending ones now, running ones by their workers (at once)."""
    ops = operations(config_file)
    with ops.app.session_factory() as session:
        result = ops.cancel(session, _ids(task_ids), descendants=descendants)
        session.commit()
    click.echo(
        f"{len(result.cancelled)} pending task(s) cancelled, "
        f"{len(result.requested)} running task(s) being stopped by their workers"
    )


@main.command()
@config_option
@click.option(
    "--older-than", help="Delete what ended longer ago than this (default: the retention)."
)
@click.option(
    "--state",
    "states",
    multiple=True,
    type=click.Choice(["done", "failed", "cancelled"], case_sensitive=False),
    help="Only tasks in this state (repeatable; default: all three).",
)
def purge(config_file: str | None, older_than: str | None, states: tuple[str, ...]) -> None:
    """Delete finished tasks (with their events), old events and gone workers' rows now, by
    the file's retention (or --older-than), in small chunks."""
    app, deployment = deployment_or_app(config_file)
    retention = deployment.retention if deployment else Retention()
    chosen = [TaskState(s.upper()) for s in states] or list(FINAL_STATES)
    if older_than is not None:
        try:
            age = timedelta(seconds=parse_duration(older_than))
        except ValueError as error:
            fail(f"--older-than: {error}")
        retention = retention.older_than(age, chosen)
    ops = Operations(app)
    with Progress(console=console(), transient=True) as progress:
        bar = progress.add_task("purging", total=None)

        def advance(deleted: dict[str, int]) -> None:
            progress.advance(bar, sum(deleted.values()))

        totals = ops.purge_all(retention, chosen, progress=advance)
    click.echo(", ".join(f"{count:,} {kind}" for kind, count in totals.items()) + " deleted")


@main.command()
@click.argument("file", required=False, type=click.Path(dir_okay=False))
@click.option("--host", help="Address to listen on (default 127.0.0.1, or the file's).")
@click.option("--port", type=click.IntRange(1, 65535), help="Port (default 8787, or the file's).")
@click.option("--read-only", is_flag=True, default=None, help="Show the queue; refuse actions.")
def dashboard(file: str | None, host: str | None, port: int | None, read_only: bool | None) -> None:
    """Serve the web dashboard for FILE (default ./beanflow.yaml): the queue at a glance,
    tasks, workers, schedules; retry, cancel, purge. Listening beyond 127.0.0.1 needs
    BEANFLOW_DASHBOARD_TOKEN (the password a browser asks for)."""
    app, deployment = deployment_or_app(file)
    settings = (deployment.dashboard if deployment else None) or DashboardSettings(
        token=os.environ.get(TOKEN_ENV) or None
    )
    chosen = {"host": host, "port": port, "read_only": read_only}
    settings = dataclasses.replace(settings, **{k: v for k, v in chosen.items() if v is not None})
    ops = Operations(app, deployment.schedules if deployment else ())
    click.echo(f"beanflow dashboard on http://{settings.host}:{settings.port}/", err=True)
    serve(ops, settings, deployment.workflows if deployment else None)


@main.group("db")
def database() -> None:
    """The database beanflow uses (the embedded one when no URL is configured)."""


@database.command("url")
@config_option
def database_url(config_file: str | None) -> None:
    """Print the database URL (starting the embedded server if it is the one)."""
    app, _ = deployment_or_app(config_file)
    click.echo(db.database_url(app.config))


@database.command("shell")
@config_option
def database_shell(config_file: str | None) -> None:
    """Open psql on the database; the embedded server stays up while it runs."""
    app, _ = deployment_or_app(config_file)
    url = make_url(db.database_url(app.config))
    psql = shutil.which("psql")
    if psql is None:
        fail("psql is not installed (Debian: apt-get install postgresql-client)", 1)
    env = os.environ.copy()
    if url.password:
        env["PGPASSWORD"] = str(url.password)
    arguments = [psql, "-d", url.database or "postgres", "-U", url.username or "postgres"]
    host = url.host or url.query.get("host")
    if host:
        arguments += ["-h", str(host)]
    if url.port:
        arguments += ["-p", str(url.port)]
    sys.exit(subprocess.call(arguments, env=env))

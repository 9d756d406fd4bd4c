"""The workflows' commands: ``start`` a run, ``runs`` to list them, ``runs show`` (each step's
state and the graph as text), ``runs cancel``, ``runs retry``."""

from __future__ import annotations

import json
import sys
import uuid
from datetime import datetime
from typing import Any

import click
from rich.table import Table

from ..config import parse_duration
from ..models import RunState, TaskState
from ..models.jsonb import parse_json
from ..ops import TASKS_FAILED, TASKS_PENDING, format_age, operator
from ..workflows import Workflows
from . import deployment_or_app, fail, main
from .operations import _print_json, _when, config_option, console, json_option, task_data


def workflows_of(config_file: str | None) -> Workflows:
    _, deployment = deployment_or_app(config_file)
    if deployment is None or deployment.workflows is None:
        fail("no workflows: declare them under workflows: in beanflow.yaml (or give --config)")
    return deployment.workflows


def _run_id(text: str) -> uuid.UUID:
    try:
        return uuid.UUID(text)
    except ValueError:
        fail(f"{text!r} is not a run id")


def run_data(run: Any) -> dict[str, Any]:
    fields = ("id", "workflow", "state", "input", "result", "error", "failed_step")
    data = {field: getattr(run, field) for field in fields}
    data |= {"unique_key": run.unique_key, "created_at": run.created_at}
    data["finished_at"] = run.finished_at
    return json.loads(json.dumps(data, default=lambda v: getattr(v, "value", str(v))))


@main.command()
@click.argument("workflow")
@click.option("-i", "--input", "input_json", default="{}", show_default=True, help="JSON input.")
@click.option("--key", help="At most one run per key: a second start prints the first's id.")
@config_option
@click.option("--wait", is_flag=True, help="Wait for the run to end; print its result.")
@click.option("--timeout", help="With --wait: give up after this long (status 4).")
def start(
    workflow: str,
    input_json: str,
    key: str | None,
    config_file: str | None,
    wait: bool,
    timeout: str | None,
) -> None:
    """Start a run of WORKFLOW; prints the run's id (with --wait, its result; status 3 if it
    failed or was cancelled)."""
    try:
        given = parse_json(input_json)
    except ValueError as error:
        fail(f"--input is not valid JSON: {error}")
    try:
        seconds = None if timeout is None else parse_duration(timeout)
    except ValueError as error:
        fail(f"--timeout: {error}")
    workflows = workflows_of(config_file)
    with workflows.app.session_factory() as session:
        run = workflows.start(session, workflow, given, key)
        session.commit()
        run_id = run.id
    click.echo(str(run_id))
    if not wait:
        return
    ended = workflows.wait(run_id, seconds)
    if ended is None:
        click.echo(f"still running after {seconds:g}s", err=True)
        sys.exit(TASKS_PENDING)
    if ended.state == RunState.DONE:
        click.echo(json.dumps(ended.result))
        return
    click.echo(f"{RunState(ended.state).value}: {ended.error}", err=True)
    sys.exit(TASKS_FAILED)


RUN_STYLES = {"RUNNING": "yellow", "DONE": "green", "FAILED": "bold red", "CANCELLED": "magenta"}


@main.group(invoke_without_command=True)
@config_option
@json_option
@click.option("--workflow", help="Only runs of this workflow.")
@click.option(
    "--state",
    type=click.Choice([s.value for s in RunState], case_sensitive=False),
    help="Only runs in this state.",
)
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 1000))
@click.pass_context
def runs(
    context: click.Context,
    config_file: str | None,
    as_json: bool,
    workflow: str | None,
    state: str | None,
    limit: int,
) -> None:
    """Workflow runs, newest first (``runs show ID`` for one)."""
    if context.invoked_subcommand is not None:
        return
    workflows = workflows_of(config_file)
    with workflows.app.session_factory() as session:
        found = workflows.runs(session, workflow, RunState(state.upper()) if state else None, limit)
        rows = [run_data(run) for run in found]
    if as_json:
        _print_json({"runs": rows})
        return
    table = Table()
    for header in ("id", "workflow", "state", "created", "took", "error"):
        table.add_column(header, no_wrap=header in ("id", "created"), overflow="ellipsis")
    for run in found:
        took = run.finished_at - run.created_at if run.finished_at else None
        style = RUN_STYLES[RunState(run.state).value]
        table.add_row(
            str(run.id),
            run.workflow,
            f"[{style}]{RunState(run.state).value}[/]",
            _when(run.created_at),
            format_age(took),
            (run.error or "")[:70],
        )
    console().print(table)


@runs.command("show")
@click.argument("run_id")
@config_option
@json_option
def show(run_id: str, config_file: str | None, as_json: bool) -> None:
    """One run: its input, result or error, the graph with each step's state, its tasks."""
    workflows = workflows_of(config_file)
    with workflows.app.session_factory() as session:
        detail = workflows.run(session, _run_id(run_id))
        if detail is None:
            fail(f"no run {run_id}", 1)
        definition = workflows.definitions.get(detail.run.workflow)
        steps = [
            {
                "step": view.step,
                "index": view.index,
                "outcome": view.outcome.value if view.outcome else None,
                "task": task_data(view.task) if view.task is not None else None,
            }
            for view in detail.steps
        ]
        drawing = workflows.draw(detail, definition) if definition else []
        data = run_data(detail.run)
    if as_json:
        _print_json({"run": data, "steps": steps, "graph": drawing})
        return
    out = console()
    for key in ("id", "workflow", "state", "input", "result", "error", "created_at"):
        if data[key] is not None:
            value = data[key] if isinstance(data[key], str) else json.dumps(data[key])
            out.print(f" {key:<12} {value}", highlight=False, markup=False)
    out.print()
    for line in drawing:
        out.print(line, highlight=False, markup=False)
    table = Table(title="Tasks", title_justify="left")
    for header in ("step", "#", "task", "state", "attempts", "ran", "error"):
        table.add_column(header, no_wrap=header in ("task",), overflow="ellipsis")
    for entry in steps:
        task = entry["task"]
        if task is None:
            table.add_row(entry["step"], "", "-", (entry["outcome"] or "gone").lower(), "", "", "")
            continue
        ran = "-"
        if task.get("started_at") and task.get("finished_at"):
            started = datetime.fromisoformat(task["started_at"])
            ran = format_age(datetime.fromisoformat(task["finished_at"]) - started)
        table.add_row(
            entry["step"],
            str(entry["index"]),
            str(task["id"])[:8],
            TaskState(task["state"]).value,
            str(task["attempts"]),
            ran,
            (task.get("error_message") or "")[:60],
        )
    out.print(table)


@runs.command("cancel")
@click.argument("run_id")
@config_option
def cancel_run(run_id: str, config_file: str | None) -> None:
    """Cancel a running run: its pending steps now, its running ones by their workers."""
    workflows = workflows_of(config_file)
    with workflows.app.session_factory() as session:
        cancelled = workflows.cancel(session, _run_id(run_id), operator())
        session.commit()
    if not cancelled:
        fail(f"run {run_id} is not running", 1)
    click.echo(f"run {run_id} cancelled")


@runs.command("retry")
@click.argument("run_id")
@config_option
def retry_run(run_id: str, config_file: str | None) -> None:
    """Resume a failed or cancelled run from its failed steps (what succeeded does not run
    again)."""
    workflows = workflows_of(config_file)
    with workflows.app.session_factory() as session:
        retried = workflows.retry(session, _run_id(run_id), operator())
        session.commit()
    click.echo(f"run {run_id} resumed: {retried} step task(s) retried")

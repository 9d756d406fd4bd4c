"""Every hot-path statement, rendered to formatted SQL under tests/sql/, for review in a diff.

A change to a statement changes its file; this test fails until the files are regenerated:

    BEANFLOW_UPDATE_SQL=1 pytest tests/test_sql.py

and the new SQL is then part of the commit that changed it.
"""

from __future__ import annotations

import functools
import inspect
import os
from pathlib import Path

import pytest
import sqlparse
from sqlalchemy.dialects.postgresql.psycopg2 import PGDialect_psycopg2

from beanflow.engine.queries import (
    Queries,
    enqueue_many,
    enqueue_one,
    enqueue_unique,
    notify,
    schedule_seen,
    schedule_ticked,
)
from beanflow.models import Cancellation, Event, ScheduleState, Task, Waiter, Worker
from beanflow.workflows import COUNTED_WITH_COMPLETION, counted_down

FOLDER = Path(__file__).resolve().parent / "sql"
_NAMED = PGDialect_psycopg2(paramstyle="named")


def _queries(events: bool, channels: int) -> Queries:
    return Queries(
        Task,
        Worker,
        Event,
        events=events,
        channel_count=channels,
        batch_size=10,
        cancellation_model=Cancellation,
        waiter_model=Waiter,
    )


def _variants() -> dict[str, tuple[object, str]]:
    """File name → (statement, what it does)."""
    found: dict[str, tuple[object, str]] = {}
    for events in (True, False):
        suffix = "" if events else ".no-events"
        for channels in (1, 3):
            queries = _queries(events, channels)
            found[f"claim.{channels}-channel{suffix}"] = (queries.claim, _doc(Queries, "_claimed"))
        queries = _queries(events, 1)
        found[f"complete_and_claim{suffix}"] = (
            queries.complete_and_claim_up_to(10),
            _doc(Queries, "_complete_and_claim"),
        )
        queries = _queries(events, 1)
        for name in ("complete", "settle", "give_back", "release", "reap"):
            found[f"{name}{suffix}"] = (getattr(queries, name), _doc(Queries, name))
    for channels in (1, 3):
        found[f"next_due.{channels}-channel"] = (
            _queries(True, channels).next_due,
            _doc(Queries, "next_due"),
        )
    queries = _queries(True, 1)
    for name in ("due_channels", "heartbeat", "shut_down"):
        found[name] = (getattr(queries, name), _doc(Queries, name))
    # with a deployment's workflows: the count-down of fan-out elements rides in the completion
    counting = functools.partial(counted_down, up_to=COUNTED_WITH_COMPLETION)
    queries = Queries(Task, Worker, Event, batch_size=10, completion_columns=[counting])
    found["complete_and_claim.workflows"] = (
        queries.complete_and_claim_up_to(10),
        _doc(Queries, "_complete_and_claim") + "\n" + inspect.getdoc(counted_down),
    )
    found["enqueue_many"] = (enqueue_many(Task.__table__), inspect.getdoc(enqueue_many))
    for notifying in (True, False):
        found[f"enqueue_one{'' if notifying else '.no-notify'}"] = (
            enqueue_one(Task.__table__, ("id", "channel", "module", "name", "kwargs"), notifying),
            inspect.getdoc(enqueue_one),
        )
    found["enqueue_unique"] = (enqueue_unique(Task.__table__), inspect.getdoc(enqueue_unique))
    found["notify"] = (notify("a channel"), inspect.getdoc(notify))
    for function in (schedule_seen, schedule_ticked):
        found[function.__name__] = (function(ScheduleState.__table__), inspect.getdoc(function))
    return found


def _doc(cls: type, name: str) -> str:
    return inspect.getdoc(getattr(cls, name)) or ""


def render(statement: object, doc: str) -> str:
    sql = str(statement.compile(dialect=_NAMED))  # type: ignore[attr-defined]
    body = sqlparse.format(sql, reindent=True, keyword_case="upper", indent_width=2)
    header = "".join(f"-- {line}".rstrip() + "\n" for line in doc.splitlines())
    return f"{header}{body.strip()};\n"


VARIANTS = _variants()


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_rendered_sql_matches_its_golden_file(name):
    rendered = render(*VARIANTS[name])
    path = FOLDER / f"{name}.sql"
    if os.environ.get("BEANFLOW_UPDATE_SQL"):
        FOLDER.mkdir(exist_ok=True)
        path.write_text(rendered)
    assert path.exists(), f"{path} is missing: run BEANFLOW_UPDATE_SQL=1 pytest tests/test_sql.py"
    assert path.read_text() == rendered, (
        f"{name} renders differently from {path.name}: review the change, then run "
        "BEANFLOW_UPDATE_SQL=1 pytest tests/test_sql.py"
    )


def test_no_stale_golden_files():
    assert {p.stem for p in FOLDER.glob("*.sql")} <= set(VARIANTS)

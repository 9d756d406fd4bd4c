"""Processors the benchmarks run in real worker processes (configured from BEANFLOW_*)."""

import time
import uuid
from typing import Any

from sqlalchemy import event, text
from sqlalchemy.orm import Session, object_session

import beanflow as bq
from beanflow.workflows import Ref, Step, Workflow, Workflows

app = bq.BeanQueue()


@app.processor(channel="bench")
def noop() -> None:
    """The cheapest task: measures the queue, not the work."""


@app.processor(channel="bench")
def write_row(db: Session, n: int) -> None:
    """W6: one row in a user table, in the task's own transaction."""
    db.execute(text("INSERT INTO bench_effects (n) VALUES (:n)"), {"n": n})


@app.processor(channel="bench")
def hop(db: Session, left: int) -> None:
    """W11's hand-written chain: a task that enqueues the next one until ``left`` is 0."""
    if left:
        bq.enqueue(db, hop, left=left - 1)


# W11's pair: the runs whose first step ran in the worker's open transaction, and the moment
# (epoch seconds) the commit that ended each returned
_awaiting_commit: list[uuid.UUID] = []
_committed_at: dict[uuid.UUID, float] = {}


def _note_commit(session: Session) -> None:
    now = time.time()
    if session.get_nested_transaction() is not None:
        return  # a savepoint's release (the ORM reports it as a commit too)
    for run_id in _awaiting_commit:
        _committed_at[run_id] = now
    _awaiting_commit.clear()


@app.processor(channel="bench")
def first(task: Any) -> None:
    """W11's upstream step: notes the moment the worker's commit that completes it returns
    (the task's session is the worker's; not taking ``db`` keeps the step a plain no-op's)."""
    db = object_session(task)
    if not event.contains(db, "after_commit", _note_commit):
        event.listen(db, "after_commit", _note_commit)
    _awaiting_commit.append(task.workflow_run_id)


@app.processor(channel="bench")
def started(task: Any) -> list[float | None]:
    """W11's dependent step: the moment it started (epoch seconds), and the moment its
    upstream's commit returned when that was in this process (else None), as its result."""
    return [time.time(), _committed_at.pop(task.workflow_run_id, None)]


@app.processor(channel="bench")
def sleep_for(seconds: float) -> None:
    """The mixed workload's slow task."""
    time.sleep(seconds)


# W11's workflows, declared in Python (a beanflow.yaml compiles to the same objects): a chain
# of four no-op steps, a pair whose second step tells when it started and when its first
# step's commit returned, and a fan-out of no-op
# steps over the run's input
WORKFLOWS = Workflows(
    app,
    {
        "chain": Workflow(
            "chain",
            {
                "a": Step("a", noop),
                "b": Step("b", noop, ("a",)),
                "c": Step("c", noop, ("b",)),
                "d": Step("d", noop, ("c",)),
            },
            result="d",
        ),
        "pair": Workflow("pair", {"a": Step("a", first), "b": Step("b", started, ("a",))}, "b"),
        "fan": Workflow(
            "fan", {"each": Step("each", noop, for_each=Ref("input", ("items",)))}, "each"
        ),
    },
)
app.task_end_hooks.append(WORKFLOWS)

"""Processors the benchmarks run in real worker processes (configured from BEANFLOW_*)."""

import time

from sqlalchemy import text
from sqlalchemy.orm import Session

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


@app.processor(channel="bench")
def started() -> float:
    """W11's dependent step: the moment it started (epoch seconds) as its result."""
    return time.time()


@app.processor(channel="bench")
def sleep_for(seconds: float) -> None:
    """The mixed workload's slow task."""
    time.sleep(seconds)


# W11's workflows, declared in Python (a beanflow.yaml compiles to the same objects): a chain
# of four no-op steps, a pair whose second step tells when it started, and a fan-out of no-op
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
        "pair": Workflow("pair", {"a": Step("a", noop), "b": Step("b", started, ("a",))}, "b"),
        "fan": Workflow(
            "fan", {"each": Step("each", noop, for_each=Ref("input", ("items",)))}, "each"
        ),
    },
)
app.task_end_hooks.append(WORKFLOWS.on_tasks_ended)

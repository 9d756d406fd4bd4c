"""Processors the benchmarks run in real worker processes (configured from BEANFLOW_*)."""

import time

from sqlalchemy import text
from sqlalchemy.orm import Session

import beanflow as bq

app = bq.BeanQueue()


@app.processor(channel="bench")
def noop() -> None:
    """The cheapest task: measures the queue, not the work."""


@app.processor(channel="bench")
def write_row(db: Session, n: int) -> None:
    """W6: one row in a user table, in the task's own transaction."""
    db.execute(text("INSERT INTO bench_effects (n) VALUES (:n)"), {"n": n})


@app.processor(channel="bench")
def sleep_for(seconds: float) -> None:
    """The mixed workload's slow task."""
    time.sleep(seconds)

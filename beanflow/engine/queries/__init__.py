"""Every SQL statement of the hot path, named, in one place.

Statements are built once per set of models (custom models change the table names) with
SQLAlchemy Core and executed with bind parameters. Each one is a single round trip; where a
transition also writes its Event row, the insert rides in the same statement as a
data-modifying CTE. ``tests/sql/`` holds each one rendered, for review in a diff.

This package imports nothing of beanflow, so every layer may use it (the models' NOTIFY too).
"""

from __future__ import annotations

from .common import channel_parameters, notify
from .prepared import Prepared
from .schedules import schedule_seen, schedule_ticked
from .tasks import TaskStatements, enqueue_many, enqueue_one, enqueue_unique
from .workers import WorkerStatements


class Queries(TaskStatements, WorkerStatements):
    """The hot-path statements for one (task, worker, event) model set."""


__all__ = [
    "Prepared",
    "Queries",
    "channel_parameters",
    "enqueue_many",
    "enqueue_one",
    "enqueue_unique",
    "notify",
    "schedule_seen",
    "schedule_ticked",
]

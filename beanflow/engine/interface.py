"""What the engine needs from an application, and nothing more.

``BeanQueue`` provides it; so may anything else (a test, an embedding application). The
engine never imports the app or the declarative layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from ..config import Config
from ..processors.registry import ProcessorRegistry


class TaskEndHook(Protocol):
    """Work done in the transaction that ends tasks, before it commits (a deployment's
    workflows advance their runs there)."""

    def completion_column(self, task_ids: Any) -> Any:
        """A column for the statement that completes a batch to compute, made from that
        statement's parameter of the ids of the tasks it completes (an array); a
        data-modifying CTE in it rides in the statement (no round trip of its own)."""

    def on_tasks_ended(
        self, session: Session, done: Sequence[Any], failed: Sequence[Any], computed: Any
    ) -> bool:
        """Called with the tasks DONE in the transaction, those FAILED or CANCELLED for good,
        and the value of ``completion_column`` (None when no task completed in it); returns
        whether it added tasks (the worker's commit then claims them too)."""


class QueueApp(Protocol):
    """The settings, models, registry and database that workers and services run with."""

    config: Config
    registry: ProcessorRegistry
    # run in the transaction that ends tasks, before it commits; a worker takes the hooks
    # there are when it starts
    task_end_hooks: list[TaskEndHook]

    @property
    def task_model(self) -> type: ...

    @property
    def worker_model(self) -> type: ...

    @property
    def event_model(self) -> type: ...

    @property
    def engine(self) -> Engine: ...

"""What the engine needs from an application, and nothing more.

``BeanQueue`` provides it; so may anything else (a test, an embedding application). The
engine never imports the app or the declarative layer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from ..config import Config
from ..processors.registry import ProcessorRegistry


class QueueApp(Protocol):
    """The settings, models, registry and database that workers and services run with."""

    config: Config
    registry: ProcessorRegistry
    # called in the transaction that ends tasks, before it commits, with the tasks DONE in it
    # and those FAILED or CANCELLED for good (a deployment's workflows advance their runs);
    # each returns whether it added tasks (the worker's commit then claims them too)
    task_end_hooks: list[Callable[[Session, Sequence[Any], Sequence[Any]], bool]]

    @property
    def task_model(self) -> type: ...

    @property
    def worker_model(self) -> type: ...

    @property
    def event_model(self) -> type: ...

    @property
    def engine(self) -> Engine: ...

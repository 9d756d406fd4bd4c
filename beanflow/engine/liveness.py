"""Liveness: a worker's row, its heartbeat, the reaper that returns dead workers' tasks, the
watch on its supervisor, and the summary line that shows a worker at work.

Both run in every worker process, each on its own thread and pool connection, so a long task
never delays them. Any worker reaps any other: there is no leader to lose.
"""

from __future__ import annotations

import collections
import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from ..models.worker import WorkerState
from . import metrics
from .interface import QueueApp
from .queries import Queries
from .service import PeriodicService

logger = logging.getLogger(__name__)


class WorkerRecord:
    """A worker's row, and the tasks it holds: registered when it starts; at the end (or
    when its connection broke) what it holds is returned, and the row marked SHUTDOWN."""

    def __init__(self, app: QueueApp, queries: Queries, worker_id: uuid.UUID) -> None:
        self.app, self.queries, self.worker_id = app, queries, worker_id

    def register(self, channels: list[str]) -> None:
        with self.app.engine.begin() as connection:
            connection.execute(
                self.queries.register,
                {
                    "id": self.worker_id,
                    "name": socket.gethostname(),
                    "pid": os.getpid(),
                    "channels": channels,
                },
            )

    def release(self, innocent: list[Any], charged: list[Any]) -> None:
        """Return what the worker holds to the queue: task ids ``innocent`` with their attempt
        given back, ``charged`` charged a crash (see Queries.release)."""
        with self.app.engine.begin() as connection:
            connection.execute(
                self.queries.release,
                {
                    "worker": self.worker_id,
                    "innocent": list(innocent),
                    "charged": list(charged),
                    "max_crashes": self.app.config.MAX_WORKER_CRASHES,
                },
            )

    def shut_down(self) -> None:
        with self.app.engine.begin() as connection:
            connection.execute(self.queries.shut_down, {"worker": self.worker_id})


class Heartbeat(PeriodicService):
    """Records every WORKER_HEARTBEAT_PERIOD that a worker is alive. Once another worker has
    marked it dead (its tasks were given to others), calls ``on_lost(state)`` and stops."""

    name = "heartbeat"

    def __init__(
        self,
        app: QueueApp,
        queries: Queries,
        worker_id: uuid.UUID,
        stopping: threading.Event,
        on_lost: Callable[[str], None],
    ) -> None:
        super().__init__(app.config.WORKER_HEARTBEAT_PERIOD, stopping)
        self.app, self.queries, self.worker_id, self.on_lost = app, queries, worker_id, on_lost

    def run_once(self) -> None:
        with self.app.engine.begin() as connection:
            state = connection.execute(self.queries.heartbeat, {"worker": self.worker_id}).scalar()
        if state != WorkerState.RUNNING:
            self.on_lost(getattr(state, "value", str(state)))


class Reaper(PeriodicService):
    """Finds workers silent for WORKER_HEARTBEAT_TIMEOUT, marks them NO_HEARTBEAT and returns
    their tasks to the queue (or fails those that MAX_WORKER_CRASHES deaths have charged),
    all in one statement (``Queries.reap``)."""

    name = "reaper"

    def __init__(self, app: QueueApp, queries: Queries, stopping: threading.Event) -> None:
        super().__init__(app.config.WORKER_HEARTBEAT_PERIOD, stopping)
        self.app, self.queries = app, queries

    def run_once(self) -> tuple[int, int]:
        """Returns (dead workers found, their tasks re-queued or failed)."""
        config = self.app.config
        with self.app.engine.begin() as connection:
            workers, tasks, _ = connection.execute(
                self.queries.reap,
                {
                    "timeout": timedelta(seconds=config.WORKER_HEARTBEAT_TIMEOUT),
                    "max_crashes": config.MAX_WORKER_CRASHES,
                },
            ).one()
        if workers:
            logger.warning(
                "found %d dead worker(s); %d task(s) re-queued or failed", workers, tasks
            )
            metrics.workers_reaped(workers)
        return workers, tasks


class Summary(PeriodicService):
    """Logs what a worker did (``take_counts()``: done, retried, failed), once a minute."""

    name = "summary"

    def __init__(
        self,
        worker_id: uuid.UUID,
        take_counts: Callable[[], collections.Counter[str]],
        stopping: threading.Event,
        period: float = 60.0,
    ) -> None:
        super().__init__(period, stopping)
        self.worker_id, self.take_counts = worker_id, take_counts

    def run_once(self) -> None:
        counts = self.take_counts()
        logger.info(
            "worker %s: in the last %ds %d done, %d retried, %d failed",
            self.worker_id,
            self.period,
            counts["done"],
            counts["retried"],
            counts["failed"],
        )


class ParentWatch(PeriodicService):
    """Stops a supervised worker whose supervisor has died (kill -9, a crash): otherwise a
    restarted supervisor would start a second pool beside the orphans. It drains, as on
    SIGTERM."""

    name = "parent-watch"

    def __init__(
        self,
        supervisor: int,
        stopping: threading.Event,
        stop: Callable[[], None],
        period: float = 0.5,
    ) -> None:
        super().__init__(period, stopping)
        self.supervisor, self.stop_worker = supervisor, stop

    def run_once(self) -> None:
        if os.getppid() != self.supervisor:
            logger.error("supervisor %d is gone; this worker stops", self.supervisor)
            self.stop_worker()

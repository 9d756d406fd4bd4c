"""Control of a running worker from outside: requests to cancel the tasks it holds.

``ops.cancel`` records a Cancellation row for a running task and notifies CONTROL_CHANNEL on
commit. Each worker LISTENs there on a connection of its own and, woken, reads which of the
tasks it holds have a request (on every (re)connect too, for requests made while it was not
listening). A row outlives a missed notify: a task whose worker dies is CANCELLED by the one
that reaps it, not re-queued.
"""

from __future__ import annotations

import logging
import os
import threading
import uuid
from collections.abc import Callable
from typing import Any

import psycopg2
from sqlalchemy import exc, select

from ..errors import first_line
from ..models.cancellation import Cancellation
from .interface import QueueApp
from .notify import Listener, drain_pipe
from .service import PeriodicService

logger = logging.getLogger(__name__)

CONTROL_CHANNEL = "beanflow_control"


class Control(PeriodicService):
    """Calls ``on_cancel(task_id, requested_by)`` for each task of this worker whose
    cancellation was requested, as soon as it is notified."""

    name = "control"
    PROBE_SECONDS = 30.0  # a silent connection is probed this often (a quiet death)

    def __init__(
        self,
        app: QueueApp,
        worker_id: uuid.UUID,
        stopping: threading.Event,
        on_cancel: Callable[[Any, str], None],
    ) -> None:
        super().__init__(0.0, stopping)
        self.app, self.worker_id, self.on_cancel = app, worker_id, on_cancel
        self.listener: Listener | None = None
        self.reconnect_delay = 0.0  # grows while the database cannot be reached
        self._wake_read, self._wake_write = os.pipe()
        t, c = app.task_model, Cancellation
        self.requests = (
            select(c.task_id, c.requested_by)
            .join(t, t.id == c.task_id)
            .where(t.worker_id == worker_id, t.state == "PROCESSING")
        )

    def next_wait(self) -> float:
        return 0.0 if self.listener is not None else self.reconnect_delay

    def run_once(self) -> None:
        try:
            notified = self._listen()
            if notified and not self.stopping.is_set():
                with self.app.engine.connect() as connection:
                    for task_id, requested_by in connection.execute(self.requests).all():
                        self.on_cancel(task_id, requested_by)
        except (psycopg2.Error, exc.DBAPIError) as error:
            if self.listener is not None:
                self.listener.close()
                self.listener = None
            self.reconnect_delay = min(max(self.reconnect_delay * 2, 0.5), 10.0)
            logger.warning(
                "control: %s; listening again in %.1fs", first_line(error), self.reconnect_delay
            )

    def _listen(self) -> bool:
        """Wait for a notify (True), or connect first: requests made while this worker was
        not listening count as notified."""
        if self.listener is None:
            self.listener = Listener(self.app.engine, [CONTROL_CHANNEL])
            self.reconnect_delay = 0.0
            return True
        return self.listener.wait(self.PROBE_SECONDS, self._wake_read)

    def join(self) -> None:
        os.write(self._wake_write, b"x")  # out of its wait at once
        super().join()
        if self.listener is not None:
            self.listener.close()
        drain_pipe(self._wake_read)
        os.close(self._wake_read)
        os.close(self._wake_write)

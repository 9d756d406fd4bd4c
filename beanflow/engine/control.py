"""Control of a running worker from outside: requests to cancel the tasks it holds.

``ops.cancel`` records a Cancellation row for a running task and notifies CONTROL_CHANNEL on
commit. Each worker LISTENs there on a connection of its own and, woken, reads which of the
tasks it holds have a request (on every (re)connect too, for requests made while it was not
listening). A row outlives a missed notify: a task whose worker dies is CANCELLED by the one
that reaps it, not re-queued.
"""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Callable
from typing import Any

from sqlalchemy import select

from ..models.cancellation import Cancellation
from .interface import QueueApp
from .notify import Listener, drain_pipe
from .service import PeriodicService

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
        self._wake_read, self._wake_write = os.pipe()
        t, c = app.task_model, Cancellation
        self.requests = (
            select(c.task_id, c.requested_by)
            .join(t, t.id == c.task_id)
            .where(t.worker_id == worker_id, t.state == "PROCESSING")
        )

    def run_once(self) -> None:
        if self.listener is None:
            self.listener = Listener(self.app.engine, [CONTROL_CHANNEL])
            notified = True  # requests made while it was not listening
        else:
            try:
                notified = self.listener.wait(self.PROBE_SECONDS, self._wake_read)
            except Exception:
                self.listener.close()
                self.listener = None
                raise
        if notified and not self.stopping.is_set():
            with self.app.engine.connect() as connection:
                for task_id, requested_by in connection.execute(self.requests).all():
                    self.on_cancel(task_id, requested_by)

    def join(self) -> None:
        os.write(self._wake_write, b"x")  # out of its wait at once
        super().join()
        if self.listener is not None:
            self.listener.close()
        drain_pipe(self._wake_read)
        os.close(self._wake_read)
        os.close(self._wake_write)

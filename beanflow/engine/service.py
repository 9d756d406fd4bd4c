"""The shape of a maintenance service: one small job, run periodically on a thread of its own.

The heartbeat and the reaper (``liveness.py``) are services; a new one (retention, schedule
ticks, workflow progression) copies their shape: a class with a ``period`` and a
``run_once()`` that does one round of work in its own short transaction, and can be called
directly by a test.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from sqlalchemy import exc

from ..errors import first_line

logger = logging.getLogger(__name__)


class PeriodicService:
    """Runs ``run_once()`` every ``period`` seconds until ``stopping`` is set.

    A database error is logged and the next round tries again: a service outlives a server
    restart. Any other exception is a bug, and is logged with its traceback the same way.
    """

    name = "service"

    def __init__(self, period: float, stopping: threading.Event) -> None:
        self.period = period
        self.stopping = stopping
        self._thread: threading.Thread | None = None

    def run_once(self) -> None:
        """One round of work."""
        raise NotImplementedError

    def next_wait(self) -> float:
        """Seconds to wait before the next round (the period, unless a service knows better)."""
        return self.period

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._loop, name=f"beanflow-{self.name}", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self.stopping.set()

    def join(self) -> None:
        if self._thread is not None:
            self._thread.join()

    def _loop(self) -> None:
        while not self.stopping.wait(self.next_wait()):
            try:
                self.run_once()
            except exc.DBAPIError as error:
                logger.warning("%s failed: %s", self.name, first_line(error.orig or error))
            except Exception:
                logger.exception("%s failed", self.name)


class Every(PeriodicService):
    """A service that calls ``function`` every ``period`` seconds."""

    def __init__(
        self, period: float, stopping: threading.Event, function: Callable[[], None], name: str
    ) -> None:
        super().__init__(period, stopping)
        self.function, self.name = function, name

    def run_once(self) -> None:
        self.function()

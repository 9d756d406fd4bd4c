"""Deadlines of the running task, enforced with SIGALRM: its processor's timeout, and the
grace period of a stopping worker.

Both interrupt the task by raising an exception inside it, from a signal handler in the main
thread. They are BaseExceptions, like SystemExit, so that a task's own ``except Exception``
cannot swallow them. A worker driven from another thread enforces neither.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

# SIGTERM and SIGINT ask a worker to drain; SIGUSR1 to stop now (a supervisor's second signal)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class GraceExceeded(BaseException):
    """Raised inside a running task when a stopping worker's grace period has run out."""


class TaskTimeout(BaseException):
    """Raised inside a running task that has run past its processor's ``timeout``."""


class TaskCancelled(BaseException):
    """Raised inside a running task that an operator cancelled (``beanflow cancel``)."""


class Deadlines:
    """The stop signals' handler and the alarm that enforces the running task's deadlines."""

    def __init__(self) -> None:
        self.enabled = False  # signal handlers installed (main thread only)
        self._previous: dict[int, Any] = {}
        self._running = False
        self._timeout: float | None = None
        self._task_deadline: float | None = None  # monotonic
        self._grace_deadline: float | None = None  # monotonic
        self._task_id: Any = None  # of the running task
        self._cancelled: tuple[Any, str] | None = None  # (task id, by whom)

    def install(self, on_stop: Callable[[int], None]) -> None:
        """Call ``on_stop(signal number)`` on SIGTERM, SIGINT and SIGUSR1, and enforce
        deadlines; does nothing outside the main thread, where Python cannot handle signals."""
        if threading.current_thread() is not threading.main_thread():
            return
        self.enabled = True
        handlers: dict[int, Any] = {
            number: lambda number, frame: on_stop(number) for number in STOP_SIGNALS
        }
        handlers[signal.SIGALRM] = self._on_alarm
        self._previous = {number: signal.signal(number, h) for number, h in handlers.items()}

    def restore(self) -> None:
        """Cancel the alarm and put the previous signal handlers back."""
        if self.enabled:
            signal.setitimer(signal.ITIMER_REAL, 0)
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous, self.enabled = {}, False

    @contextlib.contextmanager
    def task(self, timeout: float | None, task_id: Any = None) -> Iterator[None]:
        """While the block runs, its deadlines interrupt it: TaskTimeout after ``timeout``
        seconds, GraceExceeded once a stopping worker's grace period is over, TaskCancelled
        when ``cancel(task_id)`` is called."""
        self._timeout, self._task_id = timeout, task_id
        if timeout is not None and self.enabled:
            self._task_deadline = time.monotonic() + timeout
            self._arm()
        self._running = True
        try:
            yield
        finally:
            self._running = False
            if self._task_deadline is not None:
                self._task_deadline = None
                self._arm()

    @property
    def running(self) -> bool:
        """Whether a task is running inside ``task()`` now."""
        return self._running

    def start_grace(self, seconds: float) -> None:
        """Give the running task ``seconds`` to finish (nothing to do between tasks)."""
        if self._running:
            self._grace_deadline = time.monotonic() + seconds
            self._arm()

    def cancel(self, task_id: Any, by: str) -> bool:
        """Interrupt the task ``task_id`` with TaskCancelled if it is the one running; callable
        from any thread. Returns whether it was running."""
        if not (self.enabled and self._running and self._task_id == task_id):
            return False
        self._cancelled = (task_id, by)
        signal.pthread_kill(threading.main_thread().ident, signal.SIGALRM)  # type: ignore[arg-type]
        return True

    def end_grace(self) -> None:
        """Interrupt the running task now (called from a signal handler)."""
        self._grace_deadline = time.monotonic()
        self._on_alarm(signal.SIGALRM, None)

    def _arm(self) -> None:
        """Schedule SIGALRM for the nearest deadline (or cancel it when there is none)."""
        if not self.enabled:
            return
        deadlines = [d for d in (self._task_deadline, self._grace_deadline) if d is not None]
        delay = max(min(deadlines) - time.monotonic(), 0.001) if deadlines else 0
        signal.setitimer(signal.ITIMER_REAL, delay)

    def _on_alarm(self, number: int, frame: Any) -> None:
        if not self._running:
            return
        cancelled, self._cancelled = self._cancelled, None
        if cancelled is not None and cancelled[0] == self._task_id:
            raise TaskCancelled(f"cancelled by {cancelled[1]}")
        now = time.monotonic()
        if self._grace_deadline is not None and now >= self._grace_deadline:
            raise GraceExceeded()
        if self._task_deadline is not None and now >= self._task_deadline:
            raise TaskTimeout(f"the task ran past its timeout of {self._timeout}s")
        self._arm()  # woken early: wait for the nearest deadline

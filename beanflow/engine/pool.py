"""Supervisor: N worker processes per channel, restarted when they die, plus its services
(the schedules, retention).

Workers are separate processes started from a command line (not forked), so a crashing task
takes down one worker and nothing it shares memory or connections with.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import select
import signal
import subprocess
import time
from collections.abc import Callable, Sequence

from .notify import drain_pipe
from .service import PeriodicService

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class ChannelPlan:
    """How many worker processes serve a channel, and their settings (None: the config's)."""

    channel: str
    workers: int = 1
    batch_size: int | None = None
    poll_timeout: float | None = None


@dataclasses.dataclass
class _Slot:
    plan: ChannelPlan
    index: int
    process: subprocess.Popen | None = None
    started: float = 0.0
    failures: int = 0  # consecutive early deaths, for the restart backoff
    restart_at: float | None = None
    finished: bool = False  # a burst worker that exited 0

    @property
    def label(self) -> str:
        return f"{self.plan.channel}#{self.index}"


class Supervisor:
    """Runs the pool until SIGTERM/SIGINT (drain), a second signal (stop now), or, in burst
    mode, until every worker has exited."""

    # a worker that lived this long before dying was healthy: its backoff starts over
    HEALTHY_SECONDS = 30.0
    MAX_BACKOFF = 30.0

    def __init__(
        self,
        plans: list[ChannelPlan],
        command: Callable[[ChannelPlan], list[str]],
        services: Sequence[PeriodicService] = (),
        *,
        grace_period: float = 30.0,
        burst: bool = False,
        due_channels: Callable[[], set[str]] | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.slots = [_Slot(plan, i) for plan in plans for i in range(plan.workers)]
        self.command = command
        self.services = list(services)  # the schedules, retention: not in a burst
        self.grace_period = grace_period
        self.burst = burst
        # burst: which channels still have due tasks once every worker has exited (a task
        # may have enqueued children on a channel whose worker had already finished)
        self.due_channels = due_channels
        self.env = env  # the workers' environment (None: this process's)
        self.signals = 0
        self._wake_read, self._wake_write = os.pipe()

    def run(self) -> int:
        """Start everything and supervise; returns the exit status (0 unless a burst worker
        failed)."""
        previous = {n: signal.signal(n, self._on_signal) for n in (signal.SIGTERM, signal.SIGINT)}
        services = [] if self.burst else self.services
        for service in services:
            service.start()
        for slot in self.slots:
            self._start(slot)
        logger.info(
            "supervisor %d started %d worker(s)%s",
            os.getpid(),
            len(self.slots),
            "".join(f", and the {service.name}" for service in services),
        )
        try:
            status = self._supervise()
        finally:
            for service in services:
                service.stop()
            for number, handler in previous.items():
                signal.signal(number, handler)
        return status

    def worker_processes(self) -> tuple[int, int]:
        """(worker processes running, worker processes expected to run)."""
        expected = [slot for slot in self.slots if not slot.finished]
        running = [s for s in expected if s.process is not None and s.process.poll() is None]
        return len(running), len(expected)

    def _on_signal(self, number: int, frame: object) -> None:
        self.signals += 1
        os.write(self._wake_write, b"\0")

    def _supervise(self) -> int:
        draining_since: float | None = None
        forwarded = 0
        while True:
            select.select([self._wake_read], [], [], 0.2)
            drain_pipe(self._wake_read)
            if self.signals > forwarded:
                forwarded = self.signals
                if draining_since is None:
                    draining_since = time.monotonic()
                    logger.info(
                        "supervisor: stopping; workers finish their tasks (grace period %ss)",
                        self.grace_period,
                    )
                    for service in self.services:
                        service.stop()
                    self._signal_all(signal.SIGTERM)
                else:
                    logger.warning("supervisor: second signal, stopping now")
                    self._signal_all(signal.SIGUSR1)
            if draining_since is not None:
                if all(s.process is None or s.process.poll() is not None for s in self.slots):
                    logger.info("supervisor: all workers stopped")
                    return 0
                if time.monotonic() - draining_since > self.grace_period + 10:
                    logger.error(
                        "supervisor: workers still running past the grace period; killing them"
                    )
                    self._signal_all(signal.SIGKILL)
                continue
            self._reap_and_restart()
            if self.burst and all(s.finished for s in self.slots):
                channels = self.due_channels() if self.due_channels else set()
                if not channels:
                    return 0
                for slot in self.slots:
                    if slot.plan.channel in channels:
                        slot.finished = False
                        self._start(slot)

    def _reap_and_restart(self) -> None:
        now = time.monotonic()
        for slot in self.slots:
            process = slot.process
            if process is not None and process.poll() is not None:
                slot.process = None
                if self.burst and process.returncode == 0:
                    slot.finished = True
                    continue
                lived = now - slot.started
                slot.failures = 0 if lived >= self.HEALTHY_SECONDS else slot.failures + 1
                delay = min(0.5 * 2 ** max(slot.failures - 1, 0), self.MAX_BACKOFF)
                slot.restart_at = now + delay
                logger.warning(
                    "worker %s (pid %d) %s after %.1fs; restarting in %.1fs",
                    slot.label,
                    process.pid,
                    _exit_reason(process.returncode),
                    lived,
                    delay,
                )
            if slot.process is None and slot.restart_at is not None and now >= slot.restart_at:
                self._start(slot)

    def _start(self, slot: _Slot) -> None:
        slot.process = subprocess.Popen(self.command(slot.plan), env=self.env)
        slot.started = time.monotonic()
        slot.restart_at = None

    def _signal_all(self, number: int) -> None:
        for slot in self.slots:
            if slot.process is not None and slot.process.poll() is None:
                slot.process.send_signal(number)


def _exit_reason(status: int) -> str:
    if status < 0:
        return f"was killed by {signal.Signals(-status).name}"
    return f"exited with status {status}"

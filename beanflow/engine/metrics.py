"""The engine's Prometheus metrics: what workers and schedulers count as they go.

They exist only in processes started with ``PROMETHEUS_MULTIPROC_DIR`` set (a deployment run
with metrics on): prometheus_client's multiprocess mode writes each process's counts to files
there, which the supervisor's ``/metrics`` adds up. Elsewhere every call is a no-op, so the hot
path pays nothing when metrics are off.
"""

from __future__ import annotations

import functools
import os
from typing import Any

MULTIPROCESS_DIR = "PROMETHEUS_MULTIPROC_DIR"


class _Metrics:
    def __init__(self) -> None:
        from prometheus_client import Counter, Histogram

        self.tasks = Counter(
            "beanflow_tasks_total",
            "Task attempts ended, by processor, channel and outcome (done, failed, retried, "
            "cancelled, snoozed)",
            ["processor", "channel", "outcome"],
        )
        self.duration = Histogram(
            "beanflow_task_duration_seconds",
            "How long task attempts ran, by processor",
            ["processor", "channel"],
            buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 60, 300),
        )
        self.reaped = Counter(
            "beanflow_workers_reaped_total", "Workers found dead (silent past the timeout)"
        )
        self.ticks = Counter(
            "beanflow_schedule_ticks_total", "Cron ticks enqueued, by schedule", ["schedule"]
        )


@functools.cache
def _metrics() -> _Metrics | None:
    return _Metrics() if os.environ.get(MULTIPROCESS_DIR) else None


def enabled() -> bool:
    """Whether this process counts (metrics are on)."""
    return _metrics() is not None


def task_ended(task: Any, outcome: str, seconds: float | None = None) -> None:
    """Count a task attempt that ended with ``outcome`` (after ``seconds`` of running)."""
    metrics = _metrics()
    if metrics is None:
        return
    processor = f"{task.module}.{task.name}"
    metrics.tasks.labels(processor, task.channel, outcome).inc()
    if seconds is not None:
        metrics.duration.labels(processor, task.channel).observe(seconds)


def workers_reaped(count: int) -> None:
    metrics = _metrics()
    if metrics is not None and count:
        metrics.reaped.inc(count)


def schedule_ticked(name: str) -> None:
    metrics = _metrics()
    if metrics is not None:
        metrics.ticks.labels(name).inc()

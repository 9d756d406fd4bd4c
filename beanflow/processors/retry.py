"""Retry policies: callables ``policy(task) -> when to retry, or None to fail``.

A policy returns a ``datetime`` or a SQL expression (such as ``func.now() + delay``); the
engine evaluates it on the server. They read only the task row (``task.attempts``), so they
work with events switched off.
"""

from __future__ import annotations

import datetime
import random
from collections.abc import Callable
from typing import Any

from sqlalchemy import func

RetryPolicy = Callable[[Any], Any]


class DelayRetry:
    """Retry after a fixed delay."""

    def __init__(self, delay: datetime.timedelta) -> None:
        self.delay = delay

    def __call__(self, task: Any) -> Any:
        return func.now() + self.delay

    def __repr__(self) -> str:
        return f"DelayRetry(delay={self.delay!r})"


class ExponentialBackoffRetry:
    """Retry after ``base ** (exponent_offset + exponent_scalar * n)`` seconds, where n is the
    number of attempts made before this one (0 for the first retry), capped at ``max_delay``.

    ``jitter`` (0 to 1) shortens each delay by a random fraction of up to ``jitter``, so
    tasks that failed together do not retry together.
    """

    def __init__(
        self,
        base: float = 2.0,
        exponent_offset: float = 0.0,
        exponent_scalar: float = 1.0,
        max_delay: datetime.timedelta | None = datetime.timedelta(hours=1),
        jitter: float = 0.0,
    ) -> None:
        if base < 1:
            raise ValueError("base must be >= 1")
        if not 0 <= jitter <= 1:
            raise ValueError("jitter must be between 0 and 1")
        self.base = base
        self.exponent_offset = exponent_offset
        self.exponent_scalar = exponent_scalar
        self.max_delay = max_delay
        self.jitter = jitter

    def delay(self, attempts: int) -> datetime.timedelta:
        """The delay before the retry that follows attempt number ``attempts``."""
        exponent = self.exponent_offset + self.exponent_scalar * max(attempts - 1, 0)
        try:
            seconds = self.base**exponent
        except OverflowError:
            seconds = float("inf")
        if self.max_delay is not None:
            seconds = min(seconds, self.max_delay.total_seconds())
        seconds = min(seconds, datetime.timedelta.max.total_seconds() / 2)
        seconds *= 1 - random.uniform(0, self.jitter)
        return datetime.timedelta(seconds=seconds)

    def __call__(self, task: Any) -> Any:
        return func.now() + self.delay(task.attempts)


class LimitAttempt:
    """Allow at most ``maximum_attempt`` attempts in all, retrying with ``retry_policy``."""

    def __init__(self, maximum_attempt: int, retry_policy: RetryPolicy) -> None:
        if maximum_attempt < 1:
            raise ValueError("maximum_attempt must be >= 1")
        self.maximum_attempt = maximum_attempt
        self.retry_policy = retry_policy

    def __call__(self, task: Any) -> Any:
        if task.attempts >= self.maximum_attempt:
            return None
        return self.retry_policy(task)

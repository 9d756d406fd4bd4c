"""Processors: registered functions, their registry, and retry policies."""

from .processor import Processor, complete, fail
from .registry import ProcessorRegistry, processor
from .retry import DelayRetry, ExponentialBackoffRetry, LimitAttempt, RetryPolicy

__all__ = [
    "DelayRetry",
    "ExponentialBackoffRetry",
    "LimitAttempt",
    "Processor",
    "ProcessorRegistry",
    "RetryPolicy",
    "complete",
    "fail",
    "processor",
]

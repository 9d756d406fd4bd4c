"""What the peers' drivers share (standard library only: they run in the peers' own virtual
environments): the span of the jobs a process ran, and draining with worker processes."""

from __future__ import annotations

import json
import multiprocessing
import sys
import time
from collections.abc import Callable
from typing import Any

_first: float | None = None
_last = 0.0
_count = 0


def hit() -> None:
    """Called by each no-op job: counts it and stretches this process's span."""
    global _first, _last, _count
    now = time.time()
    if _first is None:
        _first = now
    _last = now
    _count += 1


def _work(run: Callable[..., None], arguments: tuple[Any, ...], results: Any) -> None:
    run(*arguments)
    results.put((_count, _first, _last))


def drain(run: Callable[..., None], workers: int, *arguments: Any) -> tuple[int, float]:
    """Run ``run(*arguments)`` (a peer's worker, until its queue is empty) in ``workers``
    processes at once; returns (jobs run, jobs per second from the first to the last)."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    processes = [
        context.Process(target=_work, args=(run, arguments, results)) for _ in range(workers)
    ]
    for process in processes:
        process.start()
    spans = [results.get() for _ in processes]
    for process in processes:
        process.join()
    count = sum(span[0] for span in spans)
    first = min(span[1] for span in spans if span[1] is not None)
    last = max(span[2] for span in spans)
    return count, count / (last - first)


def fill_and_drain(
    peer: str,
    fill: Callable[[], Any],
    count: int,
    run: Callable[..., None],
    workers: int,
    *arguments: Any,
) -> float:
    """``fill()`` the queue with ``count`` no-op jobs, then ``drain`` them; jobs per second.
    Raises if the workers ran another number of jobs."""
    fill()
    done, rate = drain(run, workers, *arguments)
    if done != count:
        raise RuntimeError(f"{peer} ran {done} of {count} jobs")
    return rate


def timed(count: int, step: Callable[[], None]) -> float:
    """``count`` calls of ``step`` per second."""
    started = time.perf_counter()
    for _ in range(count):
        step()
    return count / (time.perf_counter() - started)


def main(commands: dict[str, Callable[..., float]]) -> None:
    """``python DRIVER.py COMMAND DSN ARG…``: prints the command's figure as JSON."""
    command, dsn, *rest = sys.argv[1:]
    print(json.dumps(commands[command](dsn, *(int(a) for a in rest))))

"""procrastinate's side of the peer benchmarks (runs in its own virtual environment)."""

from __future__ import annotations

import logging

import procrastinate
import psycopg

from benchmarks.peers import span

logging.getLogger("procrastinate").setLevel(logging.ERROR)


def _app(dsn: str) -> procrastinate.App:
    app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=dsn))

    @app.task(name="noop", queue="bench")
    def noop() -> None:
        span.hit()

    return app


def install(dsn: str) -> float:
    app = _app(dsn)
    with app.open():
        app.schema_manager.apply_schema()
    return 0.0


def enqueue(dsn: str, count: int, per_transaction: int) -> float:
    """Jobs per second: ``defer`` of one job (its own transaction), or ``batch_defer``."""
    with psycopg.connect(dsn, autocommit=True) as connection:
        connection.execute("TRUNCATE procrastinate_jobs CASCADE")
    app = _app(dsn)
    noop = app.tasks["noop"]
    with app.open():
        if per_transaction == 1:
            return span.timed(count, noop.defer)
        return per_transaction * span.timed(
            count // per_transaction, lambda: noop.batch_defer(*[{}] * per_transaction)
        )


def _worker(dsn: str, concurrency: int) -> None:
    settings = {"concurrency": concurrency} if concurrency else {}
    _app(dsn).run_worker(queues=["bench"], wait=False, install_signal_handlers=False, **settings)


def drain(dsn: str, count: int, workers: int, concurrency: int) -> float:
    """Jobs per second draining ``count`` no-op jobs with ``workers`` processes
    (``concurrency`` 0: procrastinate's default)."""
    fill = lambda: enqueue(dsn, count, min(count, 1000))  # noqa: E731
    return span.fill_and_drain("procrastinate", fill, count, _worker, workers, dsn, concurrency)


if __name__ == "__main__":
    span.main({"install": install, "enqueue": enqueue, "drain": drain})

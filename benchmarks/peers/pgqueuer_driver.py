"""PgQueuer's side of the peer benchmarks (runs in PgQueuer's own virtual environment)."""

from __future__ import annotations

import asyncio

import asyncpg
from pgqueuer import AsyncpgDriver, PgQueuer, Queries
from pgqueuer.types import QueueExecutionMode

from benchmarks.peers import span


async def _queries(dsn: str) -> tuple[asyncpg.Connection, Queries]:
    connection = await asyncpg.connect(dsn)
    return connection, Queries(AsyncpgDriver(connection))


def install(dsn: str) -> float:
    async def run() -> None:
        connection, queries = await _queries(dsn)
        await queries.install()
        await connection.close()

    asyncio.run(run())
    return 0.0


def enqueue(dsn: str, count: int, per_transaction: int) -> float:
    """Jobs per second: ``enqueue`` of one job (its own transaction), or of a list."""

    async def run() -> float:
        connection, queries = await _queries(dsn)
        await connection.execute("TRUNCATE pgqueuer")
        loop = asyncio.get_running_loop()
        started = loop.time()
        for _ in range(count // per_transaction):
            if per_transaction == 1:
                await queries.enqueue("noop", None)
            else:
                n = per_transaction
                await queries.enqueue(["noop"] * n, [None] * n, [0] * n)
        rate = count / (loop.time() - started)
        await connection.close()
        return rate

    return asyncio.run(run())


def _worker(dsn: str, batch_size: int) -> None:
    async def run() -> None:
        connection = await asyncpg.connect(dsn)
        pgq = PgQueuer(AsyncpgDriver(connection))

        @pgq.entrypoint("noop")
        async def noop(job: object) -> None:
            span.hit()

        settings = {"batch_size": batch_size} if batch_size else {}
        await pgq.run(mode=QueueExecutionMode.drain, **settings)
        await connection.close()

    asyncio.run(run())


def drain(dsn: str, count: int, workers: int, batch_size: int) -> float:
    """Jobs per second draining ``count`` no-op jobs with ``workers`` processes
    (``batch_size`` 0: PgQueuer's default)."""
    fill = lambda: enqueue(dsn, count, 1000)  # noqa: E731
    return span.fill_and_drain("PgQueuer", fill, count, _worker, workers, dsn, batch_size)


if __name__ == "__main__":
    span.main({"install": install, "enqueue": enqueue, "drain": drain})

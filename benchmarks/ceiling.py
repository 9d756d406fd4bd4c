"""The raw-SQL ceiling: minimal psycopg2 loops over a minimal table, doing what beanflow does
(the same SKIP LOCKED claim, the same completion), with nothing else around them."""

from __future__ import annotations

import json
import select
import time

import psycopg2
import psycopg2.extras

SCHEMA = """
DROP TABLE IF EXISTS ceiling_tasks, ceiling_effects;
CREATE TABLE ceiling_tasks (
    id bigserial PRIMARY KEY,
    state text NOT NULL DEFAULT 'PENDING',
    kwargs jsonb NOT NULL DEFAULT '{}',
    scheduled_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    started_at timestamptz,
    finished_at timestamptz
);
CREATE INDEX ceiling_pending ON ceiling_tasks (scheduled_at) WHERE state = 'PENDING';
CREATE TABLE ceiling_effects (n integer);
"""

CLAIM = """
UPDATE ceiling_tasks SET state = 'PROCESSING', started_at = clock_timestamp()
WHERE id IN (SELECT id FROM ceiling_tasks WHERE state = 'PENDING' AND scheduled_at <= now()
             ORDER BY scheduled_at LIMIT %s FOR UPDATE SKIP LOCKED)
RETURNING id, kwargs
"""
COMPLETE = (
    "UPDATE ceiling_tasks SET state = 'DONE', finished_at = clock_timestamp() WHERE id = ANY(%s)"
)


def create(dsn: str) -> None:
    with psycopg2.connect(dsn) as connection, connection.cursor() as cursor:
        cursor.execute(SCHEMA)


def fill(dsn: str, count: int) -> None:
    with psycopg2.connect(dsn) as connection, connection.cursor() as cursor:
        cursor.execute("TRUNCATE ceiling_tasks, ceiling_effects")
        cursor.execute(
            "INSERT INTO ceiling_tasks (kwargs) SELECT jsonb_build_object('n', n) "
            "FROM generate_series(1, %s) AS n",
            (count,),
        )


def drain(dsn: str, batch: int, write: bool = False) -> None:
    """Claim ``batch`` (commit), complete them (with a user row each if ``write``) in one
    commit; until the queue is empty. Run in as many processes as workers."""
    connection = psycopg2.connect(dsn)
    cursor = connection.cursor()
    while True:
        cursor.execute(CLAIM, (batch,))
        rows = cursor.fetchall()
        connection.commit()
        if not rows:
            break
        for _, kwargs in rows:
            if write:
                cursor.execute("INSERT INTO ceiling_effects (n) VALUES (%s)", (kwargs["n"],))
        cursor.execute(COMPLETE, ([row[0] for row in rows],))
        connection.commit()
    connection.close()


def drained_rate(dsn: str) -> float:
    with psycopg2.connect(dsn) as connection, connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*), extract(epoch FROM max(finished_at) - min(started_at)) "
            "FROM ceiling_tasks WHERE state = 'DONE'"
        )
        done, seconds = cursor.fetchone()
    return done / float(seconds)


def enqueue(dsn: str, count: int, per_transaction: int) -> float:
    """Insert ``count`` tasks, ``per_transaction`` per commit (one INSERT each); tasks/s."""
    connection = psycopg2.connect(dsn)
    cursor = connection.cursor()
    rows = [(json.dumps({"n": n}),) for n in range(per_transaction)]
    started = time.perf_counter()
    for _ in range(count // per_transaction):
        if per_transaction == 1:
            cursor.execute("INSERT INTO ceiling_tasks (kwargs) VALUES (%s)", rows[0])
        else:
            psycopg2.extras.execute_values(
                cursor,
                "INSERT INTO ceiling_tasks (kwargs) VALUES %s",
                rows,
                page_size=per_transaction,
            )
        cursor.execute("NOTIFY ceiling")
        connection.commit()
    elapsed = time.perf_counter() - started
    connection.close()
    return count / elapsed


def enqueue_task_rows(dsn: str, count: int) -> float:
    """Insert ``count`` rows into beanflow's own task table, one per commit, with the NOTIFY in
    the statement (as ``enqueue`` sends them); tasks/s: what that table costs by itself."""
    connection = psycopg2.connect(dsn)
    cursor = connection.cursor()
    started = time.perf_counter()
    for _ in range(count):
        cursor.execute(
            "INSERT INTO beanflow_tasks (id, channel, module, name, kwargs, state, attempts, "
            "crash_count) VALUES (gen_random_uuid(), 'bench', 'benchmarks.processors', 'noop', "
            "'{}', 'PENDING', 0, 0) RETURNING pg_notify('bench', '')"
        )
        connection.commit()
    elapsed = time.perf_counter() - started
    connection.close()
    return count / elapsed


def listen_and_claim(dsn: str, ready, stop) -> None:
    """W3's ceiling: sleep on LISTEN, claim one task per notify, complete it."""
    listener = psycopg2.connect(dsn)
    listener.autocommit = True
    listener.cursor().execute("LISTEN ceiling")
    connection = psycopg2.connect(dsn)
    cursor = connection.cursor()
    ready.set()
    while not stop.is_set():
        if select.select([listener], [], [], 0.2)[0]:
            listener.poll()
            listener.notifies.clear()
            while True:
                cursor.execute(CLAIM, (1,))
                rows = cursor.fetchall()
                connection.commit()
                if not rows:
                    break
                cursor.execute(COMPLETE, ([rows[0][0]],))
                connection.commit()

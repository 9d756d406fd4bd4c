"""beanflow's benchmarks: ``python -m benchmarks [--quick] [--database-url URL]``.

Each run creates its own database on the server (BEANFLOW_DATABASE_URL, --database-url, or
the embedded one), prints a table of figures and drops the database. Figures, not verdicts:
nothing here passes or fails.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

from sqlalchemy import create_engine, func, text
from sqlalchemy.engine import make_url

import beanflow as bq
from beanflow.engine.queries import Queries, channel_parameters

from .workload import noop

ROOT = Path(__file__).resolve().parent.parent


@contextmanager
def scratch_database(server_url: str) -> Iterator[str]:
    """A new database with beanflow's tables, dropped afterwards."""
    name = f"beanflow_bench_{uuid.uuid4().hex[:10]}"
    admin = create_engine(server_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(server_url).set(database=name).render_as_string(hide_password=False)
    try:
        bq.BeanQueue(bq.Config(env={}, DATABASE_URL=url)).create_tables()
        yield url
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def start_workers(url: str, count: int, burst: bool, **settings: object) -> list:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BEANFLOW_")}
    env |= {f"BEANFLOW_{k}": str(v) for k, v in settings.items()}
    env |= {"BEANFLOW_DATABASE_URL": url, "PYTHONPATH": str(ROOT)}
    command = [
        sys.executable,
        "-m",
        "beanflow",
        "--log-level",
        "WARNING",
        "-a",
        "benchmarks.workload:app",
        "process",
        "bench",
    ] + (["--burst"] if burst else [])
    return [subprocess.Popen(command, cwd=ROOT, env=env) for _ in range(count)]


def stop(processes: list) -> None:
    for process in processes:
        process.terminate()
    for process in processes:
        process.wait(60)


def wait_until(check: Callable[[], bool], timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError("benchmark did not finish")
        time.sleep(0.01)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def claim_time(url: str, pending: int, samples: int) -> dict[str, float]:
    """Median and p99 of claim + commit (batch 1) with ``pending`` rows waiting."""
    app = bq.BeanQueue(bq.Config(env={}, DATABASE_URL=url))
    queries = Queries(bq.Task, bq.Worker, bq.Event)
    worker = uuid.uuid4()
    with app.engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO beanflow_tasks (channel, module, name, id) SELECT 'bench', "
                "'benchmarks.workload', 'noop', gen_random_uuid() FROM generate_series(1, :n)"
            ),
            {"n": pending},
        )
        connection.execute(
            text(
                "INSERT INTO beanflow_workers (id, name, channels) VALUES (:id, 'bench', '{bench}')"
            ),
            {"id": worker},
        )
    with app.engine.begin() as connection:
        connection.execute(text("ANALYZE beanflow_tasks"))
    timings = []
    parameters = {"worker": worker, "limit": 1} | channel_parameters(["bench"])
    with app.engine.connect() as connection:
        for _ in range(samples):
            started = time.perf_counter()
            connection.execute(queries.claim, parameters).all()
            connection.commit()
            timings.append((time.perf_counter() - started) * 1000)
    app.engine.dispose()
    return {"median_ms": statistics.median(timings), "p99_ms": percentile(timings, 99)}


def drain_rate(url: str, tasks: int, workers: int, batch: int) -> float:
    """Tasks/s from the first claim to the last completion, read from the database."""
    app = bq.BeanQueue(bq.Config(env={}, DATABASE_URL=url))
    with app.engine.begin() as connection:
        connection.execute(text("TRUNCATE beanflow_events, beanflow_tasks CASCADE"))
    with app.session_factory() as session:
        for start in range(0, tasks, 1000):
            bq.enqueue_many(session, noop, [{}] * min(1000, tasks - start))
        session.commit()
    for process in start_workers(url, workers, burst=True, BATCH_SIZE=batch):
        process.wait(600)
    with app.engine.connect() as connection:
        done, seconds = connection.execute(
            text(
                "SELECT count(*), extract(epoch FROM max(finished_at) - min(started_at)) "
                "FROM beanflow_tasks WHERE state = 'DONE'"
            )
        ).one()
    app.engine.dispose()
    assert done == tasks, f"only {done} of {tasks} tasks done"
    return done / float(seconds)


def wake_up_latency(url: str, tasks: int, every: float) -> dict[str, float]:
    """start − commit for tasks committed one at a time to an idle worker."""
    app = bq.BeanQueue(bq.Config(env={}, DATABASE_URL=url))
    processes = start_workers(url, 1, burst=False, POLL_TIMEOUT=3600)
    latencies = []
    try:
        with app.session_factory() as session:
            wait_until(
                lambda: (
                    session.scalar(
                        text("SELECT count(*) FROM beanflow_workers WHERE state = 'RUNNING'")
                    )
                    == 1
                )
            )
            for n in range(tasks + 1):
                task = bq.enqueue(session, noop)
                session.commit()
                committed = time.time()
                wait_until(
                    lambda task=task: session.scalar(
                        text("SELECT started_at IS NOT NULL FROM beanflow_tasks WHERE id = :id"),
                        {"id": task.id},
                    )
                )
                started = session.scalar(
                    text(
                        "SELECT extract(epoch FROM started_at) FROM beanflow_tasks WHERE id = :id"
                    ),
                    {"id": task.id},
                )
                if n:  # the first task warms the worker up
                    latencies.append((float(started) - committed) * 1000)
                time.sleep(every)  # the workload's pace, not a synchronisation
    finally:
        stop(processes)
        app.engine.dispose()
    return {
        "p50_ms": percentile(latencies, 50),
        "p95_ms": percentile(latencies, 95),
        "p99_ms": percentile(latencies, 99),
    }


def schedule_lateness(url: str, tasks: int, ahead: float) -> dict[str, float]:
    """started_at − scheduled_at for tasks scheduled ``ahead`` seconds ahead."""
    app = bq.BeanQueue(bq.Config(env={}, DATABASE_URL=url))
    processes = start_workers(url, 1, burst=False, POLL_TIMEOUT=60)
    try:
        with app.session_factory() as session:
            ids = []
            for n in range(tasks):
                task = noop.run()
                task.scheduled_at = func.clock_timestamp() + timedelta(seconds=ahead + n * 0.05)
                session.add(task)
                session.commit()
                ids.append(task.id)
            wait_until(
                lambda: (
                    session.scalar(
                        text(
                            "SELECT count(*) FROM beanflow_tasks "
                            "WHERE state = 'DONE' AND id = ANY(:ids)"
                        ),
                        {"ids": ids},
                    )
                    == tasks
                )
            )
            lateness = [
                float(v) * 1000
                for v in session.scalars(
                    text(
                        "SELECT extract(epoch FROM started_at - scheduled_at) FROM beanflow_tasks "
                        "WHERE id = ANY(:ids)"
                    ),
                    {"ids": ids},
                )
            ]
    finally:
        stop(processes)
        app.engine.dispose()
    return {"p50_ms": percentile(lateness, 50), "p99_ms": percentile(lateness, 99)}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks")
    parser.add_argument("--quick", action="store_true", help="small counts (CI)")
    parser.add_argument("--database-url", default=os.environ.get("BEANFLOW_DATABASE_URL"))
    parser.add_argument("--json", type=Path, help="also write the figures here")
    arguments = parser.parse_args()
    server_url = bq.db.database_url(bq.Config(env={}, DATABASE_URL=arguments.database_url))
    quick = arguments.quick
    figures: dict[str, object] = {}
    with scratch_database(server_url) as url:
        engine = create_engine(url)
        with engine.connect() as connection:
            figures["server"] = connection.execute(text("SHOW server_version")).scalar()
            figures["fsync"] = connection.execute(text("SHOW fsync")).scalar()
            figures["synchronous_commit"] = connection.execute(
                text("SHOW synchronous_commit")
            ).scalar()
        engine.dispose()
        pending = 10_000 if quick else 100_000
        figures[f"claim at {pending:,} pending"] = claim_time(url, pending, 50 if quick else 500)
        drained = 2_000 if quick else 20_000
        for workers in (1, 4):
            for batch in (1, 10):
                figures[f"drain {drained:,}, {workers} worker(s), batch {batch} (tasks/s)"] = round(
                    drain_rate(url, drained, workers, batch)
                )
        figures["wake-up latency"] = wake_up_latency(url, 20 if quick else 200, 0.02)
        figures["lateness, scheduled 2 s ahead"] = schedule_lateness(url, 5 if quick else 20, 2.0)
    for name, value in figures.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k} {v:.2f}" for k, v in value.items())
        print(f"{name:<52} {value}")
    if arguments.json:
        arguments.json.write_text(json.dumps(figures, indent=2, default=str))


if __name__ == "__main__":
    main()

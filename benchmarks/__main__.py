"""beanflow's benchmark suite: ``python -m benchmarks [--quick] [--database-url URL]``.

Every workload runs beanflow and, in the same run on the same server, a raw-SQL ceiling
(``benchmarks/ceiling.py``); the table shows both and their ratio. Each run creates its own
database (on BEANFLOW_DATABASE_URL, --database-url, or the embedded server) and drops it.
Figures, not verdicts: nothing here passes or fails.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import multiprocessing
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, func, text
from sqlalchemy.engine import make_url

import beanflow as bq
from beanflow import ops
from beanflow.workflows import Workflows

from . import ceiling, peers, processors
from .processors import noop, sleep_for, write_row

ROOT = Path(__file__).resolve().parent.parent
CPU_TASKS = 20_000  # the tasks of a measure of CPU per task, quick or not


@dataclasses.dataclass
class Sizes:
    repeats: int
    enqueue: int
    drain: int
    stream_seconds: float
    scheduled: int
    scheduled_spread: float
    deep: int
    deep_drain: int
    end_to_end: int
    stale: int
    slow: tuple[int, float]  # the mixed workload's slow tasks: how many, how long
    mixed: int  # and its no-op tasks
    purged: int  # old finished rows purged while a drain runs
    dashboard: tuple[int, int]  # the dashboard's table: task rows, event rows


FULL = Sizes(
    repeats=3,
    enqueue=20_000,
    drain=20_000,
    stream_seconds=20,
    scheduled=200,
    scheduled_spread=9,
    deep=1_000_000,
    deep_drain=20_000,
    end_to_end=20_000,
    stale=200_000,
    slow=(8, 2.0),
    mixed=4_000,
    purged=1_000_000,
    dashboard=(1_000_000, 10_000_000),
)
QUICK = Sizes(
    repeats=1,
    enqueue=2_000,
    drain=2_000,
    stream_seconds=3,
    scheduled=20,
    scheduled_spread=2,
    deep=100_000,
    deep_drain=2_000,
    end_to_end=1_000,
    stale=20_000,
    slow=(4, 0.5),
    mixed=1_000,
    purged=100_000,
    dashboard=(100_000, 1_000_000),
)


@dataclasses.dataclass
class Figure:
    name: str
    unit: str
    beanflow: float
    ceiling: float | None = None
    higher_is_better: bool = True

    @property
    def ratio(self) -> float | None:
        if self.ceiling in (None, 0):
            return None
        return (
            self.beanflow / self.ceiling if self.higher_is_better else self.ceiling / self.beanflow
        )


class Bench:
    """One benchmark database, with beanflow's tables and the ceiling's."""

    def __init__(self, url: str, sizes: Sizes, worker_log: Path) -> None:
        self.url = url
        self.sizes = sizes
        self.worker_log = worker_log.open("w")  # the workers' own log lines, at their defaults
        self.dsn = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
        self.app = bq.BeanQueue(bq.Config(env={}, DATABASE_URL=url))
        self.app.create_tables()
        with self.app.engine.begin() as connection:
            connection.execute(text("CREATE TABLE bench_effects (n integer)"))
        ceiling.create(self.dsn)
        self.noop_rates: dict[tuple[int, int | None], float] = {}

    def sql(self, statement: str, **parameters: Any) -> Any:
        with self.app.engine.begin() as connection:
            result = connection.execute(text(statement), parameters)
            return result.first() if result.returns_rows else None

    def reset(self) -> None:
        self.sql(
            "TRUNCATE beanflow_events, beanflow_tasks, beanflow_workers, bench_effects, "
            "beanflow_workflow_steps, beanflow_workflow_runs CASCADE"
        )

    def median(self, run: Callable[[], float]) -> float:
        return statistics.median(run() for _ in range(self.sizes.repeats))

    # ---- beanflow's side ------------------------------------------------------------------

    def workers(self, count: int, burst: bool, **settings: Any) -> list[subprocess.Popen]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("BEANFLOW_")}
        env |= {f"BEANFLOW_{k}": str(v) for k, v in settings.items()}
        env |= {"BEANFLOW_DATABASE_URL": self.url, "PYTHONPATH": str(ROOT)}
        command = [
            sys.executable,
            "-m",
            "beanflow",
            "-a",
            "benchmarks.processors:app",
            "process",
            "bench",
        ]
        return [
            subprocess.Popen(
                command + (["--burst"] if burst else []),
                cwd=ROOT,
                env=env,
                stderr=self.worker_log,
            )
            for _ in range(count)
        ]

    def enqueue_rate(self, per_transaction: int) -> float:
        self.reset()
        count = self.sizes.enqueue
        with self.app.session_factory() as session:
            started = time.perf_counter()
            for _ in range(count // per_transaction):
                if per_transaction == 1:
                    bq.enqueue(session, noop)
                else:
                    bq.enqueue_many(session, noop, [{}] * per_transaction)
                session.commit()
            return count / (time.perf_counter() - started)

    def fill(self, processor: bq.Processor, count: int) -> None:
        self.reset()
        with self.app.session_factory() as session:
            for start in range(0, count, 1000):
                bq.enqueue_many(
                    session,
                    processor,
                    [
                        {"n": n} if processor is write_row else {}
                        for n in range(start, min(start + 1000, count))
                    ],
                )
            session.commit()

    def drain_rate(self, workers: int, batch: int | None, processor: bq.Processor = noop) -> float:
        """Tasks/s draining a full queue; ``batch`` None: the default settings."""
        self.fill(processor, self.sizes.drain if processor is noop else self.sizes.end_to_end)
        return self.burst_rate(workers, **({} if batch is None else {"BATCH_SIZE": batch}))

    def worker_cpu(self, batch: int) -> float:
        """µs of CPU one burst worker process spends per no-op task draining W2's queue at
        ``batch``, its start and stop (a burst over an empty queue) left out. Always 20,000
        tasks: fewer are not much more than the start-up's own variation."""
        self.reset()
        idle = child_cpu(lambda: wait_for(self.workers(1, burst=True, BATCH_SIZE=batch)))
        self.fill(noop, CPU_TASKS)
        busy = child_cpu(lambda: wait_for(self.workers(1, burst=True, BATCH_SIZE=batch)))
        return (busy - idle) / CPU_TASKS * 1e6

    def burst_rate(self, workers: int, **settings: Any) -> float:
        """Tasks/s of ``workers`` burst workers draining what is queued."""
        wait_for(self.workers(workers, burst=True, **settings))
        return self.done_rate()

    def mixed(self) -> tuple[float, float, float]:
        """Slow tasks among many no-op ones, 4 workers, default settings: (seconds to drain,
        the ideal (work ÷ workers, no-op time counted at the W2 rate), the longest a no-op
        task was held by a worker from its claim to its completion, in seconds)."""
        self.reset()
        count, seconds = self.sizes.slow
        with self.app.session_factory() as session:
            bq.enqueue_many(session, noop, [{}] * (self.sizes.mixed // 2))
            bq.enqueue_many(session, sleep_for, [{"seconds": seconds}] * count)
            bq.enqueue_many(session, noop, [{}] * (self.sizes.mixed - self.sizes.mixed // 2))
            session.commit()
        total_count = count + self.sizes.mixed
        processes = self.workers(4, burst=False)  # burst workers would leave as the queue
        wait_until(  # looks empty, before the slow tasks' batches give their rest back
            lambda: (
                self.sql("SELECT count(*) FROM beanflow_tasks WHERE state = 'DONE'")[0]
                == total_count
            ),
            pause=0.1,
        )
        stop(processes)
        total, held = self.sql(
            "SELECT extract(epoch FROM max(finished_at) - min(started_at)), "
            "extract(epoch FROM max(finished_at - started_at) FILTER (WHERE name = 'noop')) "
            "FROM beanflow_tasks WHERE state = 'DONE'"
        )
        return float(total), float(held)

    def noop_rate(self, workers: int, batch: int | None) -> float:
        """W2's median drain rate of no-op tasks, measured once per run and settings."""
        key = (workers, batch)
        if key not in self.noop_rates:
            self.noop_rates[key] = self.median(lambda: self.drain_rate(workers, batch))
        return self.noop_rates[key]

    def done_rate(self) -> float:
        done, seconds = self.sql(
            "SELECT count(*), extract(epoch FROM max(finished_at) - min(started_at)) "
            "FROM beanflow_tasks WHERE state = 'DONE'"
        )
        return done / float(seconds)

    def deep_rate(self, workers: int, batch: int) -> float:
        """Drain the first tasks of a queue holding ``sizes.deep`` pending ones."""
        self.reset()
        self.sql(
            "INSERT INTO beanflow_tasks (id, channel, module, name) SELECT "
            "gen_random_uuid(), 'bench', 'benchmarks.processors', 'noop' "
            "FROM generate_series(1, :n)",
            n=self.sizes.deep,
        )
        self.sql("ANALYZE beanflow_tasks")
        processes = self.workers(workers, burst=False, BATCH_SIZE=batch)
        # progress read from the (small) events table: counting DONE rows among a million
        # would load the server the workers are measured on
        wait_until(
            lambda: (
                self.sql("SELECT count(*) FROM beanflow_events WHERE type = 'COMPLETE'")[0]
                >= self.sizes.deep_drain
            ),
            pause=0.1,
        )
        stop(processes)
        return self.done_rate()

    def stale_rates(self) -> tuple[float, float]:
        """Drain rates (first 10 %, last 10 %) of ``sizes.stale`` tasks inserted in bulk and
        drained at once by one worker at batch 10, on a table never analyzed nor vacuumed in
        between (a fresh deployment, autovacuum behind): a statement whose cost grew with the
        dead tuples of finished tasks would show here as a decay. Autovacuum is off for the
        event history too: its inserts (two per task) start VACUUMs and ANALYZEs of it during
        the drain, which land in the last tenth in some runs and not in others."""
        self.reset()
        for table in ("beanflow_tasks", "beanflow_events"):
            self.sql(f"ALTER TABLE {table} SET (autovacuum_enabled = false)")
        self.sql(
            "INSERT INTO beanflow_tasks (id, channel, module, name) SELECT "
            "gen_random_uuid(), 'bench', 'benchmarks.processors', 'noop' "
            "FROM generate_series(1, :n)",
            n=self.sizes.stale,
        )
        for process in self.workers(1, burst=True, BATCH_SIZE=10):
            process.wait()
        for table in ("beanflow_tasks", "beanflow_events"):
            self.sql(f"ALTER TABLE {table} RESET (autovacuum_enabled)")
        with self.app.engine.connect() as connection:
            times = (
                connection.execute(
                    text(
                        "SELECT extract(epoch FROM finished_at) FROM beanflow_tasks "
                        "WHERE state = 'DONE' ORDER BY finished_at"
                    )
                )
                .scalars()
                .all()
            )
        tenth = len(times) // 10
        first = tenth / float(times[tenth] - times[0])
        last = tenth / float(times[-1] - times[-1 - tenth])
        return first, last

    def drain_while_purging(self) -> tuple[float, bool]:
        """W2's drain (4 workers, default settings) while retention purges ``sizes.purged``
        finished rows a month old, chunk by chunk; (tasks/s, whether the purge was still
        running when the drain ended)."""
        self.reset()
        self.sql(
            "INSERT INTO beanflow_tasks (id, channel, module, name, state, finished_at) SELECT "
            "gen_random_uuid(), 'old', 'benchmarks.processors', 'noop', 'DONE', "
            "now() - interval '30 days' FROM generate_series(1, :n)",
            n=self.sizes.purged,
        )
        self.sql("ANALYZE beanflow_tasks")
        operations = ops.Operations(self.app)
        purging = threading.Thread(  # as a running deployment's retention does
            target=operations.purge_all,
            args=(ops.Retention(),),
            kwargs={"pause": ops.RetentionService.PAUSE},
        )
        purging.start()
        with self.app.session_factory() as session:
            bq.enqueue_many(session, noop, [{}] * self.sizes.drain)
            session.commit()
        for process in self.workers(4, burst=True):
            process.wait()
        still_purging = purging.is_alive()
        purging.join()
        done, seconds = self.sql(
            "SELECT count(*), extract(epoch FROM max(finished_at) - min(started_at)) "
            "FROM beanflow_tasks WHERE state = 'DONE' AND channel = 'bench'"
        )
        return done / float(seconds), still_purging

    def dashboard_pages(self) -> dict[str, float]:
        """Server time (ms, median of 20) of each dashboard page over ``sizes.dashboard``
        task and event rows: a month of history, 1% pending, 1% failed, 10 events per task,
        analyzed as autovacuum would have."""
        from starlette.testclient import TestClient

        from beanflow.dashboard.web import create_app

        tasks, events = self.sizes.dashboard
        self.reset()
        self.sql(
            "INSERT INTO beanflow_tasks (id, channel, module, name, state, created_at, "
            "scheduled_at, started_at, finished_at, error_message) SELECT gen_random_uuid(), "
            "'c' || (n % 4), 'm', 'f' || (n % 7), s, at, at, at, "
            "CASE WHEN s = 'PENDING' THEN NULL ELSE at END, "
            "CASE WHEN s = 'FAILED' THEN 'E: failure ' || n END FROM (SELECT n, "
            "now() - n * (interval '30 days' / :n) AS at, CASE WHEN n % 100 = 1 THEN 'PENDING' "
            "WHEN n % 100 = 2 THEN 'FAILED' ELSE 'DONE' END AS s "
            "FROM generate_series(1, :n) AS n) AS rows",
            n=tasks,
        )
        with self.app.engine.begin() as connection:  # no foreign-key check per row
            connection.execute(text("SET LOCAL session_replication_role = replica"))
            connection.execute(
                text(
                    "INSERT INTO beanflow_events (task_id, type, created_at) SELECT id, "
                    "'CLAIMED', created_at FROM beanflow_tasks, generate_series(1, :per)"
                ),
                {"per": events // tasks},
            )
        self.sql("ANALYZE")
        client = TestClient(create_app(ops.Operations(self.app)))
        failed = self.sql("SELECT id FROM beanflow_tasks WHERE state = 'FAILED' LIMIT 1")[0]
        pages = {
            "overview": "/",
            "tasks": "/tasks",
            "tasks, failed of one channel": "/tasks?state=FAILED&channel=c2",
            "tasks, error text": "/tasks?error=failure+12345",
            "tasks, page 2": None,
            "a task with its events": f"/tasks/{failed}",
            "workers": "/workers",
        }
        first = client.get("/tasks").text
        cursor = first.split('href="?after=', 1)[1].split('"', 1)[0].replace("&amp;", "&")
        pages["tasks, page 2"] = "/tasks?after=" + cursor
        timings = {}
        for name, path in pages.items():
            times = []
            for _ in range(20):
                started = time.perf_counter()
                assert client.get(path).status_code == 200, path
                times.append((time.perf_counter() - started) * 1000)
            timings[name] = statistics.median(times)
        return timings

    def workflow_rate(self, kind: str, workers: int, batch: int | None = 10) -> float:
        """Step tasks/s draining ``sizes.drain`` no-op steps at ``batch`` (None: the default
        settings): runs of a chain of four steps (each completion releases the next in its
        transaction), or one run fanning out over them (each completion counts its slot down;
        the one that ends the step releases the end)."""
        self.reset()
        count = self.sizes.drain
        flows = Workflows(self.app, processors.WORKFLOWS.definitions)
        with self.app.session_factory() as session:
            if kind == "chain":
                for _ in range(count // 4):
                    flows.start(session, "chain")
            else:
                flows.start(session, "fan", {"items": list(range(count))})
            session.commit()
        rate = self.burst_rate(workers, **({} if batch is None else {"BATCH_SIZE": batch}))
        unfinished = "SELECT count(*) FROM beanflow_workflow_runs WHERE state <> 'DONE'"
        assert self.sql(unfinished)[0] == 0, "every run completes"
        return rate

    def hand_chain_rate(self, workers: int) -> float:
        """W11's chains written by hand: tasks/s draining ``sizes.drain`` tasks at batch 10,
        each of a chain of four enqueuing the next in its own transaction."""
        self.reset()
        with self.app.session_factory() as session:
            bq.enqueue_many(session, processors.hop, [{"left": 3}] * (self.sizes.drain // 4))
            session.commit()
        return self.burst_rate(workers, BATCH_SIZE=10)

    def step_latency(self) -> tuple[list[float], list[float], list[float]]:
        """Runs of two steps started every 20 ms on one idle worker, in ms: the dependent's
        start − the moment its upstream's commit returned in the worker (its upstream notes
        it: ``processors.first``); the dependent's start − its claim, made in that
        transaction (the commit's own duration included); and the dependent's claim − its
        upstream's completion statement (the progression's cost)."""
        self.reset()
        flows = Workflows(self.app, processors.WORKFLOWS.definitions)
        processes = self.workers(1, burst=False, POLL_TIMEOUT=3600)
        wait_until(lambda: self.sql("SELECT count(*) FROM beanflow_workers")[0] == 1)

        def add(session: Any) -> uuid.UUID:
            return flows.start(session, "pair").id

        started = stream(add, self.app.session_factory, self.sizes.stream_seconds)
        wait_until(
            lambda: (
                self.sql("SELECT count(*) FROM beanflow_workflow_runs WHERE state = 'DONE'")[0]
                == len(started)
            )
        )
        stop(processes)
        with self.app.engine.connect() as connection:
            rows = connection.execute(
                text(
                    "SELECT ((b.result->>0)::float8 - (b.result->>1)::float8) * 1000, "
                    "((b.result->>0)::float8 - extract(epoch FROM b.started_at)) * 1000, "
                    "extract(epoch FROM b.started_at - a.finished_at) * 1000 "
                    "FROM beanflow_workflow_steps sa JOIN beanflow_tasks a ON a.id = sa.task_id "
                    "JOIN beanflow_workflow_steps sb ON sb.run_id = sa.run_id AND sb.step = 'b' "
                    "JOIN beanflow_tasks b ON b.id = sb.task_id WHERE sa.step = 'a'"
                )
            ).all()
        assert all(row[0] is not None for row in rows), "each upstream commit was noted"
        return tuple([float(row[i]) for row in rows] for i in range(3))

    def plain_wake_ups(self) -> list[float]:
        """W3's wake-up latencies (measured once per run)."""
        if not hasattr(self, "_wake_ups"):
            self._wake_ups = self.wake_up()
        return self._wake_ups

    def wake_up(self) -> list[float]:
        """start − commit (ms) of tasks committed every 20 ms to one idle worker."""
        self.reset()
        processes = self.workers(1, burst=False, POLL_TIMEOUT=3600)
        wait_until(lambda: self.sql("SELECT count(*) FROM beanflow_workers")[0] == 1)

        def add(session: Any) -> uuid.UUID:
            return bq.enqueue(session, noop).id

        committed = stream(add, self.app.session_factory, self.sizes.stream_seconds)
        wait_until(
            lambda: self.sql("SELECT count(*) FROM beanflow_tasks WHERE started_at IS NULL")[0] == 0
        )
        stop(processes)
        return self.latencies("beanflow_tasks", committed)

    # a backend reports its counts when it goes idle, at most this many seconds late
    STATS_DELAY = 11.0
    IDLE_SECONDS = 10.0

    def commit_counts(self) -> tuple[float, float]:
        """(commits per task, the enqueuer's one included; commits per second of an idle
        worker), as the server counts them, for tasks committed every 20 ms to one worker."""
        self.reset()
        processes = self.workers(1, burst=False, POLL_TIMEOUT=3600)
        wait_until(lambda: self.sql("SELECT count(*) FROM beanflow_workers")[0] == 1)
        before = self.commits()
        count = round(self.sizes.stream_seconds / 0.02)
        with self.app.session_factory() as session:
            for _ in range(count):
                bq.enqueue(session, noop)
                session.commit()
                time.sleep(0.02)  # the workload's pace
        polls = wait_until(
            lambda: (
                self.sql("SELECT count(*) FROM beanflow_tasks WHERE state = 'DONE'")[0] == count
            ),
            pause=0.2,
        )
        after = self.commits()
        per_task = (after - before - polls - 1) / count  # less this side's own reads
        time.sleep(self.IDLE_SECONDS)
        idle = (self.commits() - after - 1) / (self.IDLE_SECONDS + self.STATS_DELAY)
        stop(processes)
        return per_task, idle

    def commits(self) -> int:
        """Transactions committed in this database so far, by every session, as the server
        counts them once every backend has reported (the read itself is one more commit)."""
        time.sleep(self.STATS_DELAY)
        sql = "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"
        return int(self.sql(sql)[0])

    def latencies(self, table: str, committed: dict[Any, float]) -> list[float]:
        with self.app.engine.connect() as connection:
            started = dict(
                connection.execute(
                    text(f"SELECT id, extract(epoch FROM started_at) FROM {table}")
                ).all()
            )
        return [(float(started[key]) - at) * 1000 for key, at in committed.items()]

    def lateness(self) -> list[float]:
        """started_at − scheduled_at (ms) of tasks scheduled 1 s and more ahead."""
        self.reset()
        processes = self.workers(1, burst=False, POLL_TIMEOUT=60)
        count, spread = self.sizes.scheduled, self.sizes.scheduled_spread
        with self.app.session_factory() as session:
            for n in range(count):
                task = noop.run()
                task.scheduled_at = func.clock_timestamp() + timedelta(
                    seconds=1 + spread * n / count
                )
                session.add(task)
                session.commit()
        wait_until(
            lambda: self.sql("SELECT count(*) FROM beanflow_tasks WHERE state = 'DONE'")[0] == count
        )
        stop(processes)
        with self.app.engine.connect() as connection:
            return [
                float(v) * 1000
                for v in connection.execute(
                    text("SELECT extract(epoch FROM started_at - scheduled_at) FROM beanflow_tasks")
                ).scalars()
            ]

    # ---- the ceiling's side ---------------------------------------------------------------

    def ceiling_drain(self, workers: int, batch: int, write: bool = False) -> float:
        ceiling.fill(self.dsn, self.sizes.end_to_end if write else self.sizes.drain)
        run_processes(ceiling.drain, workers, self.dsn, batch, write)
        return ceiling.drained_rate(self.dsn)

    def ceiling_cpu(self, batch: int) -> float:
        """The same for the raw loop's process (a drain of an empty table left out)."""
        ceiling.fill(self.dsn, 0)
        idle = child_cpu(lambda: run_processes(ceiling.drain, 1, self.dsn, batch, False))
        ceiling.fill(self.dsn, CPU_TASKS)
        busy = child_cpu(lambda: run_processes(ceiling.drain, 1, self.dsn, batch, False))
        return (busy - idle) / CPU_TASKS * 1e6

    def ceiling_wake_up(self) -> list[float]:
        ceiling.fill(self.dsn, 0)
        context = multiprocessing.get_context("spawn")
        ready, done = context.Event(), context.Event()
        process = context.Process(target=ceiling.listen_and_claim, args=(self.dsn, ready, done))
        process.start()
        ready.wait(60)
        engine = create_engine(self.url)

        def insert(connection: Any) -> Any:
            row = connection.execute(
                text("INSERT INTO ceiling_tasks DEFAULT VALUES RETURNING id")
            ).scalar()
            connection.execute(text("NOTIFY ceiling"))
            return row

        committed = stream(insert, engine.connect, self.sizes.stream_seconds)
        wait_until(
            lambda: self.sql("SELECT count(*) FROM ceiling_tasks WHERE started_at IS NULL")[0] == 0
        )
        done.set()
        process.join()
        engine.dispose()
        return self.latencies("ceiling_tasks", committed)


def stream(
    add: Callable[[Any], Any], connect: Callable[[], Any], seconds: float
) -> dict[Any, float]:
    """Commit one task every 20 ms for ``seconds``; returns each task's commit time."""
    committed: dict[Any, float] = {}
    with connect() as session:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            key = add(session)
            session.commit()
            committed[key] = time.time()
            time.sleep(0.02)  # the workload's pace
    return committed


def run_processes(target: Callable[..., None], count: int, *args: Any) -> None:
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=target, args=args) for _ in range(count)]
    for process in processes:
        process.start()
    for process in processes:
        process.join()


def wait_for(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        process.wait()


def child_cpu(run: Callable[[], None]) -> float:
    """Seconds of CPU the child processes that ``run`` started and waited for spent."""
    before = os.times()
    run()
    after = os.times()
    return (
        after.children_user + after.children_system - before.children_user - before.children_system
    )


def stop(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        process.terminate()
    for process in processes:
        process.wait(120)


def wait_until(check: Callable[[], bool], timeout: float = 600, pause: float = 0.01) -> int:
    """Call ``check`` until it is true; returns how many times it was called."""
    deadline, calls = time.monotonic() + timeout, 1
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError("a benchmark did not finish")
        time.sleep(pause)
        calls += 1
    return calls


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


@contextlib.contextmanager
def scratch_database(server_url: str) -> Iterator[str]:
    name = f"beanflow_bench_{uuid.uuid4().hex[:10]}"
    admin = create_engine(server_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(server_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def enqueue(bench: Bench) -> list[Figure]:
    figures = [
        Figure(
            f"W1 enqueue, {n:,} per transaction",
            "tasks/s",
            bench.median(lambda n=n: bench.enqueue_rate(n)),
            bench.median(lambda n=n: ceiling.enqueue(bench.dsn, bench.sizes.enqueue, n)),
        )
        for n in (1, 1000)
    ]
    bench.reset()
    own_table = bench.median(lambda: ceiling.enqueue_task_rows(bench.dsn, bench.sizes.enqueue))
    return figures + [
        Figure(
            "W1 enqueue, 1 per transaction (ceiling: raw SQL, beanflow's table)",
            "tasks/s",
            figures[0].beanflow,
            own_table,
        )
    ]


def drain(bench: Bench) -> list[Figure]:
    figures = []
    for workers in (1, 4):
        figures.append(
            Figure(
                f"W2 drain, {workers} worker(s), default settings (ceiling: batch 100)",
                "tasks/s",
                bench.noop_rate(workers, None),
                bench.median(lambda w=workers: bench.ceiling_drain(w, 100)),
            )
        )
        for batch in (1, 10):
            figures.append(
                Figure(
                    f"W2 drain, {workers} worker(s), batch {batch}",
                    "tasks/s",
                    bench.noop_rate(workers, batch),
                    bench.median(lambda w=workers, b=batch: bench.ceiling_drain(w, b)),
                )
            )
    figures.append(
        Figure(
            "W2 CPU of the worker process per task, 1 worker, batch 10 (ceiling: the raw loop's)",
            "µs",
            bench.median(lambda: bench.worker_cpu(10)),
            bench.median(lambda: bench.ceiling_cpu(10)),
            higher_is_better=False,
        )
    )
    return figures


def wake_up(bench: Bench) -> list[Figure]:
    ours, theirs = bench.plain_wake_ups(), bench.ceiling_wake_up()
    figures = [
        Figure(
            f"W3 wake-up latency p{q}",
            "ms",
            percentile(ours, q),
            percentile(theirs, q),
            higher_is_better=False,
        )
        for q in (50, 95, 99)
    ]
    per_task, idle = bench.commit_counts()
    return figures + [
        Figure(
            "W3 commits per task, the enqueuer's one included",
            "commits",
            per_task,
            higher_is_better=False,
        ),
        Figure("W3 commits per second, one idle worker", "commits/s", idle, higher_is_better=False),
    ]


def lateness(bench: Bench) -> list[Figure]:
    late = bench.lateness()
    return [
        Figure(
            f"W4 lateness p{q}, due 1-{1 + bench.sizes.scheduled_spread:g} s ahead",
            "ms",
            percentile(late, q),
            higher_is_better=False,
        )
        for q in (50, 99)
    ]


def deep(bench: Bench) -> list[Figure]:
    s = bench.sizes
    return [
        Figure(
            f"W5 drain {s.deep_drain:,} of {s.deep:,} pending, 4 workers, "
            "batch 10 (ceiling: W2 on an empty table)",
            "tasks/s",
            bench.median(lambda: bench.deep_rate(4, 10)),
            bench.noop_rate(4, 10),
        )
    ]


def end_to_end(bench: Bench) -> list[Figure]:
    return [
        Figure(
            f"W6 end-to-end (a user row per task), {workers} worker(s), batch {batch}",
            "tasks/s",
            bench.median(lambda w=workers, b=batch: bench.drain_rate(w, b, write_row)),
            bench.median(lambda w=workers, b=batch: bench.ceiling_drain(w, b, write=True)),
        )
        for workers, batch in ((1, 1), (4, 10))
    ]


def stale(bench: Bench) -> list[Figure]:
    first, last = bench.stale_rates()
    return [
        Figure(
            f"W7 drain of a {bench.sizes.stale:,} bulk, never analyzed: last 10 % "
            "(ceiling: first 10 %)",
            "tasks/s",
            last,
            first,
        )
    ]


def mixed(bench: Bench) -> list[Figure]:
    count, seconds = bench.sizes.slow
    total, held = bench.mixed()
    ideal = (count * seconds + bench.sizes.mixed / bench.noop_rate(4, None) * 4) / 4
    return [
        Figure(
            f"W8 mixed: {count} tasks of {seconds:g} s and {bench.sizes.mixed:,} no-op, "
            "4 workers, defaults: seconds (ceiling: ideal)",
            "s",
            total,
            ideal,
            higher_is_better=False,
        ),
        Figure(
            "W8 longest a no-op task was held, claim to completion (ceiling: the window)",
            "s",
            held,
            bq.Config(env={}).BATCH_WINDOW,
            higher_is_better=False,
        ),
    ]


def purge_under_load(bench: Bench) -> list[Figure]:
    rate, overlapped = bench.drain_while_purging()
    note = "" if overlapped else " (the purge ended first)"
    return [
        Figure(
            f"W9 drain, 4 workers, defaults, while {bench.sizes.purged:,} old rows are purged"
            f"{note} (ceiling: W2)",
            "tasks/s",
            rate,
            bench.noop_rate(4, None),
        )
    ]


def dashboard(bench: Bench) -> list[Figure]:
    tasks, events = bench.sizes.dashboard
    return [
        Figure(f"W10 dashboard, {tasks:,} tasks, {events:,} events: {page}", "ms", ms)
        for page, ms in bench.dashboard_pages().items()
    ]


def workflows(bench: Bench) -> list[Figure]:
    kinds = (("chain", "chains of 4 steps"), ("fan", "one fan-out"))
    rates = {
        (kind, workers): bench.median(lambda k=kind, w=workers: bench.workflow_rate(k, w))
        for kind, _ in kinds
        for workers in (1, 4)
    }
    figures = (
        [
            Figure(
                f"W11 workflow steps drain, {workers} worker(s), batch 10, {label} "
                "(ceiling: W2 plain tasks)",
                "tasks/s",
                rates[kind, workers],
                bench.noop_rate(workers, 10),
            )
            for kind, label in kinds
            for workers in (1, 4)
        ]
        + [
            Figure(
                f"W11 workflow steps drain, {workers} worker(s), default settings, one fan-out "
                "(ceiling: W2 plain tasks, default settings)",
                "tasks/s",
                bench.median(lambda w=workers: bench.workflow_rate("fan", w, None)),
                bench.noop_rate(workers, None),
            )
            for workers in (1, 4)
        ]
        + [
            Figure(
                f"W11 workflow steps drain, {workers} worker(s), batch 10, chains of 4 steps "
                "(ceiling: the same chains by hand, each task enqueuing the next)",
                "tasks/s",
                rates["chain", workers],
                bench.median(lambda w=workers: bench.hand_chain_rate(w)),
            )
            for workers in (1, 4)
        ]
    )
    (from_commit, from_claim, progression), plain = bench.step_latency(), bench.plain_wake_ups()
    return (
        figures
        + [
            Figure(
                f"W11 step's commit → its dependent's start p{q} (ceiling: W3 wake-up)",
                "ms",
                percentile(from_commit, q),
                percentile(plain, q),
                higher_is_better=False,
            )
            for q in (50, 99)
        ]
        + [
            Figure(
                f"W11 dependent's claim → its start p{q} (its upstream's commit between)",
                "ms",
                percentile(from_claim, q),
            )
            for q in (50, 99)
        ]
        + [
            Figure(
                f"W11 step's completion → its dependent's claim p{q}",
                "ms",
                percentile(progression, q),
            )
            for q in (50, 99)
        ]
    )


WORKLOADS: dict[str, Callable[[Bench], list[Figure]]] = {
    "W1": enqueue,
    "W2": drain,
    "W3": wake_up,
    "W4": lateness,
    "W5": deep,
    "W6": end_to_end,
    "W8": mixed,
    "W7": stale,
    "W9": purge_under_load,
    "W10": dashboard,
    "W11": workflows,
}


def measure(bench: Bench, only: list[str]) -> list[Figure]:
    """The figures of every workload, or of those named in ``only``."""
    return [
        figure
        for name, workload in WORKLOADS.items()
        if not only or name in only
        for figure in workload(bench)
    ]


def print_side_by_side(figures: list[Figure], peer_figures: dict[str, dict[str, float]]) -> None:
    """W1 and W2 for beanflow, the raw-SQL ceiling and each peer, defaults and tuned."""
    ours = {f.name: f for f in figures}

    def w2(workers: int, setting: str) -> Figure:
        return ours[f"W2 drain, {workers} worker(s), {setting}"]

    rows = {
        "enqueue, 1 per transaction": (
            ours["W1 enqueue, 1 per transaction"],
            ours["W1 enqueue, 1 per transaction"],
            "enqueue 1",
            "enqueue 1",
        ),
        "enqueue, 1,000 per transaction": (
            ours["W1 enqueue, 1,000 per transaction"],
            ours["W1 enqueue, 1,000 per transaction"],
            "enqueue 1000",
            "enqueue 1000",
        ),
        **{
            f"drain, {w} worker(s)": (
                w2(w, "default settings (ceiling: batch 100)"),
                w2(w, "batch 10"),
                f"drain {w} defaults",
                f"drain {w} tuned",
            )
            for w in (1, 4)
        },
    }
    headers = ["tasks/s", "raw SQL", "beanflow defaults", "beanflow batch 10"]
    for peer in peers.PEERS:
        if peer.name in peer_figures:
            headers += [f"{peer.name} defaults", f"{peer.name} {peer.tuned_as}"]
    print()
    print("| " + " | ".join(headers) + " |")
    print("| --- |" + " ---: |" * (len(headers) - 1))
    for label, (default, tuned, peer_default, peer_tuned) in rows.items():
        cells = [f"{default.ceiling or 0:,.0f}", f"{default.beanflow:,.0f}"]
        cells.append("" if tuned is default else f"{tuned.beanflow:,.0f}")
        for peer in peers.PEERS:
            found = peer_figures.get(peer.name)
            if found:
                cells += [f"{found[peer_default]:,.0f}"]
                cells += ["" if peer_tuned == peer_default else f"{found[peer_tuned]:,.0f}"]
        print(f"| {label} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="small counts, one run each (under two minutes; CI runs it)",
    )
    parser.add_argument("--database-url", default=os.environ.get("BEANFLOW_DATABASE_URL"))
    parser.add_argument(
        "--only",
        nargs="+",
        choices=sorted(WORKLOADS),
        default=[],
        metavar="W",
        help="run only these workloads (W1 … W8; default: all)",
    )
    parser.add_argument(
        "--peers",
        action="store_true",
        help="also run W1 and W2 against PgQueuer and procrastinate (installed from PyPI in "
        "virtual environments of their own) and print them side by side",
    )
    parser.add_argument(
        "--json",
        type=Path,
        default=Path("benchmarks/results.json"),
        help="where to write the figures (default %(default)s)",
    )
    arguments = parser.parse_args()
    sizes = QUICK if arguments.quick else FULL
    if arguments.peers and arguments.only:
        arguments.only = sorted(set(arguments.only) | {"W1", "W2"})
    server_url = bq.db.database_url(bq.Config(env={}, DATABASE_URL=arguments.database_url))
    with scratch_database(server_url) as url:
        bench = Bench(url, sizes, arguments.json.with_name("workers.log"))
        settings = {
            name: bench.sql(f"SHOW {name}")[0]
            for name in ("server_version", "fsync", "synchronous_commit")
        }
        started = time.monotonic()
        figures = measure(bench, arguments.only)
        bench.app.engine.dispose()
    peer_figures = {}
    for peer in peers.PEERS if arguments.peers else ():
        with scratch_database(server_url) as url:
            dsn = make_url(url).set(drivername="postgresql").render_as_string(False)
            peer_figures[peer.name] = peers.measure(peer, dsn, sizes, sizes.repeats)
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    print(
        f"PostgreSQL {settings['server_version']} (fsync={settings['fsync']}, "
        f"synchronous_commit={settings['synchronous_commit']}); {machine}; "
        f"{'quick' if arguments.quick else f'median of {sizes.repeats} runs'}; "
        f"{time.monotonic() - started:.0f} s"
    )
    print(f"| {'figure':<78} | {'beanflow':>10} | {'ceiling':>10} | {'ratio':>5} |")
    print(f"| {'-' * 78} | {'-' * 10}: | {'-' * 10}: | {'-' * 5}: |")
    for figure in figures:
        ceiling_text = "" if figure.ceiling is None else f"{figure.ceiling:,.1f}"
        ratio = "" if figure.ratio is None else f"{figure.ratio:.2f}"
        print(
            f"| {figure.name + ' (' + figure.unit + ')':<78} | {figure.beanflow:>10,.1f} | "
            f"{ceiling_text:>10} | {ratio:>5} |"
        )
    if peer_figures:
        print_side_by_side(figures, peer_figures)
    arguments.json.write_text(
        json.dumps(
            {
                "settings": settings,
                "machine": machine,
                "quick": arguments.quick,
                "figures": [dataclasses.asdict(f) | {"ratio": f.ratio} for f in figures],
                "peers": peer_figures,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()

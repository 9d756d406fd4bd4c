"""The worst day: workers SIGKILLed at random and the server crash-restarted while thousands
of tasks drain. Nothing lost, nothing stuck, no effect twice.

Runs in CI at 1,000 tasks, 5 kills and 1 restart; at full size with, for example,
``BEANFLOW_CHAOS_TASKS=20000 BEANFLOW_CHAOS_KILLS=40 pytest tests/test_chaos.py -s``.
"""

from __future__ import annotations

import os
import random
import signal
import time

import psutil
import pytest
from sqlalchemy import text

import beanflow as bq

from .helpers import Processes, wait_for
from .workloads import app as workloads
from .workloads.app import UserBase

# real processes: `pytest -m "not slow"` skips them in the inner loop
pytestmark = pytest.mark.slow

TASKS = int(os.environ.get("BEANFLOW_CHAOS_TASKS", "1000"))
KILLS = int(os.environ.get("BEANFLOW_CHAOS_KILLS", "5"))

SPEC = """\
version: 1
database: ${CHAOS_DB_URL}
processors:
  mark: {function: 'tests.workloads.app:mark', channel: chaos}
channels:
  chaos: {workers: 3, batch_size: 5}
worker:
  heartbeat_period: 200ms
  heartbeat_timeout: 2s
  shutdown_grace_period: 10s
  max_worker_crashes: 1000   # the driver kills workers, not the tasks
"""


def test_chaos_run(tmp_path, own_server):
    url = own_server.url
    app = bq.BeanQueue(bq.Config(env={}, DATABASE_URL=url))
    app.create_tables()
    UserBase.metadata.create_all(app.engine)
    with app.session_factory() as session:
        bq.enqueue_many(session, workloads.mark, [{}] * TASKS)
        session.commit()
    (tmp_path / "beanflow.yaml").write_text(SPEC)
    processes = Processes(tmp_path, CHAOS_DB_URL=url)
    supervisor = processes.start("--log-level", "WARNING", "run", str(tmp_path / "beanflow.yaml"))

    def sql(statement: str) -> list:
        with app.engine.connect() as connection:
            return connection.execute(text(statement)).all()

    def done() -> int:
        try:
            return sql("SELECT count(*) FROM beanflow_tasks WHERE state = 'DONE'")[0][0]
        except Exception:  # noqa: BLE001 - the server may be restarting
            app.engine.dispose()
            return 0

    started = time.monotonic()
    killed: list[int] = []
    restarted = False
    step = TASKS // (KILLS + 3)
    try:
        while len(killed) < KILLS or not restarted:
            target = (len(killed) + restarted + 1) * step
            wait_for(lambda: done() >= target, "progress between faults", timeout=120)  # noqa: B023
            if len(killed) == KILLS // 2 and not restarted:
                own_server.restart("immediate")
                app.engine.dispose()
                restarted = True
                continue

            def live_workers() -> list[int]:
                return [
                    pid
                    for (pid,) in sql("SELECT pid FROM beanflow_workers WHERE state = 'RUNNING'")
                    if psutil.pid_exists(pid) and pid not in killed
                ]

            victim = random.choice(wait_for(live_workers, "a live worker to kill"))
            os.kill(victim, signal.SIGKILL)
            killed.append(victim)
        wait_for(lambda: done() == TASKS, "every task to be done", timeout=150)
        elapsed = time.monotonic() - started
        # the surviving workers find the killed ones dead (heartbeat timeout 2 s)
        wait_for(
            lambda: (
                {
                    pid
                    for (pid,) in sql(
                        "SELECT pid FROM beanflow_workers WHERE state = 'NO_HEARTBEAT'"
                    )
                }
                >= set(killed)
            ),
            "the killed workers to be found dead",
        )
    finally:
        supervisor.send_signal(signal.SIGTERM)
        status = supervisor.wait(60)

    states = dict(sql("SELECT state, count(*) FROM beanflow_tasks GROUP BY state"))
    assert states == {"DONE": TASKS}
    assert sql("SELECT count(*), count(DISTINCT key) FROM effects")[0] == (TASKS, TASKS)
    assert status == 0
    attempts, crashes = sql("SELECT sum(attempts), sum(crash_count) FROM beanflow_tasks")[0]
    print(
        f"\nchaos run: {TASKS} tasks, {len(killed)} workers killed, 1 server crash-restart; "
        f"all done in {elapsed:.1f} s; {attempts - TASKS} extra attempts "
        f"({crashes} re-queued from dead workers); every effect exactly once"
    )
    app.engine.dispose()

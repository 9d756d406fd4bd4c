"""Workflows on real processes: ``beanflow run`` supervising workers, ``beanflow start``;
a fan-in released once while its branches end together on several workers; and the worst
day (workers SIGKILLed, the server crash-restarted) with every step's effect exactly once.
"""

from __future__ import annotations

import json
import os
import random
import signal

import psutil
import pytest
from sqlalchemy import text

import beanflow as bq
from tests.workloads.flows import FlowBase

from .helpers import Processes, wait_for

pytestmark = pytest.mark.slow

FLOWS = "tests/workloads/flows.yaml"
RUNS = int(os.environ.get("BEANFLOW_CHAOS_RUNS", "200"))


def sql(app: bq.BeanQueue, statement: str, **parameters) -> list:
    with app.engine.connect() as connection:
        return connection.execute(text(statement), parameters).all()


@pytest.fixture
def flows_app(db_url):
    app = bq.BeanQueue(bq.Config(env={}, DATABASE_URL=db_url))
    FlowBase.metadata.create_all(app.engine)
    yield app
    app.engine.dispose()


def test_start_wait_prints_the_result_of_a_run_that_workers_complete(tmp_path, db_url, flows_app):
    processes = Processes(tmp_path, TEST_DB_URL=db_url)
    supervisor = processes.start("run", FLOWS)
    started = processes.run(
        "start", "onboard", "-i", '{"user_id": 6, "emails": 2}', "--config", FLOWS, "--wait"
    )
    assert started.returncode == 0, started.stderr
    run_id, result = started.stdout.splitlines()
    assert json.loads(result)["sent"] == [
        "welcomed user6+0@example.com",
        "welcomed user6+1@example.com",
    ]
    failed = processes.run(
        "start", "failing", "-i", '{"message": "no stock"}', "--config", FLOWS, "--wait"
    )
    assert failed.returncode == 3
    assert "FAILED: step breaks: RuntimeError: no stock" in failed.stderr
    shown = processes.run("runs", "show", run_id, "--config", FLOWS)
    assert "×2: 2 done" in shown.stdout and "DONE" in shown.stdout
    bad = processes.run("start", "onboard", "-i", '{"user_id": "x"}', "--config", FLOWS)
    assert bad.returncode == 2
    assert (
        "input of onboard: the input: 'emails' is a required property; "
        "user_id: 'x' is not of type 'integer'" in bad.stderr
    )
    supervisor.send_signal(signal.SIGTERM)
    assert supervisor.wait(60) == 0


def test_a_fan_in_of_100_branches_ending_together_is_released_once(tmp_path, db_url, flows_app):
    processes = Processes(tmp_path, TEST_DB_URL=db_url, WORKERS="4", BATCH_SIZE="1")
    supervisor = processes.start("run", FLOWS)
    wait_for(  # all four idle, so that the branches are shared as they are released
        lambda: (
            sql(flows_app, "SELECT count(*) FROM beanflow_workers WHERE state = 'RUNNING'")
            == [(4,)]
        ),
        "four workers",
    )
    start = processes.run("start", "fan", "-i", '{"user_id": 1, "emails": 100}', "--config", FLOWS)
    assert start.returncode == 0, start.stderr
    run_id = start.stdout.strip()

    def state() -> str:
        return sql(flows_app, "SELECT state FROM beanflow_workflow_runs")[0][0]

    wait_for(lambda: state() != "RUNNING", "the run to end")
    supervisor.send_signal(signal.SIGTERM)
    supervisor.wait(60)
    assert state() == "DONE"
    rows = sql(
        flows_app,
        "SELECT step, count(*) FROM beanflow_workflow_steps GROUP BY step ORDER BY step",
    )
    assert rows == [("branch", 100), ("fetch", 1), ("join", 1)]
    effects = sql(flows_app, "SELECT count(*), count(DISTINCT key) FROM flow_effects")[0]
    assert effects == (101, 101)  # 100 branches and the join
    workers = sql(
        flows_app,
        "SELECT count(DISTINCT t.worker_id) FROM beanflow_tasks t JOIN beanflow_workflow_steps"
        " s ON s.task_id = t.id WHERE s.step = 'branch'",
    )[0][0]
    assert workers >= 2  # the branches ended on several workers at once
    assert sql(flows_app, "SELECT count(*) FROM beanflow_tasks WHERE state <> 'DONE'") == [(0,)]
    # the branches counted down in 64 tallies (slot: index % 64), each to zero
    assert sql(flows_app, "SELECT count(*), sum(open) FROM beanflow_workflow_tallies") == [(64, 0)]
    assert f"{run_id}/join/0" in {k for (k,) in sql(flows_app, "SELECT key FROM flow_effects")}


def test_the_documents_example_runs_to_the_end(tmp_path, db_url, flows_app):
    """examples/documents: each run fans out over its pages, skips what does not apply, and a
    document that cannot be read is quarantined by on_failure; a second receive starts no
    second run."""
    from .helpers import run_python

    received = run_python("examples/documents/receive.py", DOCS_DATABASE_URL=db_url)
    assert received.returncode == 0, received.stderr
    processes = Processes(tmp_path, DOCS_DATABASE_URL=db_url)
    ran = processes.run("run", "examples/documents/beanflow.yaml", "--burst")
    assert ran.returncode == 3, ran.stderr  # the empty scan fails for good
    rows = sql(flows_app, "SELECT title, status FROM documents ORDER BY id")
    assert rows == [
        ("Invoice 2026-114", "published"),
        ("Urgent letter from the bank", "published"),
        ("Empty scan", "quarantined: step split: UnreadableDocument: document 3 has no text"),
    ]
    results = sql(flows_app, "SELECT result FROM beanflow_workflow_runs ORDER BY created_at")
    published = sorted((r for (r,) in results if r), key=lambda r: r["document"])
    assert published == [
        {"document": "Invoice 2026-114", "kind": "invoice", "words": 9, "total": 36.0},
        {"document": "Urgent letter from the bank", "kind": "letter", "words": 5, "total": None},
    ]
    assert sql(flows_app, "SELECT count(*) FROM document_pages") == [(5,)]


CHAOS = """\
version: 1
database: ${CHAOS_DB_URL}
processors:
  fetch: {function: 'tests.workloads.flows:fetch', channel: chaos}
  effect: {function: 'tests.workloads.flows:effect', channel: chaos}
channels:
  chaos: {workers: 3, batch_size: 5}
worker:
  heartbeat_period: 200ms
  heartbeat_timeout: 2s
  shutdown_grace_period: 10s
  max_worker_crashes: 1000   # the driver kills workers, not the tasks
workflows:
  chaos:
    input: {user_id: integer, emails: integer}
    steps:
      fetch: {processor: fetch}
      a: {processor: effect, after: [fetch]}
      b: {processor: effect, after: [fetch]}
      each: {processor: effect, after: [a], for_each: fetch.emails}
      join: {processor: effect, after: [each, b]}
      last: {processor: effect, after: [join]}
"""


def test_workflow_chaos(tmp_path, own_server):
    """200 runs of a six-step workflow with a fan-out of 3 (8 tasks a run); workers SIGKILLed
    at random and the server crash-restarted once: every run completes, every step's effect
    (a row keyed by run, step and element, written in the step's transaction) exactly once."""
    url = own_server.url
    app = bq.BeanQueue(bq.Config(env={}, DATABASE_URL=url))
    app.create_tables()
    FlowBase.metadata.create_all(app.engine)
    spec_file = tmp_path / "beanflow.yaml"
    spec_file.write_text(CHAOS)
    os.environ["CHAOS_DB_URL"] = url
    try:
        deployment = bq.load(spec_file, default=False)
    finally:
        del os.environ["CHAOS_DB_URL"]
    with deployment.app.session_factory() as session:
        for n in range(RUNS):
            deployment.workflows.start(session, "chaos", {"user_id": n, "emails": 3})
        session.commit()
    deployment.app.engine.dispose()
    processes = Processes(tmp_path, CHAOS_DB_URL=url)
    supervisor = processes.start("--log-level", "WARNING", "run", str(spec_file))

    def count(statement: str) -> int:
        try:
            return sql(app, statement)[0][0]
        except Exception:  # noqa: BLE001 - the server may be restarting
            app.engine.dispose()
            return 0

    def done_runs() -> int:
        return count("SELECT count(*) FROM beanflow_workflow_runs WHERE state = 'DONE'")

    kills, killed, restarted = 6, [], False
    try:
        for fault in range(kills + 1):
            target = (fault + 1) * RUNS // (kills + 3)
            wait_for(lambda: done_runs() >= target, "progress between faults", timeout=120)  # noqa: B023
            if fault == kills // 2:
                own_server.restart("immediate")
                app.engine.dispose()
                restarted = True
                continue

            def live_workers() -> list[int]:
                rows = sql(app, "SELECT pid FROM beanflow_workers WHERE state = 'RUNNING'")
                return [p for (p,) in rows if psutil.pid_exists(p) and p not in killed]

            victim = random.choice(wait_for(live_workers, "a live worker to kill"))
            os.kill(victim, signal.SIGKILL)
            killed.append(victim)
        wait_for(lambda: done_runs() == RUNS, "every run to complete", timeout=180)
    finally:
        supervisor.send_signal(signal.SIGTERM)
        status = supervisor.wait(60)
    assert restarted and len(killed) == kills
    assert sql(app, "SELECT state, count(*) FROM beanflow_workflow_runs GROUP BY state") == [
        ("DONE", RUNS)
    ]
    assert sql(app, "SELECT state, count(*) FROM beanflow_tasks GROUP BY state") == [
        ("DONE", RUNS * 8)
    ]
    # each step of each run once: 5 single steps and 3 elements
    assert sql(app, "SELECT count(*), count(DISTINCT key) FROM flow_effects")[0] == (
        RUNS * 7,
        RUNS * 7,
    )
    assert status == 0
    app.engine.dispose()

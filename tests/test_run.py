"""`beanflow run` (supervisor, workers, cron) and `submit --config`, with real processes."""

from __future__ import annotations

import datetime
import json
import os
import signal
import socket
import subprocess
import textwrap
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import psutil
import pytest
from sqlalchemy import func, select, text

import beanflow as bq
import beanflow.errors
from beanflow.models import TaskState, WorkerState

from .helpers import ROOT, Processes, run_python, wait_for
from .workloads import app as workloads
from .workloads.app import UserBase

# real processes: `pytest -m "not slow"` skips them in the inner loop
pytestmark = pytest.mark.slow

SPEC = """\
version: 1
database: ${TEST_DB_URL}
processors:
  echo: {function: 'tests.workloads.app:echo', channel: work}
  slow_effect: {function: 'tests.workloads.app:slow_effect', channel: work}
  slow_once: {function: 'tests.workloads.app:slow_once', channel: work}
channels:
  work: {workers: 1}
worker:
  heartbeat_period: 200ms
  heartbeat_timeout: 2s
  shutdown_grace_period: 60s
"""

CRON = (
    SPEC
    + """\
schedules:
  tick:
    processor: echo
    cron: "* * * * * *"
    kwargs: {value: tick}
    catch_up: 1
"""
)


class Runs(Processes):
    """`beanflow run` (and other commands) against the test database, as TEST_DB_URL."""

    def __init__(self, db_url: str, folder: Path) -> None:
        super().__init__(folder, TEST_DB_URL=db_url)

    def spec(self, text_: str = SPEC) -> Path:
        path = self.folder / "beanflow.yaml"
        path.write_text(textwrap.dedent(text_))
        return path


@pytest.fixture
def runs(app, db_url, tmp_path):
    UserBase.metadata.create_all(app.engine)  # the effects table
    runs = Runs(db_url, tmp_path)
    yield runs
    runs.kill_all()


def state_of(session, task_id) -> TaskState:
    session.expire_all()
    return session.get(bq.Task, task_id).state


def enqueue(session, processor, **kwargs):
    task = bq.enqueue(session, processor, **kwargs)
    session.commit()
    return task.id


def test_run_deployment_supervises_workers_without_the_command_line(
    runs, session, monkeypatch, empty_db_url
):
    """The library runs what a file declares; the CLI only parses and reports."""
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    monkeypatch.setenv("TEST_DB_URL", empty_db_url)
    with pytest.raises(bq.errors.TablesMissing, match="beanflow create-tables --config"):
        bq.run_deployment(bq.load(runs.spec()), burst=True)

    monkeypatch.setenv("TEST_DB_URL", runs.env["TEST_DB_URL"])
    deployment = bq.load(runs.spec())
    ids = [enqueue(session, workloads.echo, value=n) for n in range(5)]
    assert bq.run_deployment(deployment, burst=True) == 0
    assert {state_of(session, task_id) for task_id in ids} == {TaskState.DONE}
    workers = session.scalars(select(bq.Worker.state)).all()
    assert workers == [WorkerState.SHUTDOWN]  # one worker process, stopped cleanly


def test_burst_runs_a_pipeline_to_the_end_and_logs_json(runs, session, db_url):
    """The orders example: a charge enqueues a receipt on another channel; --burst exits only
    when nothing is due on any channel."""
    placed = run_python("examples/orders/place_orders.py", **runs.env, SHOP_DATABASE_URL=db_url)
    assert placed.returncode == 0, placed.stderr
    result = runs.run(
        "--log-format",
        "json",
        "--log-level",
        "DEBUG",
        "run",
        "examples/orders/beanflow.yaml",
        "--burst",
        SHOP_DATABASE_URL=db_url,
    )
    assert result.returncode == 3, result.stderr  # one charge fails for good
    lines = [json.loads(line) for line in result.stderr.splitlines()]
    assert {"time", "level", "logger", "pid", "message"} <= set(lines[0])
    done = [line for line in lines if "shop.charge done in" in line["message"]]
    assert done and {"task_id", "processor", "channel", "duration_ms"} <= set(done[0])
    assert done[0]["level"] == "DEBUG"
    failed = [line for line in lines if line["level"] == "ERROR" and "charge" in line["message"]]
    assert failed and "Traceback" in failed[0]["exception"]
    (summary,) = [line["summary"] for line in lines if "summary" in line]
    assert summary == {"done": 4, "failed": 1, "cancelled": 0, "retried": 0, "pending": 0}

    rows = session.execute(
        text("SELECT customer, status, receipt_sent FROM orders ORDER BY id")
    ).all()
    assert [tuple(r) for r in rows] == [
        ("ada", "charged", True),
        ("grace", "charged", True),
        ("linus", "placed", False),
    ]
    states = session.execute(
        text("SELECT name, state, count(*) FROM beanflow_tasks GROUP BY 1, 2 ORDER BY 1, 2")
    ).all()
    assert [tuple(r) for r in states] == [
        ("charge", "DONE", 2),
        ("charge", "FAILED", 1),
        ("send_receipt", "DONE", 2),
    ]
    receipts = session.execute(
        text(
            "SELECT count(*) FROM beanflow_tasks c JOIN beanflow_tasks p ON c.parent_id = p.id "
            "WHERE c.name = 'send_receipt' AND p.name = 'charge'"
        )
    ).scalar()
    assert receipts == 2


def test_sigterm_drains_the_running_task(runs, session, tmp_path):
    flag = tmp_path / "started"
    task_id = enqueue(session, workloads.slow_effect, key="k", flag=str(flag), seconds=1.0)
    supervisor = runs.start("run", str(runs.spec()))
    wait_for(flag.exists, "the task to start")
    supervisor.send_signal(signal.SIGTERM)
    assert supervisor.wait(60) == 0
    assert state_of(session, task_id) == TaskState.DONE
    assert "all workers stopped" in runs.output(supervisor)


@pytest.mark.parametrize("number", [signal.SIGINT, signal.SIGTERM])
def test_one_signal_to_the_whole_group_is_one_drain(runs, session, tmp_path, number):
    """Ctrl-C in a terminal (SIGINT to the process group), or systemd's KillMode=control-group
    (SIGTERM to every process): each worker gets the signal from the terminal and again from
    its supervisor, and still drains once, its task finishing within the grace period."""
    flag = tmp_path / "started"
    task_id = enqueue(session, workloads.slow_effect, key="k", flag=str(flag), seconds=1.0)
    supervisor = runs.start("run", str(runs.spec()))
    wait_for(flag.exists, "the task to start")
    os.killpg(supervisor.pid, number)
    assert supervisor.wait(60) == 0
    assert state_of(session, task_id) == TaskState.DONE
    log = runs.output(supervisor)
    assert "stopping now" not in log and "grace period exceeded" not in log


def test_workers_stop_when_their_supervisor_is_killed(runs, session):
    supervisor = runs.start("run", str(runs.spec()))
    [pid] = wait_for(lambda: session.scalars(select(bq.Worker.pid)).all(), "the worker")
    supervisor.send_signal(signal.SIGKILL)
    supervisor.wait()

    def stopped() -> bool:
        session.expire_all()
        return session.scalar(select(bq.Worker.state)) == WorkerState.SHUTDOWN

    wait_for(stopped, "the orphaned worker to stop")
    wait_for(
        lambda: not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie",
        "the worker process to exit",
    )


def test_second_signal_stops_at_once(runs, session, tmp_path):
    flag = tmp_path / "started"
    task_id = enqueue(session, workloads.slow_effect, key="k", flag=str(flag), seconds=3600)
    supervisor = runs.start("run", str(runs.spec()))
    wait_for(flag.exists, "the task to start")
    supervisor.send_signal(signal.SIGTERM)
    wait_for(lambda: "stopping; workers finish" in runs.output(supervisor), "the drain")
    supervisor.send_signal(signal.SIGTERM)
    assert supervisor.wait(60) == 0
    assert state_of(session, task_id) == TaskState.PENDING  # rolled back, back in the queue


def test_killed_worker_is_restarted_and_its_task_completes(runs, session, tmp_path):
    flag = tmp_path / "started"
    task_id = enqueue(session, workloads.slow_once, flag=str(flag))
    supervisor = runs.start("run", str(runs.spec()))
    wait_for(flag.exists, "the task to start")
    os.kill(int(flag.read_text()), signal.SIGKILL)
    wait_for(lambda: state_of(session, task_id) == TaskState.DONE, "the task to be redone")
    session.expire_all()
    task = session.get(bq.Task, task_id)
    assert (task.result, task.attempts, task.crash_count) == ("second run", 2, 1)
    assert "was killed by SIGKILL" in runs.output(supervisor)
    supervisor.send_signal(signal.SIGTERM)
    assert supervisor.wait(60) == 0


def test_three_supervisors_enqueue_each_cron_tick_once(runs, session):
    path = runs.spec(CRON)
    supervisors = [runs.start("run", str(path)) for _ in range(3)]

    def ticks() -> int:
        return session.execute(
            text("SELECT count(DISTINCT unique_key) FROM beanflow_tasks")
        ).scalar()

    wait_for(lambda: ticks() >= 5, "five cron ticks")
    for supervisor in supervisors:
        supervisor.send_signal(signal.SIGTERM)
    for supervisor in supervisors:
        assert supervisor.wait(60) == 0
    rows = session.execute(
        text("SELECT unique_key, scheduled_at FROM beanflow_tasks ORDER BY scheduled_at")
    ).all()
    keys = [row.unique_key for row in rows]
    assert len(keys) == len(set(keys)) >= 5  # each tick exactly once
    seconds = [row.scheduled_at.timestamp() for row in rows]
    assert seconds == [seconds[0] + n for n in range(len(seconds))]  # no tick missed
    assert all(k.startswith("schedule:tick:") for k in keys)


def test_run_without_tables_says_so(runs, empty_db_url):
    runs.env["TEST_DB_URL"] = empty_db_url
    result = runs.run("run", str(runs.spec()), "--burst")
    assert result.returncode == 1
    assert (
        "Error: beanflow's tables do not exist in this database; create them with "
        f"`beanflow create-tables --config {runs.spec()}`" in result.stderr
    )
    created = runs.run("run", str(runs.spec()), "--burst", "--create-tables")
    assert created.returncode == 0, created.stderr


def test_invalid_file_starts_nothing(runs):
    path = runs.spec(SPEC.replace("channel: work}", "channel: work, retries: 3}", 1))
    result = runs.run("run", str(path))
    assert result.returncode == 1
    assert f"{path}:4:63: processors.echo.retries: unknown key" in result.stderr


def test_submit_with_config(runs, session):
    path = str(runs.spec())
    bad = runs.run("submit", "work", "echo", "--config", path, "-k", '{"nope": 1}')
    assert bad.returncode == 2
    assert (
        bad.stderr == "Error: kwargs do not fit echo(value): missing a required argument: 'value'\n"
    )
    assert session.scalar(select(func.count()).select_from(bq.Task)) == 0

    good = runs.run("submit", "work", "echo", "--config", path, "-k", '{"value": 1}', "--in", "1h")
    assert good.returncode == 0, good.stderr
    task = session.get(bq.Task, good.stdout.strip())
    in_an_hour = session.scalar(text("SELECT now() + interval '1 hour'"))
    assert abs((task.scheduled_at - in_an_hour).total_seconds()) < 60

    at = runs.run(
        "submit",
        "work",
        "echo",
        "--config",
        path,
        "-k",
        '{"value": 2}',
        "--at",
        "2030-01-02T03:04:05+00:00",
    )
    assert at.returncode == 0, at.stderr
    assert session.get(bq.Task, at.stdout.strip()).scheduled_at.year == 2030
    wrong = runs.run("submit", "work", "echo", "--config", path, "--at", "tomorrow")
    assert wrong.returncode == 2 and "--at 'tomorrow' is not an ISO 8601 time" in wrong.stderr


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_metrics_and_health_are_served_during_a_run(runs, session):
    port = free_port()
    runs.spec()
    process = runs.start("run", str(runs.folder / "beanflow.yaml"), "--metrics-port", str(port))
    tasks = [enqueue(session, workloads.echo, value=n) for n in range(3)]
    wait_for(lambda: all(state_of(session, t) == TaskState.DONE for t in tasks), "the tasks")
    later = workloads.echo.run(value="later")
    later.scheduled_at = func.now() + datetime.timedelta(hours=1)
    session.add(later)
    session.commit()

    def scrape(path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as reply:
                return reply.status, reply.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()
        except OSError:
            return 0, ""

    done = (
        'beanflow_tasks_total{channel="work",outcome="done",'
        'processor="tests.workloads.app.echo"} 3.0'
    )
    # a worker counts a task just after the commit that made it DONE
    status, body = wait_for(
        lambda: (r := scrape("/metrics"))[0] == 200 and done in r[1] and r, "/metrics"
    )
    assert 'beanflow_queue_tasks{channel="work",state="scheduled"} 1.0' in body
    assert "beanflow_task_duration_seconds_bucket" in body
    assert 'beanflow_worker_processes{kind="running"} 1.0' in body
    status, body = scrape("/healthz")
    assert status == 200 and json.loads(body)["healthy"] is True
    process.send_signal(signal.SIGTERM)
    assert process.wait(60) == 0


def test_submit_wait_prints_the_result_or_the_failure(runs):
    spec = runs.spec(
        SPEC.replace(
            "channels:",
            "  boom: {function: 'tests.workloads.app:boom', channel: work}\nchannels:",
            1,
        )
    )
    runs.start("run", str(spec))

    def submit(*arguments: str) -> subprocess.CompletedProcess:
        return runs.run("submit", "--config", str(spec), "work", *arguments, "--wait")

    done = submit("echo", "-k", '{"value": {"n": 5}}')
    assert done.returncode == 0, done.stderr
    task_id, result = done.stdout.splitlines()
    assert uuid.UUID(task_id) and json.loads(result) == {"n": 5}
    failed = submit("boom", "-k", '{"message": "no"}')
    assert failed.returncode == 3
    assert "FAILED: ValueError: no" in failed.stderr
    late = runs.run(
        "submit",
        "--config",
        str(spec),
        "work",
        "echo",
        "-k",
        '{"value": 1}',
        "--in",
        "1h",
        "--wait",
        "--timeout",
        "0.5s",
    )
    assert late.returncode == 4 and "still not ended after 0.5s" in late.stderr

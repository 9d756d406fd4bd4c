"""The services beside a worker's loop, each on its own: deadlines, the periodic-service shape,
the heartbeat, the reaper, the summary and the scheduler."""

from __future__ import annotations

import collections
import logging
import os
import signal
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import exc, select, text, update

import beanflow as bq
from beanflow.engine.deadlines import Deadlines, GraceExceeded, TaskTimeout
from beanflow.engine.liveness import Heartbeat, Reaper, Summary
from beanflow.engine.queries import Queries
from beanflow.engine.schedules import Schedule, Scheduler
from beanflow.engine.service import PeriodicService
from beanflow.models import TaskState, WorkerState

from .helpers import refuse
from .workloads.app import echo


def spin(seconds: float) -> None:
    """Busy Python code, which a signal interrupts (the deadline under test ends it)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        pass


@pytest.fixture
def deadlines():
    stops: list[int] = []
    deadlines = Deadlines()
    deadlines.install(stops.append)
    deadlines.stops = stops  # type: ignore[attr-defined]
    yield deadlines
    deadlines.restore()


def test_a_task_past_its_timeout_is_interrupted(deadlines):
    with pytest.raises(TaskTimeout, match="ran past its timeout of 0.05s"), deadlines.task(0.05):
        spin(30)
    assert not deadlines.running


def test_the_grace_period_interrupts_the_running_task_only(deadlines):
    deadlines.start_grace(0.0)  # between tasks: nothing to interrupt
    with deadlines.task(None):
        spin(0.01)
    with pytest.raises(GraceExceeded), deadlines.task(None):
        deadlines.start_grace(0.05)
        spin(30)
    with pytest.raises(GraceExceeded), deadlines.task(None):
        deadlines.end_grace()  # a second signal: at once


def test_stop_signals_reach_the_handler_and_the_old_handlers_come_back(deadlines):
    os.kill(os.getpid(), signal.SIGTERM)
    os.kill(os.getpid(), signal.SIGINT)
    assert deadlines.stops == [signal.SIGTERM, signal.SIGINT]
    deadlines.restore()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_deadlines_do_nothing_outside_the_main_thread():
    outcome = {}

    def body() -> None:
        deadlines = Deadlines()
        deadlines.install(lambda number: None)
        with deadlines.task(0.001):
            time.sleep(0.01)  # no alarm outside the main thread
        outcome["enabled"] = deadlines.enabled

    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    assert outcome == {"enabled": False}


def test_a_periodic_service_survives_database_errors(caplog):
    rounds = []
    done = threading.Event()

    class Flaky(PeriodicService):
        name = "flaky"

        def run_once(self) -> None:
            rounds.append(len(rounds))
            if len(rounds) == 1:
                raise exc.OperationalError("SELECT 1", {}, Exception("server closed"))
            if len(rounds) == 2:
                raise RuntimeError("a bug")
            done.set()
            self.stop()

    service = Flaky(0.0, threading.Event())
    with caplog.at_level(logging.WARNING):
        service.start()
        assert done.wait(30)
        service.join()
    assert rounds == [0, 1, 2]
    assert "flaky failed: server closed" in caplog.text
    assert "flaky failed" in caplog.text and "RuntimeError: a bug" in caplog.text


def _queries(app: bq.BeanQueue) -> Queries:
    return Queries(app.task_model, app.worker_model, app.event_model)


def _worker_row(app: bq.BeanQueue, heartbeat_age: timedelta = timedelta(0)) -> uuid.UUID:
    worker_id = uuid.uuid4()
    with app.engine.begin() as connection:
        connection.execute(
            _queries(app).register, {"id": worker_id, "name": "test", "channels": ["work"]}
        )
        connection.execute(
            update(bq.Worker)
            .where(bq.Worker.id == worker_id)
            .values(last_heartbeat=bq.Worker.last_heartbeat - heartbeat_age)
        )
    return worker_id


def test_heartbeat_records_life_and_reports_a_worker_found_dead(app, session):
    worker_id = _worker_row(app, heartbeat_age=timedelta(minutes=5))
    lost: list[str] = []
    heartbeat = Heartbeat(app, _queries(app), worker_id, threading.Event(), lost.append)
    heartbeat.run_once()
    age = session.scalar(text("SELECT now() - last_heartbeat FROM beanflow_workers"))
    assert age < timedelta(minutes=1) and lost == []

    session.execute(update(bq.Worker).values(state=WorkerState.NO_HEARTBEAT))
    session.commit()
    heartbeat.run_once()
    assert lost == ["NO_HEARTBEAT"]


def test_reaper_requeues_a_dead_workers_task_and_fails_one_that_keeps_killing(app, session):
    app.config.MAX_WORKER_CRASHES = 2
    timeout = timedelta(seconds=app.config.WORKER_HEARTBEAT_TIMEOUT)
    silent = _worker_row(app, heartbeat_age=timeout)
    alive = _worker_row(app)
    # found dead before, yet holding a task: one it claimed as it was found dead, and then
    # either died (silent since) or is about to give back (it heartbeated, and learned it)
    stranded_by, giving_back = _worker_row(app, heartbeat_age=timeout), _worker_row(app)
    session.execute(
        update(bq.Worker)
        .where(bq.Worker.id.in_([stranded_by, giving_back]))
        .values(state=WorkerState.NO_HEARTBEAT)
    )
    victim = bq.enqueue(session, echo, value=1)
    killer = bq.enqueue(session, echo, value=2)
    healthy = bq.enqueue(session, echo, value=3)
    stranded = bq.enqueue(session, echo, value=4)
    given_back = bq.enqueue(session, echo, value=5)
    counted_out = bq.enqueue(session, echo, value=6)  # a crash count written in SQL at the top
    session.flush()
    for task, worker, crashes in (
        (victim, silent, 0),
        (killer, silent, 1),
        (healthy, alive, 0),
        (stranded, stranded_by, 0),
        (given_back, giving_back, 0),
        (counted_out, silent, 2**31 - 1),
    ):
        task.state, task.worker_id, task.crash_count = TaskState.PROCESSING, worker, crashes
    session.commit()

    reaper = Reaper(app, _queries(app), threading.Event())
    assert reaper.run_once() == (1, 4)
    assert reaper.run_once() == (0, 0)  # once is enough

    session.expire_all()
    assert (victim.state, victim.crash_count, victim.worker_id) == (TaskState.PENDING, 1, None)
    assert (killer.state, killer.crash_count) == (TaskState.FAILED, 2)
    assert (counted_out.state, counted_out.crash_count) == (TaskState.FAILED, 2**31 - 1)
    assert killer.error_message == "its worker died 2 times while running it"
    assert (healthy.state, healthy.worker_id) == (TaskState.PROCESSING, alive)
    assert (stranded.state, stranded.crash_count) == (TaskState.PENDING, 1)
    assert (given_back.state, given_back.worker_id) == (TaskState.PROCESSING, giving_back)
    states = dict(session.execute(select(bq.Worker.id, bq.Worker.state)).all())
    assert states == {
        silent: WorkerState.NO_HEARTBEAT,
        alive: WorkerState.RUNNING,
        stranded_by: WorkerState.NO_HEARTBEAT,
        giving_back: WorkerState.NO_HEARTBEAT,
    }


def test_summary_logs_and_resets_the_counts(caplog):
    counts = collections.Counter(done=3, failed=1)

    def take() -> collections.Counter[str]:
        nonlocal counts
        taken, counts = counts, collections.Counter()
        return taken

    summary = Summary(uuid.UUID(int=7), take, threading.Event(), period=60)
    with caplog.at_level(logging.INFO):
        summary.run_once()
    assert "in the last 60s 3 done, 0 retried, 1 failed" in caplog.text
    assert counts == collections.Counter()


def test_a_new_schedule_does_not_fire_for_its_past(app, session):
    """A daily 03:00 job first deployed at noon runs at 03:00, not at deploy time."""
    daily = Schedule("daily", echo, "0 3 * * *", kwargs={"value": "tick"}, catch_up=1)
    Scheduler(app, [daily]).run_once()
    assert session.scalars(select(bq.Task)).all() == []
    seen = session.get(bq.models.ScheduleState, "daily")
    assert seen.first_seen is not None and seen.last_tick is None


def test_scheduler_catches_up_once_then_enqueues_each_tick_once(app, session):
    every_second = Schedule("tick", echo, "* * * * * *", kwargs={"value": "tick"}, catch_up=2)
    # a schedule that has been deployed for a while, then was down
    session.add(
        bq.models.ScheduleState(
            name="tick", first_seen=datetime.now(timezone.utc) - timedelta(hours=1)
        )
    )
    session.commit()
    first, second = Scheduler(app, [every_second]), Scheduler(app, [every_second])
    assert first.next_wait() == 0  # it catches up at once
    while datetime.now(timezone.utc).microsecond > 500_000:
        time.sleep(0.01)  # both catch up within one second, so to the same two ticks
    first.run_once()
    second.run_once()  # a second scheduler of the same file inserts nothing twice
    keys = session.scalars(select(bq.Task.unique_key).order_by(bq.Task.scheduled_at)).all()
    assert len(keys) == len(set(keys)) == 2
    assert 0 <= first.next_wait() <= 1.0

    upcoming = first.upcoming["tick"]
    while datetime.now(timezone.utc).timestamp() + first.LEAD_SECONDS < upcoming.timestamp():
        time.sleep(0.01)  # the clock has to reach the tick's lead time
    first.run_once()
    second.run_once()
    session.expire_all()
    keys = session.scalars(select(bq.Task.unique_key)).all()
    assert len(keys) == len(set(keys)) == 3
    assert f"schedule:tick:{upcoming.isoformat()}" in keys
    state = session.get(bq.models.ScheduleState, "tick")
    assert state.last_tick == upcoming
    assert session.get(bq.Task, state.last_task_id).unique_key.endswith(upcoming.isoformat())


def test_a_tick_the_database_refuses_for_now_is_caught_up_not_lost(app, session):
    """The database refuses a tick's insert for a reason that passes (a lock timeout here; a
    restart, a failover): the scheduler pauses, then catches up as after any downtime.
    Before, the tick was skipped for good."""
    # catching up a minute of ticks: the refused one is among them however slow this test is
    every_second = Schedule("tick", echo, "* * * * * *", kwargs={"value": "tick"}, catch_up=60)
    scheduler = Scheduler(app, [every_second])
    scheduler.run_once()  # a new schedule: it only looks ahead
    refuse(session, "beanflow_tasks", "INSERT", "lock_not_available")
    session.commit()
    refused = scheduler.upcoming["tick"]
    while datetime.now(timezone.utc).timestamp() + scheduler.LEAD_SECONDS < refused.timestamp():
        time.sleep(0.01)  # the clock has to reach the tick's lead time
    with pytest.raises(exc.OperationalError, match="not now"):
        scheduler.run_once()
    assert scheduler.next_wait() > 0  # a pause before it tries again
    scheduler.run_once()  # catching up: the tick, if it is due by now, else it looks ahead
    scheduler.run_once()  # and the tick, due within its lead time
    assert refused in session.scalars(select(bq.Task.scheduled_at)).all()


def test_the_pace_claims_what_fits_in_the_window():
    from beanflow.engine.batch import Pace

    pace = Pace(window=0.1, maximum=100)
    assert pace.size() == 100  # nothing known: the most (the watch gives back the rest)
    pace.record("noop", 0.0001)
    assert pace.size() == 100  # no-op tasks: as many as allowed
    pace.seconds = 0.01
    assert pace.size() == 8  # ten fit: the power of two below, so few statements are prepared
    pace.record("slow", 2.0)
    assert pace.size() == 1  # a slow task: one at a time
    assert Pace(window=0.1, maximum=1).size() == 1
    # before a task that may end past the window, the worker commits what finished
    assert pace.would_overrun("never seen", elapsed=0.0)
    assert pace.would_overrun("slow", elapsed=0.0)
    assert not pace.would_overrun("noop", elapsed=0.05)


def test_control_backs_off_while_the_database_cannot_be_reached(server_url, caplog):
    """A database that is gone (dropped, unreachable) is retried with a growing pause, one
    warning line each time, never in a tight loop."""
    from sqlalchemy.engine import make_url

    from beanflow.engine.control import Control

    gone = make_url(server_url).set(database="beanflow_no_such_database")
    app = bq.BeanQueue(bq.Config(env={}, DATABASE_URL=gone.render_as_string(False)))
    control = Control(app, uuid.uuid4(), threading.Event(), lambda *a: None)
    delays = []
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            control.run_once()
            delays.append(control.next_wait())
    control.join()
    assert delays == [0.5, 1.0, 2.0]
    assert [r.message.startswith("control: ") for r in caplog.records] == [True] * 3
    app.engine.dispose()

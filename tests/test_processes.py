"""Real worker processes: wake-up, scheduling, signals, crashes, concurrency."""

from __future__ import annotations

import datetime
import signal

import pytest
from sqlalchemy import func, make_url, select, text

import beanflow as bq
from beanflow import ops
from beanflow.engine.queries import Queries
from beanflow.models import Cancellation, EventType, TaskState, WorkerState

from .helpers import wait_for
from .workloads import app as workloads
from .workloads.app import Effect, UserBase

# real processes: `pytest -m "not slow"` skips them in the inner loop
pytestmark = pytest.mark.slow

# A worker that relied on polling would not find a task within the tests' 60 s waits.
NO_POLLING = {"POLL_TIMEOUT": 3600}


@pytest.fixture
def effects(app):
    UserBase.metadata.create_all(app.engine)
    return Effect


def state_of(session, task) -> TaskState:
    session.expire_all()
    return session.get(bq.Task, task.id).state


def enqueue(session, processor, **kwargs):
    task = bq.enqueue(session, processor, **kwargs)
    session.commit()
    return task


def worker_rows(session):
    session.expire_all()
    return session.scalars(select(bq.Worker)).all()


def test_idle_worker_wakes_on_notify(session, workers):
    process = workers.start("work", **NO_POLLING)
    wait_for(lambda: worker_rows(session), "the worker to register")
    # the worker has found nothing and is asleep on its LISTEN connection
    task = enqueue(session, workloads.echo, value="hi")
    wait_for(lambda: state_of(session, task) == TaskState.DONE, "the task to be done")
    process.send_signal(signal.SIGTERM)
    assert process.wait(30) == 0


def test_task_scheduled_ahead_starts_when_due_without_polling(session, workers):
    process = workers.start("work", **NO_POLLING)
    wait_for(lambda: worker_rows(session), "the worker to register")
    task = workloads.echo.run(value="later")
    task.scheduled_at = func.now() + datetime.timedelta(seconds=2)
    session.add(task)
    session.commit()
    wait_for(lambda: state_of(session, task) == TaskState.DONE, "the scheduled task")
    session.refresh(task)
    assert task.started_at >= task.scheduled_at
    process.send_signal(signal.SIGTERM)
    assert process.wait(30) == 0


@pytest.mark.parametrize("signal_number", [signal.SIGTERM, signal.SIGINT])
def test_stop_signal_finishes_the_running_task_and_returns_the_rest(
    session, workers, effects, tmp_path, signal_number
):
    flag = tmp_path / "started"
    slow = enqueue(session, workloads.slow_effect, key="slow", flag=str(flag), seconds=1.0)
    queued = [enqueue(session, workloads.write_effect, key=f"k{n}") for n in range(3)]
    process = workers.start("work", BATCH_SIZE=4, SHUTDOWN_GRACE_PERIOD=60)
    wait_for(flag.exists, "the slow task to start")
    process.send_signal(signal_number)
    assert process.wait(60) == 0

    assert state_of(session, slow) == TaskState.DONE
    assert session.scalars(select(Effect.key)).all() == ["slow"]
    for task in queued:  # claimed with it but never started: back in the queue, unattempted
        session.refresh(task)
        assert (task.state, task.attempts, task.worker_id) == (TaskState.PENDING, 0, None)
        assert task.events[-1].type == EventType.REQUEUED
    assert [w.state for w in worker_rows(session)] == [WorkerState.SHUTDOWN]


def test_grace_period_exceeded_rolls_the_task_back(session, workers, effects, tmp_path):
    flag = tmp_path / "started"
    slow = enqueue(session, workloads.slow_effect, key="slow", flag=str(flag), seconds=3600)
    process = workers.start("work", SHUTDOWN_GRACE_PERIOD=0.5)
    wait_for(flag.exists, "the slow task to start")
    process.send_signal(signal.SIGTERM)
    assert process.wait(60) == 0

    session.refresh(slow)
    assert (slow.state, slow.worker_id, slow.attempts) == (TaskState.PENDING, None, 1)
    assert session.scalar(select(func.count()).select_from(Effect)) == 0
    assert "grace period exceeded" in workers.output(process)


def test_killed_worker_is_reaped_and_its_task_completes(session, workers, effects, tmp_path):
    flag = tmp_path / "started"
    task = enqueue(session, workloads.slow_effect, key="k", flag=str(flag), seconds=3600)
    victim = workers.start("work", WORKER_HEARTBEAT_PERIOD=0.2)
    wait_for(flag.exists, "the task to start")
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    # the task now runs quickly when it is retried
    session.execute(text("UPDATE beanflow_tasks SET kwargs = kwargs || '{\"seconds\": 0}'"))
    session.commit()
    flag.unlink()
    workers.start("work", WORKER_HEARTBEAT_PERIOD=0.2, WORKER_HEARTBEAT_TIMEOUT=1)
    wait_for(lambda: state_of(session, task) == TaskState.DONE, "the task to be redone")

    session.refresh(task)
    assert (task.attempts, task.crash_count) == (2, 1)
    assert session.scalars(select(Effect.key)).all() == ["k"]
    types = [e.type for e in task.events]
    assert types == [EventType.CLAIMED, EventType.REQUEUED, EventType.CLAIMED, EventType.COMPLETE]
    states = {w.pid: w.state for w in worker_rows(session)}
    assert states[victim.pid] == WorkerState.NO_HEARTBEAT


@pytest.mark.parametrize("poison", ["kill_my_worker", "exit_my_worker"])
def test_task_that_keeps_killing_its_worker_is_failed(session, workers, poison):
    killer = enqueue(session, getattr(workloads, poison))
    innocents = [enqueue(session, workloads.echo, value=n) for n in range(3)]
    settings = {
        "WORKER_HEARTBEAT_PERIOD": 0.2,
        "WORKER_HEARTBEAT_TIMEOUT": 1,
        "MAX_WORKER_CRASHES": 2,
        "BATCH_SIZE": 4,
    }

    def run_until_killed_or_failed() -> None:
        process = workers.start("work", **settings)
        wait_for(
            lambda: process.poll() is not None or state_of(session, killer) == TaskState.FAILED,
            "a crash or the failure",
        )

    while state_of(session, killer) != TaskState.FAILED:
        run_until_killed_or_failed()

    session.refresh(killer)
    assert killer.crash_count == 2
    assert killer.error_message == "its worker died 2 times while running it"
    for task in innocents:
        wait_for(lambda task=task: state_of(session, task) == TaskState.DONE, "the innocents")


def test_worker_found_dead_stops_and_its_late_completion_is_refused(
    session, workers, effects, tmp_path
):
    flag = tmp_path / "started"
    task = enqueue(session, workloads.slow_effect, key="k", flag=str(flag), seconds=2)
    process = workers.start("work", WORKER_HEARTBEAT_PERIOD=0.2)
    wait_for(flag.exists, "the task to start")
    # another worker finds it dead (as if its heartbeats had stopped) and re-queues its task;
    # in one transaction, so that no heartbeat of the worker (every 0.2 s), and no reap by its
    # own reaper, comes between the two
    session.execute(text("UPDATE beanflow_workers SET last_heartbeat = now() - interval '1h'"))
    reap = Queries(bq.Task, bq.Worker, bq.Event).reap
    workers_reaped = session.execute(
        reap, {"timeout": datetime.timedelta(seconds=60), "max_crashes": 3}
    ).one()
    session.commit()
    assert workers_reaped.workers == 1

    assert process.wait(60) == 1
    session.refresh(task)
    assert (task.state, task.worker_id) == (TaskState.PENDING, None)
    assert session.scalar(select(func.count()).select_from(Effect)) == 0
    assert "was marked NO_HEARTBEAT by another worker" in workers.output(process)


def test_tasks_claimed_as_a_worker_was_found_dead_are_reaped_once_it_dies(
    app, session, workers, effects, tmp_path
):
    flag = tmp_path / "started"
    # no heartbeat or reap of its own during the test: the test plays the other worker
    process = workers.start(
        "work", WORKER_HEARTBEAT_PERIOD=3600, WORKER_HEARTBEAT_TIMEOUT=7200, **NO_POLLING
    )
    wait_for(lambda: worker_rows(session), "the worker to register")
    (worker,) = worker_rows(session)
    session.commit()
    reap = Queries(bq.Task, bq.Worker, bq.Event).reap
    found_dead = {"timeout": datetime.timedelta(seconds=60), "max_crashes": 3}
    with app.engine.connect() as reaper:
        # the worker's claim is held up (its foreign key check waits on the worker's row)
        # while another worker finds it dead and re-queues what it holds: nothing yet
        reaper.execute(
            text("SELECT 1 FROM beanflow_workers WHERE id = :id FOR UPDATE"), {"id": worker.id}
        )
        locker = reaper.execute(text("SELECT pg_backend_pid()")).scalar()
        task = enqueue(session, workloads.slow_effect, key="k", flag=str(flag), seconds=3600)
        wait_for(
            lambda: session.execute(
                text("SELECT count(*) FROM pg_stat_activity WHERE :p = ANY(pg_blocking_pids(pid))"),
                {"p": locker},
            ).scalar(),
            "the claim to wait on the worker's row",
        )
        session.commit()
        reaper.execute(
            text("UPDATE beanflow_workers SET last_heartbeat = now() - interval '1 hour'")
        )
        assert reaper.execute(reap, found_dead).one() == (1, 0, 0)
        reaper.commit()
    # the claim then commits: the task runs under a worker found dead, which dies before its
    # next heartbeat could tell it to give the task back
    wait_for(flag.exists, "the task to start")
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert state_of(session, task) == TaskState.PROCESSING

    with app.engine.begin() as connection:
        assert connection.execute(reap, found_dead).one() == (0, 1, 1)
    session.refresh(task)
    assert (task.state, task.worker_id, task.crash_count) == (TaskState.PENDING, None, 1)
    assert task.error_message == f"its worker {worker.id} stopped heartbeating"


def test_concurrent_workers_run_each_task_exactly_once(session, workers, effects):
    processes = [workers.start("work", BATCH_SIZE=batch) for batch in (1, 1, 5, 5)]
    wait_for(lambda: len(worker_rows(session)) == 4, "four idle workers")
    # all four are asleep on LISTEN: one commit wakes them together
    bq.enqueue_many(session, workloads.write_effect, [{"key": f"k{n}"} for n in range(400)])
    session.commit()

    def done() -> int:
        return session.scalar(text("SELECT count(*) FROM beanflow_tasks WHERE state = 'DONE'"))

    wait_for(lambda: done() == 400, "every task to be done")
    for process in processes:
        process.send_signal(signal.SIGTERM)
    for process in processes:
        assert process.wait(60) == 0
    assert session.scalar(select(func.count()).select_from(Effect)) == 400
    workers_used, attempts = session.execute(
        text("SELECT count(DISTINCT worker_id), max(attempts) FROM beanflow_tasks")
    ).one()
    assert attempts == 1  # nothing ran twice
    assert workers_used > 1  # the work was shared


def test_worker_survives_a_server_restart(own_server, workers):
    """A server this test owns is restarted under a worker; the worker reconnects, LISTENs
    again, and processes what comes next."""
    app = bq.BeanQueue(bq.Config(env={}, DATABASE_URL=own_server.url))
    app.create_tables()
    workers.env["BEANFLOW_DATABASE_URL"] = own_server.url
    process = workers.start("work", **NO_POLLING)
    with app.session_factory() as session:
        first = enqueue(session, workloads.echo, value=1)
        wait_for(lambda: state_of(session, first) == TaskState.DONE, "the first task")

    own_server.restart()
    app.engine.dispose()
    with app.session_factory() as session:
        second = enqueue(session, workloads.echo, value=2)
        wait_for(lambda: state_of(session, second) == TaskState.DONE, "the task after restart")
    assert "lost its database connection" in workers.output(process)
    process.send_signal(signal.SIGTERM)
    assert process.wait(30) == 0
    app.engine.dispose()


def test_process_refuses_a_channel_without_processors(workers):
    process = workers.start("nobody")
    assert process.wait(30) == 2
    assert "no processor is registered for channel(s) 'nobody'" in workers.output(process)


def test_task_past_its_timeout_is_interrupted_and_failed(session, workers):
    stuck = enqueue(session, workloads.spin)
    after = enqueue(session, workloads.echo, value="next")
    process = workers.start("work")
    wait_for(lambda: state_of(session, after) == TaskState.DONE, "the task behind it")
    session.refresh(stuck)
    assert stuck.state == TaskState.FAILED
    assert stuck.error_message == "TaskTimeout: the task ran past its timeout of 0.5s"
    process.send_signal(signal.SIGTERM)
    assert process.wait(30) == 0


def test_a_task_that_drops_its_connection_does_not_kill_a_standalone_worker(session, workers):
    culprit = enqueue(session, workloads.hang_up)
    process = workers.start("work", MAX_WORKER_CRASHES=2, **NO_POLLING)
    wait_for(lambda: state_of(session, culprit) == TaskState.FAILED, "the culprit to fail")
    after = enqueue(session, workloads.echo, value="still here")
    wait_for(lambda: state_of(session, after) == TaskState.DONE, "the next task")
    assert process.poll() is None  # the same worker process, alive
    session.refresh(culprit)
    assert culprit.crash_count == 2
    process.send_signal(signal.SIGTERM)
    assert process.wait(30) == 0


def test_a_long_task_does_not_hold_its_batch_hostage(session, workers, effects, tmp_path):
    """Claimed together with a long task, the quick ones are given back once the window has
    passed, while the long one still runs, and another worker does them."""
    flag = tmp_path / "started"
    slow = bq.enqueue(session, workloads.slow_effect, key="slow", flag=str(flag), seconds=30)
    quick = [bq.enqueue(session, workloads.echo, value=n) for n in range(5)]
    session.commit()
    first = workers.start("work", BATCH_SIZE=10, BATCH_WINDOW=0.1, **NO_POLLING)
    wait_for(flag.exists, "the long task to start")
    second = workers.start("work", **NO_POLLING)
    for task in quick:
        wait_for(lambda task=task: state_of(session, task) == TaskState.DONE, "the quick ones")
    assert state_of(session, slow) == TaskState.PROCESSING  # still running meanwhile
    session.expire_all()
    holders = {w.pid: w.id for w in worker_rows(session)}
    assert {task.worker_id for task in quick} == {holders[second.pid]}
    assert all(task.attempts == 1 for task in quick)  # the given-back claim did not count
    assert all(EventType.REQUEUED in [e.type for e in task.events] for task in quick)
    first.kill()
    second.kill()


def test_cancelling_a_running_task_interrupts_it_and_rolls_it_back(
    session, workers, effects, tmp_path, app
):
    """The worker hears of the cancel by a notify on its control channel (it never polls:
    heartbeat and poll are an hour), and interrupts the task the way a timeout does."""
    flag = tmp_path / "started"
    task = enqueue(session, workloads.slow_effect, key="k", flag=str(flag), seconds=3600)
    hour = {"WORKER_HEARTBEAT_PERIOD": 3600, "WORKER_HEARTBEAT_TIMEOUT": 7200, **NO_POLLING}
    process = workers.start("work", **hour)
    wait_for(flag.exists, "the task to start")
    result = ops.Operations(app).cancel(session, [task.id], by="tester")
    session.commit()
    assert (result.cancelled, result.requested) == ([], [task.id])
    wait_for(lambda: state_of(session, task) == TaskState.CANCELLED, "the task to be cancelled")
    session.refresh(task)
    requested = session.get(Cancellation, task.id).requested_at
    print(f"cancelled {(task.finished_at - requested).total_seconds():.3f}s after the request")
    assert session.scalar(select(func.count()).select_from(Effect)) == 0  # rolled back
    assert task.error_message == "TaskCancelled: cancelled by tester"
    assert [e.type for e in task.events][-1] == EventType.CANCELLED
    assert process.poll() is None  # the worker goes on
    process.send_signal(signal.SIGTERM)
    assert process.wait(30) == 0


def test_a_cancelled_task_whose_worker_died_is_not_run_again(
    session, workers, effects, tmp_path, app
):
    flag = tmp_path / "started"
    task = enqueue(session, workloads.slow_effect, key="k", flag=str(flag), seconds=3600)
    victim = workers.start("work", WORKER_HEARTBEAT_PERIOD=0.2)
    wait_for(flag.exists, "the task to start")
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert ops.Operations(app).cancel(session, [task.id], by="tester").requested == [task.id]
    session.commit()
    workers.start("work", WORKER_HEARTBEAT_PERIOD=0.2, WORKER_HEARTBEAT_TIMEOUT=1)
    wait_for(lambda: state_of(session, task) == TaskState.CANCELLED, "the reaper to cancel it")
    session.refresh(task)
    assert task.error_message == "cancelled by tester"
    assert task.attempts == 1  # never started again


def test_a_worker_that_cannot_set_up_its_connection_tries_again(app, session, workers, db_url):
    """A table lock held elsewhere (an index being built, say) makes the worker's first
    statements wait past its ``lock_timeout``: it tries again with backoff until the lock is
    gone. Before, the connection that failed while it was being set up was never given back
    to the hot path's one-connection pool, and the worker could not connect again, ever."""
    task = enqueue(session, workloads.echo, value=1)
    holder = app.engine.connect()
    holder.execute(text("LOCK TABLE beanflow_events IN SHARE MODE"))
    waits_50ms = make_url(db_url).update_query_dict({"options": "-c lock_timeout=50"})
    workers.env["BEANFLOW_DATABASE_URL"] = waits_50ms.render_as_string(hide_password=False)
    process = workers.start("work", burst=True)
    refused = "canceling statement due to lock timeout"
    wait_for(lambda: workers.output(process).count(refused) >= 2, "two refused attempts")
    holder.rollback()
    holder.close()
    assert process.wait(60) == 0
    assert state_of(session, task) == TaskState.DONE

"""The operations API on a real database: listing, one task, counts, workers, retry, cancel,
purge; and a processor cancelling or snoozing itself."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
import uuid
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import create_engine, event, func, select, text

import beanflow as bq
from beanflow import metrics, ops
from beanflow.models import Cancellation, EventType, TaskState

from .conftest import create_database, database_url, drop_database
from .test_enqueue import Listening
from .test_queries import nodes


@pytest.fixture
def operations(app):
    return ops.Operations(app)


@pytest.fixture
def echo(app):
    @app.processor(channel="ops")
    def echo(value: int = 0) -> int:
        return value

    return echo


def add(session, processor, count, **columns):
    tasks = []
    for n in range(count):
        task = processor.run(value=n)
        for key, value in columns.items():
            setattr(task, key, value)
        session.add(task)
        tasks.append(task)
    session.commit()
    return tasks


def test_listing_is_newest_first_in_pages_that_do_not_overlap(session, operations, echo):
    tasks = add(session, echo, 120)
    seen, cursor = [], None
    while True:
        page = operations.tasks(session, after=cursor, limit=50)
        seen += [t.id for t in page.tasks]
        if page.next is None:
            break
        cursor = page.next
    assert len(seen) == 120 and set(seen) == {t.id for t in tasks}
    created = {t.id: (t.created_at, t.id) for t in tasks}
    assert [created[i] for i in seen] == sorted(created.values(), reverse=True)


def test_filters_combine(session, operations, echo, app):
    @app.processor(channel="other")
    def other() -> None:
        pass

    add(session, echo, 3)
    failed = add(session, echo, 2, state=TaskState.FAILED, error_message="ValueError: 50% off")
    add(session, other, 0)
    session.add(other.run())
    session.commit()

    def ids(**given):
        return {t.id for t in operations.tasks(session, ops.TaskFilter(**given)).tasks}

    assert ids(state=TaskState.FAILED) == {t.id for t in failed}
    assert len(ids(channel="ops")) == 5 and len(ids(channel="other")) == 1
    assert len(ids(processor="other")) == 1
    assert len(ids(processor=f"{echo.module}:echo")) == 5
    assert ids(error="50% OFF") == {t.id for t in failed}  # case-insensitive, % is literal
    assert ids(error="5_%") == set()
    assert ids(since=datetime.now(timezone.utc) + timedelta(hours=1)) == set()


def test_one_task_with_its_events_parent_and_children(session, operations, app, echo):
    root = echo.run(value=0)
    session.add(root)
    session.flush()
    children = []
    for n in range(3):
        child = echo.run(value=n)
        child.parent_id = root.id
        children.append(child)
        session.add(child)
    session.commit()
    assert app.process_tasks(["ops"], burst=True) == 0
    detail = operations.task(session, root.id)
    assert detail.task.id == root.id and detail.task.state == TaskState.DONE
    assert [e.type for e in detail.events] == [EventType.CLAIMED, EventType.COMPLETE]
    assert {c.id for c in detail.children} == {c.id for c in children}
    assert detail.child_count == 3
    assert operations.task(session, children[0].id).parent.id == root.id
    assert operations.task(session, uuid.uuid4()) is None


def test_counts_per_channel(session, operations, echo):
    add(session, echo, 3)
    add(session, echo, 2, scheduled_at=func.now() + timedelta(hours=1))
    add(session, echo, 4, state=TaskState.DONE, finished_at=func.now())
    add(session, echo, 1, state=TaskState.FAILED, finished_at=func.now())
    add(session, echo, 1, state=TaskState.DONE, finished_at=func.now() - timedelta(hours=2))
    (counts,) = operations.counts(session)
    assert (counts.channel, counts.due, counts.scheduled, counts.running) == ("ops", 3, 2, 0)
    assert (counts.done_last_hour, counts.failed_last_hour) == (4, 1)
    assert counts.oldest_due_age >= timedelta(0)


def test_workers_alive_and_gone_with_what_they_run(session, operations, app, echo):
    alive, gone = uuid.uuid4(), uuid.uuid4()
    session.add(bq.Worker(id=alive, name="here", channels=["ops"]))
    session.add(
        bq.Worker(
            id=gone,
            name="there",
            channels=["ops"],
            state="NO_HEARTBEAT",
            last_heartbeat=func.now() - timedelta(hours=1),
        )
    )
    session.commit()
    (running,) = add(session, echo, 1, state=TaskState.PROCESSING, worker_id=alive)
    found = {w.worker.id: w for w in operations.workers(session)}
    assert found[alive].alive and [t.id for t in found[alive].running] == [running.id]
    assert not found[gone].alive and found[gone].heartbeat_age > timedelta(minutes=59)


def test_retry_takes_failed_tasks_back_with_fresh_attempts(session, operations, echo, db_url):
    failed = add(
        session,
        echo,
        2,
        state=TaskState.FAILED,
        attempts=3,
        error_message="E: x",
        finished_at=func.now(),
    )
    (done,) = add(session, echo, 1, state=TaskState.DONE)
    listener = Listening(db_url, ["ops", "beanflow_test_sentinel"])
    assert operations.retry(session, [t.id for t in failed] + [done.id], by="tester") == 2
    session.commit()
    assert listener.received() == ["ops"]
    for task in failed:
        session.refresh(task)
        assert (task.state, task.attempts, task.finished_at) == (TaskState.PENDING, 0, None)
        assert task.events[-1].type == EventType.RETRIED
        assert task.events[-1].error_message == "retried by tester"
    session.refresh(done)
    assert done.state == TaskState.DONE


def test_retry_by_filter_goes_chunk_by_chunk(session, operations, echo, monkeypatch):
    monkeypatch.setattr(ops, "CHUNK", 7)
    add(session, echo, 20, state=TaskState.FAILED, error_message="boom")
    add(session, echo, 3, state=TaskState.FAILED, error_message="other")
    total = 0
    while count := operations.retry_matching(session, ops.TaskFilter(error="boom")):
        assert count <= 7
        session.commit()
        total += count
    assert total == 20
    states = dict(
        session.execute(select(bq.Task.state, func.count()).group_by(bq.Task.state)).all()
    )
    assert states == {TaskState.PENDING: 20, TaskState.FAILED: 3}
    with pytest.raises(bq.BeanflowError, match="only FAILED or CANCELLED"):
        operations.retry_matching(session, ops.TaskFilter(state=TaskState.DONE))


def test_cancel_a_pending_task_and_its_descendants(session, operations, echo, app):
    root, other = add(session, echo, 2)
    (child,) = add(session, echo, 1, parent_id=root.id)
    (grandchild,) = add(session, echo, 1, parent_id=child.id)
    (done,) = add(session, echo, 1, parent_id=root.id, state=TaskState.DONE)
    result = operations.cancel(session, [root.id], descendants=True, by="tester")
    session.commit()
    assert set(result.cancelled) == {root.id, child.id, grandchild.id}
    assert result.requested == []
    for task in (root, child, grandchild, done, other):
        session.refresh(task)
    assert [t.state for t in (root, child, grandchild)] == [TaskState.CANCELLED] * 3
    assert (done.state, other.state) == (TaskState.DONE, TaskState.PENDING)
    assert root.events[-1].type == EventType.CANCELLED
    assert app.process_tasks(["ops"], burst=True) == 0  # runs only the other one
    session.refresh(root)
    assert root.state == TaskState.CANCELLED


def test_cancel_a_running_task_records_a_request_and_notifies_its_worker(
    session, operations, echo, db_url
):
    (running,) = add(session, echo, 1, state=TaskState.PROCESSING)
    listener = Listening(db_url, ["beanflow_control", "beanflow_test_sentinel"])
    result = operations.cancel(session, [running.id], by="tester")
    assert listener.received() == []  # on commit only
    session.commit()
    assert result.requested == [running.id]
    assert listener.received() == ["beanflow_control"]
    assert session.get(Cancellation, running.id).requested_by == "tester"
    assert operations.task(session, running.id).cancel_requested is not None


def test_a_processor_may_cancel_or_snooze_its_own_task(session, app):
    @app.processor(channel="self")
    def give_up() -> None:
        raise bq.Cancel("nothing to do")

    @app.processor(channel="self", retry_policy=bq.LimitAttempt(2, bq.DelayRetry(timedelta(0))))
    def later() -> None:
        raise bq.Retry(3600, "the resource is busy")

    cancelled, snoozed = give_up.run(), later.run()
    session.add_all([cancelled, snoozed])
    session.commit()
    assert app.process_tasks(["self"], burst=True) == 0
    session.refresh(cancelled)
    session.refresh(snoozed)
    assert (cancelled.state, cancelled.error_message) == (
        TaskState.CANCELLED,
        "Cancel: nothing to do",
    )
    assert (snoozed.state, snoozed.attempts) == (TaskState.PENDING, 0)  # not counted
    assert snoozed.scheduled_at > datetime.now(timezone.utc) + timedelta(minutes=59)
    assert snoozed.events[-1].type == EventType.SNOOZED


def test_purge_removes_what_retention_no_longer_keeps_leaves_first(session, operations, echo, app):
    old = func.now() - timedelta(days=10)
    old_done = add(session, echo, 3, state=TaskState.DONE, finished_at=old)
    (fresh_done,) = add(session, echo, 1, state=TaskState.DONE, finished_at=func.now())
    (old_failed,) = add(session, echo, 1, state=TaskState.FAILED, finished_at=old)
    # a finished parent whose child is still pending stays until the child is gone
    (parent,) = add(session, echo, 1, state=TaskState.DONE, finished_at=old)
    (child,) = add(session, echo, 1, parent_id=parent.id)
    # a tree of old tasks goes whole, leaves first
    (root,) = add(session, echo, 1, state=TaskState.DONE, finished_at=old)
    add(session, echo, 2, state=TaskState.DONE, finished_at=old, parent_id=root.id)
    session.execute(
        text(
            "INSERT INTO beanflow_workers (id, name, channels, state, last_heartbeat) VALUES "
            "(gen_random_uuid(), 'gone', '{ops}', 'SHUTDOWN', now() - interval '30 days'), "
            "(gen_random_uuid(), 'recent', '{ops}', 'SHUTDOWN', now()), "
            "(gen_random_uuid(), 'holding', '{ops}', 'NO_HEARTBEAT', now() - interval '30 days')"
        )
    )
    # a task left to a worker long gone is the reaper's to take back: the row stays until then
    holding = session.scalar(select(bq.Worker.id).where(bq.Worker.name == "holding"))
    (held,) = add(session, echo, 1, state=TaskState.PROCESSING, worker_id=holding)
    session.commit()
    old_ids = {t.id for t in old_done}
    kept = {fresh_done.id, old_failed.id, parent.id, child.id, held.id}
    retention = ops.Retention(done=timedelta(days=7), failed=timedelta(days=30))
    totals = operations.purge_all(retention)
    assert totals["tasks done"] == 3 + 1 + 2  # old_done, the root and its two children
    assert totals["workers"] == 1
    remaining = set(session.scalars(select(bq.Task.id)))
    assert remaining == kept and not remaining & old_ids
    assert sorted(session.scalars(select(bq.Worker.name))) == ["holding", "recent"]


def test_purge_leaves_a_task_that_a_users_row_still_references(session, operations, echo):
    """The user's own rows may point at their task with a foreign key that forbids deleting
    it (the reference README's models do): such a task stays, the rest goes, nothing fails."""
    session.execute(
        text(
            'CREATE SCHEMA shop; CREATE TABLE shop."Receipts" (task_id uuid REFERENCES '
            "beanflow_tasks (id)); CREATE TABLE notes (task_id uuid REFERENCES beanflow_tasks "
            "(id) ON DELETE RESTRICT)"
        )
    )
    old = func.now() - timedelta(days=10)
    receipted, noted, *others = add(session, echo, 4, state=TaskState.DONE, finished_at=old)
    session.execute(text('INSERT INTO shop."Receipts" VALUES (:id)'), {"id": receipted.id})
    session.execute(text("INSERT INTO notes VALUES (:id)"), {"id": noted.id})
    session.commit()

    totals = operations.purge_all(ops.Retention(done=timedelta(days=7)))
    assert totals["tasks done"] == 2
    assert set(session.scalars(select(bq.Task.id))) == {receipted.id, noted.id}

    session.execute(text('DELETE FROM shop."Receipts"'))
    session.commit()
    assert operations.purge_all(ops.Retention(done=timedelta(days=7)))["tasks done"] == 1
    assert session.scalars(select(bq.Task.id)).all() == [noted.id]


@pytest.fixture(scope="module")
def big_table(server_url, template_database):
    """1,000,000 task rows as a long-running deployment has them: mostly done over the last
    month, some failed and cancelled, 10,000 pending, a parent every 100 rows; analyzed."""
    name = create_database(server_url, template_database)
    engine = create_engine(database_url(server_url, name))
    with engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO beanflow_tasks (id, channel, module, name, state, created_at, "
                "finished_at, error_message) SELECT gen_random_uuid(), 'c' || (n % 4), 'm', "
                "'f' || (n % 7), s, now() - n * interval '2.5 seconds', "
                "CASE WHEN s = 'PENDING' THEN NULL ELSE now() - n * interval '2.5 seconds' END, "
                "CASE WHEN s = 'FAILED' THEN 'E: failure ' || n END FROM ("
                "SELECT n, CASE WHEN n % 100 = 1 THEN 'PENDING' WHEN n % 200 = 2 THEN 'FAILED' "
                "WHEN n % 200 = 3 THEN 'CANCELLED' ELSE 'DONE' END AS s "
                "FROM generate_series(1, 1000000) AS n) AS rows"
            )
        )
        connection.execute(text("ANALYZE beanflow_tasks"))
    app = bq.BeanQueue(bq.Config(env={}, DATABASE_URL=database_url(server_url, name)))
    yield app
    app.engine.dispose()
    engine.dispose()
    drop_database(server_url, name)


@pytest.mark.slow
def test_every_operation_is_served_by_an_index_on_a_large_table(big_table):
    """No sequential scan of the task table in any statement of a listing (with each filter),
    a task's page, the counts, the throughput, a retry by filter or a purge chunk."""
    plans: list[tuple[str, dict]] = []

    @event.listens_for(big_table.engine, "before_cursor_execute")
    def explain(connection, cursor, statement, parameters, context, executemany):
        if statement.lstrip().upper().startswith(("SELECT", "DELETE", "UPDATE", "WITH")):
            cursor.execute("EXPLAIN (FORMAT JSON) " + statement, parameters)
            plans.append((statement, cursor.fetchone()[0][0]["Plan"]))

    operations = ops.Operations(big_table)
    day_ago = datetime.now(timezone.utc) - timedelta(days=1)
    with big_table.session_factory() as session:
        page = operations.tasks(session)
        operations.tasks(session, after=page.next)
        for where in (
            ops.TaskFilter(state=TaskState.FAILED),
            ops.TaskFilter(channel="c1", since=day_ago),
            ops.TaskFilter(processor="f3"),
            ops.TaskFilter(error="failure 99"),
        ):
            operations.tasks(session, where)
        operations.task(session, page.tasks[0].id)
        operations.counts(session)
        operations.throughput(session)
        operations.workers(session)
        operations.retry_matching(session, ops.TaskFilter(channel="c2"))
        operations.purge(session, ops.Retention(done=timedelta(days=7)))
        session.rollback()
    event.remove(big_table.engine, "before_cursor_execute", explain)
    assert len(plans) > 12
    for statement, root in plans:
        scans = [n for n in nodes(root) if n.get("Relation Name") == "beanflow_tasks"]
        assert not [n for n in scans if n["Node Type"] == "Seq Scan"], statement


def test_health_says_what_is_missing(app, monkeypatch, tmp_path):
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    running = [1]
    server = metrics.MetricsServer(ops.Operations(app), lambda: (running[0], 1), port=0)
    server.start()
    try:

        def health() -> tuple[int, dict]:
            url = f"http://127.0.0.1:{server.port}/healthz"
            try:
                with urllib.request.urlopen(url, timeout=10) as reply:
                    return reply.status, json.loads(reply.read())
            except urllib.error.HTTPError as error:
                return error.code, json.loads(error.read())

        assert health() == (
            200,
            {"workers": {"running": 1, "expected": 1}, "database": "ok", "healthy": True},
        )
        running[0] = 0  # a worker died and is not back yet
        status, report = health()
        assert status == 503 and report["healthy"] is False
    finally:
        server.stop()


def test_retention_runs_one_instance_at_a_time(session, app, echo):
    add(session, echo, 5, state=TaskState.DONE, finished_at=func.now() - timedelta(days=30))
    service = ops.RetentionService(ops.Operations(app), ops.Retention())
    with app.engine.connect() as other:  # another deployment's retention at work
        other.execute(select(func.pg_advisory_lock(ops.RetentionService.LOCK_KEY)))
        other.commit()
        service.run_once()
        assert session.scalar(select(func.count()).select_from(bq.Task)) == 5
        other.execute(select(func.pg_advisory_unlock(ops.RetentionService.LOCK_KEY)))
        other.commit()
    service.run_once()
    assert session.scalar(select(func.count()).select_from(bq.Task)) == 0


def test_validate_refuses_a_catch_up_longer_than_retention(tmp_path):
    spec = tmp_path / "beanflow.yaml"
    spec.write_text(
        "version: 1\n"
        "processors:\n"
        "  echo: {function: 'tests.workloads.app:echo', channel: work}\n"
        "schedules:\n"
        "  daily: {processor: echo, cron: '0 3 * * *', kwargs: {value: 1}, catch_up: 10}\n"
        "retention: {done: 7d}\n"
    )
    with pytest.raises(bq.SpecError, match="catch_up 10 reaches back"):
        bq.load(spec, default=False)

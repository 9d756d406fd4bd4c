"""The worker's run/complete/fail/retry behaviour, in process (``burst``), on real PostgreSQL."""

from __future__ import annotations

import datetime
import logging
import re
import sys

import pytest
from sqlalchemy import event, func, literal, select, text, update
from sqlalchemy import inspect as sa_inspect

import beanflow as bq
from beanflow.engine.connections import TaskLoader
from beanflow.models import EventType, TaskState

from .workloads.app import Effect, UserBase


@pytest.fixture
def effects(app: bq.BeanQueue) -> type[Effect]:
    UserBase.metadata.create_all(app.engine)
    return Effect


def drain(app: bq.BeanQueue, *channels: str) -> None:
    assert app.process_tasks(channels or ("default",), burst=True) == 0


def tasks(session, **where):
    session.expire_all()
    return session.scalars(select(bq.Task).filter_by(**where).order_by(bq.Task.created_at)).all()


def test_task_completes_with_its_result_and_events(app, session):
    @app.processor(channel="default")
    def add(a: int, b: int) -> int:
        return a + b

    task = bq.enqueue(session, add, a=2, b=3)
    session.commit()
    drain(app)

    session.refresh(task)
    assert task.state == TaskState.DONE
    assert task.result == 5
    assert task.attempts == 1
    assert task.started_at is not None and task.finished_at >= task.started_at
    assert [e.type for e in task.events] == [EventType.CLAIMED, EventType.COMPLETE]


def test_db_task_and_savepoint_are_injected_by_name(app, session, effects):
    seen = {}

    @app.processor(channel="default")
    def inspect_arguments(db, task, savepoint, key: str) -> None:
        seen.update(db=db, task=task, savepoint=savepoint)
        db.add(effects(key=key))

    task = bq.enqueue(session, inspect_arguments, key="k")
    session.commit()
    drain(app)

    assert seen["task"].id == task.id
    assert seen["savepoint"].nested
    assert session.scalar(select(func.count()).select_from(effects)) == 1


def test_user_can_roll_back_its_savepoint(app, session, effects):
    @app.processor(channel="default")
    def undo(db, savepoint, key: str) -> str:
        db.add(effects(key=key))
        db.flush()
        savepoint.rollback()
        return "undone"

    task = bq.enqueue(session, undo, key="k")
    session.commit()
    drain(app)

    session.refresh(task)
    assert task.state == TaskState.DONE and task.result == "undone"
    assert session.scalar(select(func.count()).select_from(effects)) == 0


@pytest.mark.parametrize("batch_size", [1, 4])
def test_failure_rolls_back_only_that_task(app, session, effects, batch_size):
    app.config.BATCH_SIZE = batch_size

    @app.processor(channel="default")
    def write(db, key: str) -> None:
        db.add(effects(key=key))
        db.flush()
        if key == "bad":
            raise ValueError("no bad keys")

    for key in ("a", "bad", "b", "c"):
        bq.enqueue(session, write, key=key)
    session.commit()
    drain(app)

    states = {t.kwargs["key"]: t.state for t in tasks(session)}
    assert states == {
        "a": TaskState.DONE,
        "bad": TaskState.FAILED,
        "b": TaskState.DONE,
        "c": TaskState.DONE,
    }
    keys = set(session.scalars(select(effects.key)))
    assert keys == {"a", "b", "c"}
    failed = tasks(session, state=TaskState.FAILED)[0]
    assert failed.error_message == "ValueError: no bad keys"
    event = failed.events[-1]
    assert event.type == EventType.FAILED
    assert event.exception_type == "builtins.ValueError"
    assert 'raise ValueError("no bad keys")' in event.traceback


def test_a_task_that_succeeds_is_logged_at_debug_and_one_that_fails_at_warning(
    app, session, caplog
):
    """At the default INFO a fast drain writes no line per task (two formatted lines per task
    would cost it a fifth to a third of its rate); failures and retries are always logged."""

    policy = bq.LimitAttempt(2, bq.DelayRetry(delay=datetime.timedelta(seconds=0)))

    @app.processor(channel="default", retry_policy=policy)
    def maybe(ok: bool) -> None:
        if not ok:
            raise ValueError("not ok")

    good, bad = bq.enqueue(session, maybe, ok=True), bq.enqueue(session, maybe, ok=False)
    session.commit()
    with caplog.at_level(logging.DEBUG, logger="beanflow"):
        drain(app)
    lines = {
        (r.levelno, r.getMessage().split(" ", 2)[1])
        for r in caplog.records
        if r.getMessage().startswith("task ")
    }
    assert (logging.DEBUG, str(good.id)) in lines
    assert (logging.WARNING, str(bad.id)) in lines  # attempt 1/2, retried
    assert (logging.ERROR, str(bad.id)) in lines  # giving up after 2/2
    assert not [
        r for r in caplog.records if r.levelno == logging.INFO and str(good.id) in r.getMessage()
    ]


def test_delay_retry_reschedules_then_limit_attempt_fails(app, session):
    policy = bq.LimitAttempt(3, bq.DelayRetry(delay=datetime.timedelta(seconds=0)))

    @app.processor(channel="default", retry_policy=policy)
    def flaky() -> None:
        raise RuntimeError("still broken")

    task = bq.enqueue(session, flaky)
    session.commit()
    drain(app)

    session.refresh(task)
    assert task.state == TaskState.FAILED
    assert task.attempts == 3
    assert [e.type for e in task.events] == [
        EventType.CLAIMED,
        EventType.FAILED_RETRY_SCHEDULED,
        EventType.CLAIMED,
        EventType.FAILED_RETRY_SCHEDULED,
        EventType.CLAIMED,
        EventType.FAILED,
    ]


def test_retry_is_scheduled_by_the_policy(app, session):
    @app.processor(channel="default", retry_policy=bq.DelayRetry(datetime.timedelta(hours=1)))
    def later() -> None:
        raise RuntimeError("try again later")

    task = bq.enqueue(session, later)
    session.commit()
    drain(app)

    session.refresh(task)
    assert task.state == TaskState.PENDING
    assert task.worker_id is None
    in_an_hour = session.scalar(select(func.now() + datetime.timedelta(hours=1)))
    assert abs((task.scheduled_at - in_an_hour).total_seconds()) < 60
    assert task.events[-1].scheduled_at == task.scheduled_at


def test_custom_policy_callable_returning_sql(app, session):
    def my_retry_policy(task):
        return None if task.attempts >= 2 else func.now()

    @app.processor(channel="default", retry_policy=my_retry_policy)
    def twice() -> None:
        raise RuntimeError("x")

    task = bq.enqueue(session, twice)
    session.commit()
    drain(app)
    session.refresh(task)
    assert (task.state, task.attempts) == (TaskState.FAILED, 2)


def test_retry_exceptions_filter(app, session):
    policy = bq.DelayRetry(delay=datetime.timedelta(0))

    @app.processor(channel="default", retry_policy=policy, retry_exceptions=ValueError)
    def picky(kind: str) -> None:
        if kind == "value" and picky_calls.setdefault(kind, 0) < 1:
            picky_calls[kind] += 1
            raise ValueError("retried")
        if kind == "type":
            raise TypeError("not retried")

    picky_calls: dict[str, int] = {}
    value = bq.enqueue(session, picky, kind="value")
    type_ = bq.enqueue(session, picky, kind="type")
    session.commit()
    drain(app)

    session.refresh(value)
    session.refresh(type_)
    assert (value.state, value.attempts) == (TaskState.DONE, 2)
    assert (type_.state, type_.attempts) == (TaskState.FAILED, 1)


def test_retries_work_with_events_switched_off(app, session):
    app.config.EVENTS = False
    policy = bq.LimitAttempt(2, bq.DelayRetry(delay=datetime.timedelta(0)))

    @app.processor(channel="default", retry_policy=policy)
    def flaky() -> None:
        raise RuntimeError("x")

    task = bq.enqueue(session, flaky)
    session.commit()
    drain(app)
    session.refresh(task)
    assert (task.state, task.attempts, task.events) == (TaskState.FAILED, 2, [])


def test_exponential_backoff_delays_grow_to_the_cap():
    policy = bq.ExponentialBackoffRetry(base=2, max_delay=datetime.timedelta(seconds=10))
    delays = [policy.delay(attempts).total_seconds() for attempts in range(1, 7)]
    assert delays == [1, 2, 4, 8, 10, 10]
    jittered = bq.ExponentialBackoffRetry(base=2, jitter=0.5)
    assert all(4 <= jittered.delay(4).total_seconds() <= 8 for _ in range(50))


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            "return object()",
            "ResultNotStorable: the task's result cannot be stored as JSON: "
            "result: a object is not JSON",
        ),
        ("raise SystemExit(3)", "SystemExit: 3"),
        ("raise KeyboardInterrupt()", "KeyboardInterrupt"),
    ],
)
def test_poison_results_fail_the_task_and_the_worker_goes_on(app, session, body, message):
    namespace: dict = {"__name__": __name__}
    exec(f"def poison():\n    {body}\n", namespace)  # noqa: S102 - builds the poison body
    poison = app.processor(channel="default")(namespace["poison"])

    @app.processor(channel="default")
    def fine() -> str:
        return "ok"

    bad = bq.enqueue(session, poison)
    good = bq.enqueue(session, fine)
    session.commit()
    drain(app)

    session.refresh(bad)
    session.refresh(good)
    assert bad.state == TaskState.FAILED
    assert bad.error_message.startswith(message)
    assert (good.state, good.result) == (TaskState.DONE, "ok")


def test_unregistered_function_fails_without_importing_anything(app, session):
    @app.processor(channel="default")
    def registered() -> None:
        pass

    module = "tests.never_imported_module"
    task = bq.Task(channel="default", module=module, name="anything")
    session.add(task)
    session.commit()
    drain(app)

    session.refresh(task)
    assert task.state == TaskState.FAILED
    assert task.error_message.startswith(
        f"ProcessorNotFound: no processor registered for {module}.anything"
    )
    assert module not in sys.modules


def test_child_tasks_are_linked_to_their_parent(app, session):
    @app.processor(channel="default")
    def child(n: int) -> int:
        return n

    @app.processor(channel="default")
    def parent(db) -> None:
        bq.enqueue(db, child, n=1)
        db.add(child.run(n=2))
        bq.enqueue_many(db, child, [{"n": 3}, {"n": 4}])

    root = bq.enqueue(session, parent)
    session.commit()
    drain(app)

    session.refresh(root)
    assert sorted(c.kwargs["n"] for c in root.children) == [1, 2, 3, 4]
    assert all(c.state == TaskState.DONE for c in root.children)
    assert root.parent_id is None


def test_late_completion_is_refused(app, session, effects):
    """A task taken from its worker (found dead) while running: the worker's completion and the
    task's own changes are discarded, so the task is not completed twice."""

    @app.processor(channel="default")
    def taken_away(db, task, key: str) -> None:
        db.add(effects(key=key))
        with app.engine.begin() as other:  # what the reaper does to a dead worker's task
            other.execute(
                update(bq.Task).where(bq.Task.id == task.id).values(state="PENDING", worker_id=None)
            )

    task = bq.enqueue(session, taken_away, key="k")
    session.commit()
    app.config.BATCH_SIZE = 1
    worker_module = sys.modules["beanflow.engine.worker"]
    worker = worker_module.TaskWorker(app, ["default"], burst=True)
    worker._register()
    worker._connect()
    claimed = worker._claim()
    worker._process(claimed)
    worker._disconnect()

    session.refresh(task)
    assert task.state == TaskState.PENDING
    assert session.scalar(select(func.count()).select_from(effects)) == 0
    assert [e.type for e in task.events] == [EventType.CLAIMED]


def test_scheduled_task_is_not_claimed_before_it_is_due(app, session):
    @app.processor(channel="default")
    def later() -> None:
        pass

    task = later.run()
    task.scheduled_at = func.now() + datetime.timedelta(minutes=3)
    session.add(task)
    session.commit()
    drain(app)
    session.refresh(task)
    assert task.state == TaskState.PENDING and task.attempts == 0


def test_worker_refuses_channels_without_processors(app):
    with pytest.raises(LookupError, match="no processor is registered for channel"):
        app.process_tasks(["nobody"], burst=True)


def test_claim_takes_batch_size_in_schedule_order(app, session):
    app.config.BATCH_SIZE = 3

    @app.processor(channel="default")
    def noop(n: int) -> None:
        pass

    bq.enqueue_many(session, noop, [{"n": n} for n in range(5)])
    session.commit()
    worker = sys.modules["beanflow.engine.worker"].TaskWorker(app, ["default"])
    worker._register()
    worker._connect()
    claimed = worker._claim()
    assert [t.kwargs["n"] for t in claimed] == [0, 1, 2]
    assert (
        session.scalar(text("SELECT count(*) FROM beanflow_tasks WHERE state = 'PROCESSING'")) == 3
    )
    worker._shut_down()  # returns what it holds
    assert session.scalar(text("SELECT count(*) FROM beanflow_tasks WHERE state = 'PENDING'")) == 5


def test_a_task_behind_the_claims_frontier_is_claimed_within_a_full_claim(app, session):
    """Claims start to read the pending tasks at the oldest one the last claim took (past
    the dead index entries of those claimed before). A task that becomes pending behind
    that frontier (committed late with an older scheduled_at) is taken by the claim from the
    start made every FULL_EVERY claims, not left for when the queue runs dry."""
    from beanflow.engine.batch import Frontier

    app.config.BATCH_SIZE = 10
    count = 10 * 3 * Frontier.FULL_EVERY

    @app.processor(channel="default")
    def noop(db, n: int) -> None:
        if n == 0:  # the first task: a task due long ago, pending once this batch commits
            late = noop.run(n=-1)
            late.scheduled_at = datetime.datetime(2000, 1, 1, tzinfo=datetime.timezone.utc)
            db.add(late)

    bq.enqueue_many(session, noop, [{"n": n} for n in range(count)])
    session.commit()
    drain(app)
    started = session.scalar(
        text(
            "SELECT count(*) FROM beanflow_tasks WHERE started_at < "
            "(SELECT started_at FROM beanflow_tasks WHERE kwargs = '{\"n\": -1}')"
        )
    )
    # claimed by the 16th claim at the latest, long before the queue ran dry
    assert 10 <= started <= 10 * Frontier.FULL_EVERY, started


def test_a_batch_is_completed_and_the_next_claimed_by_one_statement(app, session):
    """A worker's transaction between two batches is one statement and its commit: the
    completions of the batch that ran and the claim of the next travel together."""
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    app.config.BATCH_SIZE = 10

    @app.processor(channel="default")
    def noop(n: int) -> None:
        pass

    bq.enqueue_many(session, noop, [{"n": n} for n in range(30)])
    session.commit()
    sent: list[str] = []

    def record(conn, cursor, statement, parameters, context, executemany):
        sent.append(statement)

    event.listen(Engine, "before_cursor_execute", record)
    try:
        drain(app)
    finally:
        event.remove(Engine, "before_cursor_execute", record)
    # each EXECUTE's statement, its claim's size left out
    hot = [
        re.sub(r"_\d+$", "", s.split("(")[0].split()[-1]) for s in sent if "EXECUTE beanflow_c" in s
    ]
    # the first claim alone; three batches, each completed with the next claim (the third
    # finds none); the burst's last look, alone (the warm-up at connect aside)
    assert hot == [
        "beanflow_complete",
        "beanflow_claim",
        "beanflow_complete_claim",
        "beanflow_complete_claim",
        "beanflow_complete_claim",
        "beanflow_claim",
    ], hot
    assert session.scalar(text("SELECT count(*) FROM beanflow_tasks WHERE state = 'DONE'")) == 30


def test_a_failed_flush_fails_only_its_task(app, session, effects):
    @app.processor(channel="default")
    def duplicate(db, key: str) -> None:
        db.add(effects(key=key))
        db.add(effects(key=key))  # IntegrityError when flushed

    @app.processor(channel="default")
    def fine(db, key: str) -> None:
        db.add(effects(key=key))

    bad = bq.enqueue(session, duplicate, key="dup")
    good = bq.enqueue(session, fine, key="ok")
    session.commit()
    drain(app)

    session.refresh(bad)
    session.refresh(good)
    assert bad.state == TaskState.FAILED and "IntegrityError" in bad.error_message
    assert good.state == TaskState.DONE
    assert session.scalars(select(effects.key)).all() == ["ok"]


def test_a_processor_without_auto_complete_decides_its_outcome(app, session, effects):
    @app.processor(channel="default", auto_complete=False)
    def decides(db, task, key: str, verdict: str) -> str:
        db.add(effects(key=key))
        if verdict == "done":
            bq.complete(task, {"key": key})
        elif verdict == "failed":
            bq.fail(task, "the upstream said no")
        return "ignored: the processor decides"

    done = bq.enqueue(session, decides, key="a", verdict="done")
    failed = bq.enqueue(session, decides, key="b", verdict="failed")
    forgot = bq.enqueue(session, decides, key="c", verdict="nothing")
    session.commit()
    drain(app)  # a burst ends: nothing is left PROCESSING or re-queued for ever

    session.expire_all()
    assert (done.state, done.result) == (TaskState.DONE, {"key": "a"})
    assert done.finished_at is not None and done.worker_id is not None
    assert (failed.state, failed.error_message) == (
        TaskState.FAILED,
        "TaskFailed: the upstream said no",
    )
    assert forgot.state == TaskState.FAILED
    assert forgot.error_message.startswith(
        "NotCompleted: decides returned without completing its task: with auto_complete off, "
        "call beanflow.complete(task, result) or beanflow.fail(task, message) first"
    )
    assert session.scalars(select(effects.key)).all() == ["a"]  # the others rolled back


def test_complete_overrides_the_return_value(app, session):
    @app.processor(channel="default")
    def overrides(task) -> str:
        bq.complete(task, "from complete()")
        return "from return"

    task = bq.enqueue(session, overrides)
    session.commit()
    drain(app)
    session.refresh(task)
    assert (task.state, task.result) == (TaskState.DONE, "from complete()")


def test_a_claimed_task_is_the_object_the_orm_would_load(app, session):
    """The worker makes the claimed tasks' objects itself (``TaskLoader``): each is persistent
    in the processor's session, holds every column as the database has it, loads its
    relationships on access and tracks its changes like any object the ORM loaded."""
    seen = {}

    @app.processor(channel="default")
    def child(db, task) -> None:
        state = sa_inspect(task)
        seen.update(
            persistent=state.persistent and task in db,
            unloaded=set(state.unloaded),
            values={c.key: getattr(task, c.key) for c in state.mapper.column_attrs},
            parent=task.parent.id,
            events=[e.type for e in task.events],
        )
        task.unique_key = "set by its processor"  # flushed with its completion

    @app.processor(channel="default")
    def parent(db) -> None:
        bq.enqueue(db, child)

    root = bq.enqueue(session, parent)
    session.commit()
    drain(app)

    relationships = set(sa_inspect(bq.Task).relationships.keys())
    assert seen["persistent"]
    assert seen["unloaded"] <= relationships  # every column was loaded
    assert seen["parent"] == root.id
    assert seen["events"] == [EventType.CLAIMED]
    task = tasks(session, parent_id=root.id)[0]
    assert task.unique_key == "set by its processor"
    as_claimed = {"state": TaskState.PROCESSING, "unique_key": None, "finished_at": None}
    stored = {c.key: getattr(task, c.key) for c in sa_inspect(bq.Task).column_attrs}
    assert seen["values"] == stored | as_claimed | {"result": None}


def test_a_task_model_that_listens_for_loads_is_loaded_by_the_orm(app, session):
    """A model with a ``load`` event (a reconstructor, say) gets what the ORM's loading
    does: the event runs for each claimed task."""
    loaded = []

    def on_load(task, context) -> None:
        loaded.append(task.id)

    @app.processor(channel="default")
    def noop() -> None:
        pass

    ids = [bq.enqueue(session, noop).id for _ in range(3)]
    session.commit()
    event.listen(bq.Task, "load", on_load)
    try:
        drain(app)
    finally:
        event.remove(bq.Task, "load", on_load)
    assert sorted(loaded) == sorted(ids)
    assert all(t.state == TaskState.DONE for t in tasks(session))


def test_the_task_loader_updates_an_object_already_in_the_session(app, session):
    """A claimed row whose task is in the session already updates that object (the one
    others hold), as a refresh would; it does not make a second one."""

    @app.processor(channel="default")
    def noop() -> None:
        pass

    held = bq.enqueue(session, noop)
    session.commit()
    session.execute(update(bq.Task).values(attempts=7, kwargs={"n": 1}))
    columns = list(bq.Task.__table__.c)
    rows = session.execute(select(literal(1), *columns)).all()
    loader = TaskLoader(bq.Task)
    assert loader.loads(session)
    (task,) = loader.load(session, rows, 1)
    assert task is held
    assert (task.attempts, task.kwargs) == (7, {"n": 1})
    state, columns = sa_inspect(task), {c.key for c in sa_inspect(bq.Task).column_attrs}
    assert state.persistent and not state.expired_attributes & columns and not session.dirty


def test_the_task_loader_leaves_to_the_orm_a_model_that_is_more_than_columns():
    """Columns only: a model with a composite or a reconstructor (load events), inheritance,
    a version counter or a property computed in SQL is loaded by the ORM."""
    from sqlalchemy import Integer, String
    from sqlalchemy.orm import (
        DeclarativeBase,
        column_property,
        composite,
        mapped_column,
        reconstructor,
    )

    class Base(DeclarativeBase):
        pass

    class Plain(bq.TaskModelMixin, Base):
        __tablename__ = "plain"

    class Reconstructed(bq.TaskModelMixin, Base):
        __tablename__ = "reconstructed"

        @reconstructor
        def init_on_load(self) -> None:
            self.seen = True

    class Point:
        def __init__(self, x: int, y: int) -> None:
            self.x, self.y = x, y

        def __composite_values__(self) -> tuple[int, int]:
            return self.x, self.y

    class Composite(bq.TaskModelMixin, Base):
        __tablename__ = "composite"
        x = mapped_column(Integer, default=0)
        y = mapped_column(Integer, default=0)
        point = composite(Point, "x", "y")

    class Versioned(bq.TaskModelMixin, Base):
        __tablename__ = "versioned"
        version = mapped_column(Integer)
        __mapper_args__ = {"version_id_col": version}

    class Computed(bq.TaskModelMixin, Base):
        __tablename__ = "computed"
        label = column_property(bq.TaskModelMixin.module + ".")  # type: ignore[operator]

    class Parent(bq.TaskModelMixin, Base):
        __tablename__ = "parent"
        kind = mapped_column(String)
        __mapper_args__ = {"polymorphic_on": kind, "polymorphic_identity": "parent"}

    class Child(Parent):
        __mapper_args__ = {"polymorphic_identity": "child"}

    assert TaskLoader(Plain).plain and TaskLoader(bq.Task).plain
    for model in (Reconstructed, Composite, Versioned, Computed, Parent, Child):
        assert not TaskLoader(model).plain, model.__name__


def test_the_task_loader_puts_each_column_under_its_attributes_name(app, session):
    """A model whose attribute is named apart from its column (``note`` for ``task_note``)
    gets the column's value under the attribute's name."""
    from sqlalchemy import String
    from sqlalchemy.orm import DeclarativeBase, mapped_column

    class Base(DeclarativeBase):
        pass

    class Renamed(bq.TaskModelMixin, Base):
        __tablename__ = "renamed_tasks"
        note = mapped_column("task_note", String, nullable=True)

    Base.metadata.create_all(app.engine)
    session.execute(
        Renamed.__table__.insert().values(channel="c", module="m", name="f", task_note="kept")
    )
    rows = session.execute(select(*Renamed.__table__.c)).all()
    (task,) = TaskLoader(Renamed).load(session, rows, 0)
    assert (task.note, task.channel, sa_inspect(task).persistent) == ("kept", "c", True)

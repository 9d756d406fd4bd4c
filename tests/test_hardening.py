"""Nothing a task or a row does stalls the queue or kills its worker: every failure is charged
to the task that caused it, and its neighbours in the batch complete."""

from __future__ import annotations

import contextlib
import datetime
import threading
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import exc, func, literal, select, text

import beanflow as bq
from beanflow import db
from beanflow.engine.worker import TaskWorker
from beanflow.models import TaskState

from .helpers import wait_for
from .workloads.app import Effect, UserBase

BATCH = 10


class StrRaises(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no message for you")


CONTAINS_ITSELF: list = []
CONTAINS_ITSELF.append(CONTAINS_ITSELF)

BAD_RESULTS = {
    "nan": (float("nan"), "result: nan is not a JSON number"),
    "infinity": ([1, float("inf")], "result[1]: inf is not a JSON number"),
    "minus infinity": ({"x": float("-inf")}, "result['x']: -inf is not a JSON number"),
    "NUL": ({"text": "a\x00b"}, "result['text']: the NUL character"),
    "NUL in a key": ({"a\x00": 1}, "the NUL character"),
    "lone surrogate": (["\ud800"], "result[0]: a lone surrogate"),
    "not JSON": ({"when": object()}, "result['when']: a object is not JSON"),
    "contains itself": (
        CONTAINS_ITSELF,
        "nested too deeply (or it contains itself)",
    ),
}

BAD_EXCEPTIONS = {
    "str raises": (StrRaises(), "StrRaises: <its message could not be read"),
    "1 MB message": (ValueError("x" * 1_000_000), "more characters not stored)"),
    "NUL in the message": (ValueError("bad\x00byte"), "ValueError: bad\\x00byte"),
    "lone surrogate in the message": (ValueError("bad \udc80 byte"), "ValueError: bad ? byte"),
    "snoozed past year 9999": (bq.Retry(after=1e12), "not snoozed: later than a task can be due"),
    "snoozed for the longest timedelta": (
        bq.Retry(after=datetime.timedelta.max),
        "not snoozed: later than a task can be due",
    ),
}


class _Sends:
    """An outcome: the task sends a statement with this parameter."""

    def __init__(self, value: object) -> None:
        self.value = value


class _Does:
    """An outcome: the task calls ``action(db, task, savepoint)`` after its write, and returns."""

    def __init__(self, action: Callable[[Any, Any, Any], object]) -> None:
        self.action = action


@pytest.fixture
def effects(app):
    UserBase.metadata.create_all(app.engine)
    return Effect


def run_batch_with_one_bad(app, session, effects, outcome, batches: int = 1) -> tuple[list, object]:
    """Enqueue ``batches`` batches of 10 writing tasks, the 5th of which ends with ``outcome``
    (a value it returns, or an exception it raises); drain them; return (good, bad)."""
    app.config.BATCH_SIZE = BATCH

    @app.processor(channel="default")
    def batch_member(db, task, savepoint, key: str, bad: bool) -> object:
        if bad and isinstance(outcome, _Sends):  # the task's first statement
            db.execute(text("SELECT :value"), {"value": outcome.value})
        db.add(effects(key=key))
        if not bad:
            return key
        if isinstance(outcome, _Does):
            db.flush()
            outcome.action(db, task, savepoint)
            return key
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    count = BATCH * batches
    tasks = [bq.enqueue(session, batch_member, key=f"k{n}", bad=n == 4) for n in range(count)]
    session.commit()
    assert app.process_tasks(["default"], burst=True) == 0  # the worker lived to the end
    session.expire_all()
    bad = tasks.pop(4)
    return tasks, bad


def assert_only_the_bad_one_failed(session, good, bad, message: str) -> None:
    assert [task.state for task in good] == [TaskState.DONE] * (BATCH - 1)
    assert [task.attempts for task in good] == [1] * (BATCH - 1)
    assert bad.state == TaskState.FAILED
    assert message in bad.error_message
    keys = session.scalars(select(Effect.key).order_by(Effect.key)).all()
    assert keys == sorted(f"k{n}" for n in range(BATCH) if n != 4)  # its writes rolled back
    pending = session.scalar(text("SELECT count(*) FROM beanflow_tasks WHERE state = 'PENDING'"))
    assert pending == 0


@pytest.mark.parametrize("case", sorted(BAD_RESULTS))
def test_a_result_postgresql_cannot_store_fails_only_its_task(app, session, effects, case):
    value, message = BAD_RESULTS[case]
    good, bad = run_batch_with_one_bad(app, session, effects, value)
    assert_only_the_bad_one_failed(session, good, bad, message)
    assert bad.error_message.startswith("ResultNotStorable: the task's result cannot be stored")


@pytest.mark.parametrize("case", sorted(BAD_EXCEPTIONS))
def test_an_exception_that_is_hard_to_record_fails_only_its_task(app, session, effects, case):
    error, message = BAD_EXCEPTIONS[case]
    good, bad = run_batch_with_one_bad(app, session, effects, error)
    assert_only_the_bad_one_failed(session, good, bad, message)
    assert len(bad.error_message) < 11_000
    [failed] = [e for e in bad.events if e.type == bq.EventType.FAILED]
    assert len(failed.traceback) < 101_000 and "Traceback" in failed.traceback


@pytest.mark.parametrize("method", ["commit", "rollback", "close"])
def test_a_task_that_ends_its_batchs_transaction_fails_alone(app, session, effects, method):
    """``db.commit()``, ``db.rollback()`` or ``db.close()`` in a processor ends the transaction
    that also holds the writes of the tasks before it in the batch. The task fails, saying so;
    those tasks complete with their writes (committed), or run again, their attempt given back
    (rolled back: their writes were gone, yet they were marked DONE); nothing the task writes
    after that is kept."""

    def ends_it(db, task, savepoint) -> None:
        getattr(db, method)()
        db.add(Effect(key="written after"))

    good, bad = run_batch_with_one_bad(app, session, effects, _Does(ends_it))
    assert [(task.state, task.attempts, task.crash_count) for task in good] == [
        (TaskState.DONE, 1, 0)
    ] * (BATCH - 1)
    what = "committed the transaction" if method == "commit" else "rolled back or closed"
    assert bad.state == TaskState.FAILED
    assert bad.error_message.startswith(f"TransactionEnded: it {what}")
    keys = session.scalars(select(Effect.key).order_by(Effect.key)).all()
    before = ["k4"] if method == "commit" else []  # what it wrote before it committed
    assert keys == sorted([f"k{n}" for n in range(BATCH) if n != 4] + before)


@pytest.mark.parametrize("method", ["commit", "rollback"])
def test_a_task_that_ends_its_savepoint_then_fails_leaves_no_write(app, session, effects, method):
    """It released or rolled back its savepoint, wrote on, then raised: those writes have no
    savepoint to undo them, and were committed with its neighbours' completion. Now the
    batch's transaction is rolled back, the task fails by its policy, its neighbours run
    again."""

    def ends_its_savepoint(db, task, savepoint) -> None:
        getattr(savepoint, method)()
        db.add(Effect(key="written after"))
        db.flush()
        raise ValueError("and then it failed")

    good, bad = run_batch_with_one_bad(app, session, effects, _Does(ends_its_savepoint))
    assert_only_the_bad_one_failed(session, good, bad, "ValueError: and then it failed")


@pytest.mark.parametrize("released", [False, True], ids=["in its savepoint", "released"])
def test_a_task_that_swallows_a_database_error_fails_alone(app, session, effects, released):
    """It caught the error of its statement and returned: PostgreSQL had aborted the
    transaction, so the batch's completion was refused, and the whole batch was charged a
    crash, again and again, until the task failed as if it had killed its workers."""

    def action(db, task, savepoint) -> None:
        if released:
            savepoint.commit()
        with contextlib.suppress(exc.DataError):  # what the test is about
            db.execute(text("SELECT 1 / 0"))

    good, bad = run_batch_with_one_bad(app, session, effects, _Does(action))
    assert_only_the_bad_one_failed(session, good, bad, "TransactionAborted: a statement it ran")
    assert [task.crash_count for task in [*good, bad]] == [0] * BATCH


TAKES_ITS_ROW = {
    "deletes it": lambda db, task, savepoint: db.delete(task),
    "deletes it in SQL": lambda db, task, savepoint: db.execute(
        text("DELETE FROM beanflow_tasks WHERE id = :id"), {"id": task.id}
    ),
    "gives it another worker": lambda db, task, savepoint: setattr(task, "worker_id", None),
}


@pytest.mark.parametrize("case", sorted(TAKES_ITS_ROW))
def test_a_task_that_deletes_or_reassigns_its_own_row_fails_alone(app, session, effects, case):
    """Its completion does not find the row as its worker's. That meant the worker had been
    found dead: it rolled the batch back and stopped, and so did each worker that ran the task
    next (a supervised one is restarted: the task stalled its channel). The worker's row says
    it was not: the task fails, its neighbours run again."""
    good, bad = run_batch_with_one_bad(app, session, effects, _Does(TAKES_ITS_ROW[case]))
    assert_only_the_bad_one_failed(session, good, bad, "TaskRowTaken: its row was deleted")


@pytest.mark.parametrize("method", ["expire_all", "expunge_all"])
def test_a_task_that_expires_or_lets_go_of_the_sessions_objects_disturbs_nothing(
    app, session, effects, method
):
    """Expired, the batch's tasks were let go by the session before the worker read them
    again: it took that for a lost connection, and charged the whole batch a crash."""
    good, bad = run_batch_with_one_bad(
        app, session, effects, _Does(lambda db, task, savepoint: getattr(db, method)())
    )
    tasks = [*good, bad]
    assert [(t.state, t.attempts, t.crash_count) for t in tasks] == [(TaskState.DONE, 1, 0)] * BATCH
    keys = session.scalars(select(Effect.key).order_by(Effect.key)).all()
    assert keys == sorted(f"k{n}" for n in range(BATCH))


SETTINGS = {
    "search_path": "SET search_path TO nowhere",
    "search_path, for its transaction": "SET LOCAL search_path TO nowhere",
    "search_path, by set_config": "SELECT set_config('search_path', 'nowhere', false)",
    "statement_timeout": "SET statement_timeout = 1",
    "read-only transactions": "SET default_transaction_read_only = on",
    "role": "SET ROLE pg_read_all_data",
}


@pytest.mark.parametrize("case", sorted(SETTINGS))
def test_a_setting_a_task_changes_lasts_until_it_ends(app, session, effects, case):
    """A task's SET (for the session or its transaction) reached the tasks after it in the
    worker, and the worker's own statements: with another search_path, say, the next tasks'
    statements failed (they were failed for good, by no fault of theirs) and the batch's
    completion too (the whole batch was charged a crash, again and again)."""
    good, bad = run_batch_with_one_bad(
        app,
        session,
        effects,
        _Does(lambda db, task, savepoint: db.execute(text(SETTINGS[case]))),
        batches=2,
    )
    tasks = [*good, bad]
    count = 2 * BATCH
    assert [(t.state, t.attempts, t.crash_count) for t in tasks] == [(TaskState.DONE, 1, 0)] * count
    keys = session.scalars(select(Effect.key).order_by(Effect.key)).all()
    assert keys == sorted(f"k{n}" for n in range(count))


CHANGES_THE_SESSION = {
    "SET search_path TO public": True,
    "  set local statement_timeout = 0": True,
    "RESET ALL": True,
    "SELECT 1; SET ROLE postgres": True,
    "SELECT set_config('app.tenant', '42', false)": True,
    "SELECT pg_advisory_lock(7), pg_advisory_unlock(7)": True,
    "UPDATE settings SET a = 1": False,
    "SELECT a FROM settings ORDER BY a OFFSET 1": False,
    "INSERT INTO settings (a) VALUES (1) ON CONFLICT DO NOTHING": False,
}


def test_only_a_statement_that_may_change_the_session_is_followed_by_a_reset(db_url):
    """The reset costs the server a statement's work: it follows a task one of whose
    statements is a SET or RESET, or calls set_config or an advisory lock function; not an
    UPDATE's SET, an OFFSET, a table named settings."""
    engine = db.make_hot_path_engine(db_url)
    with engine.connect() as connection:
        connection.exec_driver_sql("CREATE TEMPORARY TABLE settings (a integer)")
        for statement, changes in CHANGES_THE_SESSION.items():
            db.watch_session(connection)
            connection.exec_driver_sql(statement)
            assert db.session_changed(connection) == changes, statement
    engine.dispose()


def test_a_task_sees_no_setting_of_a_task_before_it(app, session):
    """A tenant's id in a setting (for row-level security, say) or a role, SET by one task, is
    not the next task's: each runs with the worker connection's settings."""
    app.config.BATCH_SIZE = BATCH

    @app.processor(channel="default")
    def tenant(db, n: int) -> list:
        if n == 0:
            db.execute(text("SET app.tenant = '42'; SET ROLE pg_read_all_data"))
        return list(
            db.execute(text("SELECT current_setting('app.tenant', true), current_user")).one()
        )

    tasks = [bq.enqueue(session, tenant, n=n) for n in range(3)]
    session.commit()
    assert app.process_tasks(["default"], burst=True) == 0
    session.expire_all()
    assert [task.result for task in tasks] == [
        ["42", "pg_read_all_data"],
        ["", "postgres"],
        ["", "postgres"],
    ]


def _tries_the_lock(app) -> bq.Processor:
    """A processor that sends the worker's next statement, then says whether another
    connection (another worker, say) can take advisory lock 42."""

    @app.processor(channel="default")
    def tries(db) -> bool:
        db.execute(text("SELECT 1"))  # the worker's next statement
        with app.engine.connect() as elsewhere:
            took = elsewhere.scalar(text("SELECT pg_try_advisory_lock(42)"))
            elsewhere.execute(text("SELECT pg_advisory_unlock_all()"))
        return took

    return tries


def _takes_the_lock_in_a_function(app, session) -> bq.Processor:
    """A processor whose statement calls a function of the user's that takes advisory lock
    42 for the session (its statement does not show it)."""
    session.execute(
        text(
            "CREATE FUNCTION take_lock() RETURNS void LANGUAGE plpgsql AS $$ BEGIN "
            "PERFORM pg_advisory_lock(42); END $$"
        )
    )

    @app.processor(channel="default")
    def calls(db) -> None:
        db.execute(text("SELECT take_lock()"))

    return calls


@pytest.mark.parametrize(
    "ends", ["returns", "raises", "rolls back db", "releases its savepoint, then raises"]
)
def test_a_lock_a_task_takes_for_the_session_ends_with_it(app, session, ends):
    """A session-level advisory lock survives a rollback: a task that raised between its lock
    and its unlock (or never unlocked) left it on the worker's connection, for good, and every
    task that takes the same lock on another worker waited for ever. It is released with the
    worker's next statement."""
    app.config.BATCH_SIZE = BATCH

    @app.processor(channel="default")
    def locks(db, savepoint) -> None:
        db.execute(text("SELECT pg_advisory_lock(42)"))
        if ends == "rolls back db":
            db.rollback()
        if ends.startswith("releases"):
            savepoint.commit()
        if "raises" in ends:
            raise ValueError("between its lock and its unlock")

    first, second = bq.enqueue(session, locks), bq.enqueue(session, _tries_the_lock(app))
    session.commit()
    assert app.process_tasks(["default"], burst=True) == 0
    session.expire_all()
    assert first.state == (TaskState.DONE if ends == "returns" else TaskState.FAILED)
    assert (second.state, second.result) == (TaskState.DONE, True)


def test_a_lock_taken_in_a_function_a_task_calls_ends_with_its_batch(app, session):
    """The task's statement does not show it (a function of yours takes the lock): the lock
    is released after the batch's commit, before the next batch starts."""
    app.config.BATCH_SIZE = 1
    calls, tries = _takes_the_lock_in_a_function(app, session), _tries_the_lock(app)
    first, second = bq.enqueue(session, calls), bq.enqueue(session, tries)
    session.commit()
    assert app.process_tasks(["default"], burst=True) == 0
    session.expire_all()
    assert first.state == TaskState.DONE
    assert (second.state, second.result) == (TaskState.DONE, True)


def test_a_lock_taken_in_a_function_is_released_before_its_worker_sleeps(app, session):
    """Released with the batch's completion, not with whatever statement comes after: an idle
    worker would hold it while it sleeps."""
    task = bq.enqueue(session, _takes_the_lock_in_a_function(app, session))
    session.commit()

    def done() -> bool:
        session.rollback()  # a fresh snapshot each time
        return session.scalar(select(bq.Task.state).where(bq.Task.id == task.id)) == "DONE"

    worker = TaskWorker(app, ["default"])
    thread = threading.Thread(target=worker.run)
    thread.start()
    try:
        wait_for(done, "the task to be done")  # and its worker idle, asleep
        with app.engine.connect() as elsewhere:
            assert elsewhere.scalar(text("SELECT pg_try_advisory_lock(42)"))
    finally:
        worker.stop()
        thread.join()


@pytest.mark.parametrize("statement", ["DEALLOCATE ALL", "DISCARD PLANS"])
def test_a_task_that_drops_the_workers_prepared_statements_disturbs_nothing(
    app, session, statement
):
    """The worker's claim and completion are prepared once per connection: a task that
    dropped them (in the second batch, when all are in use) made the batch's completion fail,
    and each task of the batch was failed ("its outcome could not be recorded"). They are
    prepared again where they are next used."""
    app.config.BATCH_SIZE = BATCH

    @app.processor(channel="default")
    def drops(db, n: int) -> int:
        if n == BATCH + 4:
            db.execute(text(statement))
        return n

    tasks = [bq.enqueue(session, drops, n=n) for n in range(3 * BATCH)]
    session.commit()
    assert app.process_tasks(["default"], burst=True) == 0
    session.expire_all()
    assert {(t.state, t.attempts, t.crash_count) for t in tasks} == {(TaskState.DONE, 1, 0)}


BAD_POLICIES = {
    "a time no task can be due at": (
        datetime.datetime.max.replace(tzinfo=datetime.timezone.utc),
        "gave 9999-12-31 23:59:59.999999+00:00: no task can be due then",
    ),
    "a number": (5, "gave 5, not a time (a datetime or a SQL expression)"),
    "a delay": (
        datetime.timedelta(seconds=5),
        "gave datetime.timedelta(seconds=5), not a time (a datetime or a SQL expression)",
    ),
    "SQL the server refuses": (func.now() + 5, "raised ProgrammingError: "),
    "SQL that is not a time": (literal(5), "gave 5, not a time"),
}


@pytest.mark.parametrize("case", sorted(BAD_POLICIES))
def test_a_retry_policy_that_gives_no_time_fails_only_its_task(app, session, case):
    """Its failure row was refused (a time psycopg2 cannot send, a value or an expression
    that is no time: the policy's own SQL spoiled the transaction), so the task was charged a
    crash, its neighbours went back to the queue, and it failed in the end as if it had killed
    its workers. Now it fails at once, saying why it is not retried."""
    app.config.BATCH_SIZE = BATCH
    policy, problem = BAD_POLICIES[case]

    @app.processor(channel="default", retry_policy=lambda task: policy)
    def flaky(n: int) -> int:
        if n == 4:
            raise ValueError("fails")
        return n

    tasks = [bq.enqueue(session, flaky, n=n) for n in range(BATCH)]
    session.commit()
    assert app.process_tasks(["default"], burst=True) == 0
    session.expire_all()
    assert [(t.state, t.attempts, t.crash_count) for t in tasks] == [
        (TaskState.FAILED if t is tasks[4] else TaskState.DONE, 1, 0) for t in tasks
    ]
    assert tasks[4].error_message.startswith(
        f"ValueError: fails (not retried: its retry policy {problem}"
    )


def refuse_done_saying_refused(session) -> None:
    """A trigger of the user's: the database refuses to mark DONE a task whose result is the
    string "refused"."""
    session.execute(
        text(
            """
            CREATE FUNCTION refuse_done() RETURNS trigger AS $$
            BEGIN
                IF NEW.state = 'DONE' AND NEW.result = '"refused"' THEN
                    RAISE EXCEPTION 'results saying refused are refused';
                END IF;
                RETURN NEW;
            END $$ LANGUAGE plpgsql;
            CREATE TRIGGER refuse_done BEFORE UPDATE ON beanflow_tasks
                FOR EACH ROW EXECUTE FUNCTION refuse_done();
            """
        )
    )
    session.commit()


def test_a_completion_the_database_refuses_fails_only_its_task(app, session, effects):
    """The database itself refuses one task's DONE (a trigger of the user's here): the others
    are returned and completed, that one is FAILED saying why, nothing is left behind."""
    refuse_done_saying_refused(session)
    good, bad = run_batch_with_one_bad(app, session, effects, "refused")
    assert [task.state for task in good] == [TaskState.DONE] * (BATCH - 1)
    assert bad.state == TaskState.FAILED
    assert bad.error_message.startswith(
        "OutcomeNotRecorded: its outcome could not be recorded: "
        "(psycopg2.errors.RaiseException) results saying refused are refused"
    )
    keys = session.scalars(select(Effect.key)).all()
    assert sorted(keys) == sorted(f"k{n}" for n in range(BATCH) if n != 4)
    # the innocent ones ran again (their first run was rolled back with the batch, and their
    # attempt given back)
    assert {task.attempts for task in good} == {1}


def test_tasks_given_back_in_a_transaction_that_rolls_back_keep_their_attempt(app, session):
    """A batch past its window gives its unstarted tasks back in its own transaction; when the
    database then refuses the completion, that transaction rolls back and they are still this
    worker's, unstarted: they are released with their attempt given back, never counted as
    run. (A window of 0: every batch is past it once its first task ends.)"""
    refuse_done_saying_refused(session)
    app.config.BATCH_SIZE, app.config.BATCH_WINDOW = BATCH, 0

    @app.processor(channel="default")
    def refused() -> str:
        return "refused"

    tasks = [bq.enqueue(session, refused) for _ in range(BATCH)]
    session.commit()
    assert app.process_tasks(["default"], burst=True) == 0
    session.expire_all()
    assert {(task.state, task.attempts) for task in tasks} == {(TaskState.FAILED, 1)}


def test_what_a_rolled_back_batch_ended_is_not_counted(app, session):
    """A failure recorded in a batch whose completion the database then refuses is rolled back
    with it: the worker's counts (its summary line, its metrics) count only what committed."""
    from beanflow.engine.worker import TaskWorker

    refuse_done_saying_refused(session)
    # a window no batch passes: the failure and the refused completion share one transaction
    app.config.BATCH_SIZE, app.config.BATCH_WINDOW = BATCH, 60

    @app.processor(channel="default")
    def ends(how: str) -> str:
        if how == "raise":
            raise ValueError("it raises")
        return how

    hows = ["raise", "refused"] + ["fine"] * (BATCH - 2)
    tasks = [bq.enqueue(session, ends, how=how) for how in hows]
    session.commit()
    worker = TaskWorker(app, ["default"], burst=True)
    assert worker.run() == 0
    session.expire_all()
    assert [(t.state, t.attempts) for t in tasks[:2]] == [
        (TaskState.FAILED, 2),  # its first failure was rolled back with the batch
        (TaskState.FAILED, 1),
    ]
    assert {t.state for t in tasks[2:]} == {TaskState.DONE}
    assert (worker.counts["failed"], worker.counts["done"]) == (2, BATCH - 2)


def test_a_failure_the_database_refuses_to_record_is_charged_until_it_fails(app, session, effects):
    """Even the failure row is refused (a trigger on FAILED): the task is charged a crash each
    time, and MAX_WORKER_CRASHES ends it; its neighbours complete."""
    session.execute(
        text(
            """
            CREATE FUNCTION refuse_failed() RETURNS trigger AS $$
            BEGIN
                IF NEW.state = 'FAILED' AND NEW.error_message LIKE 'ValueError: unrecordable%'
                THEN RAISE EXCEPTION 'this failure is refused';
                END IF;
                RETURN NEW;
            END $$ LANGUAGE plpgsql;
            CREATE TRIGGER refuse_failed BEFORE UPDATE ON beanflow_tasks
                FOR EACH ROW EXECUTE FUNCTION refuse_failed();
            """
        )
    )
    session.commit()
    app.config.MAX_WORKER_CRASHES = 2
    good, bad = run_batch_with_one_bad(app, session, effects, ValueError("unrecordable"))
    assert [task.state for task in good] == [TaskState.DONE] * (BATCH - 1)
    assert (bad.state, bad.crash_count) == (TaskState.FAILED, 2)
    assert bad.error_message == (
        "its worker died or lost its database connection 2 times while running it"
    )


def test_a_task_that_kills_its_own_connection_is_charged_and_the_worker_goes_on(
    app, session, effects
):
    app.config.MAX_WORKER_CRASHES = 2

    @app.processor(channel="default")
    def hang_up(db) -> None:
        db.execute(text("SELECT pg_terminate_backend(pg_backend_pid())"))

    @app.processor(channel="default")
    def fine(db, key: str) -> str:
        db.add(effects(key=key))
        return key

    culprit = bq.enqueue(session, hang_up)
    others = [bq.enqueue(session, fine, key=f"k{n}") for n in range(3)]
    session.commit()
    assert app.process_tasks(["default"], burst=True) == 0
    session.expire_all()
    assert (culprit.state, culprit.crash_count) == (TaskState.FAILED, 2)
    assert [task.state for task in others] == [TaskState.DONE] * 3


def test_a_statement_the_driver_cannot_send_fails_only_its_task(app, session, effects):
    """A task's first statement refused by psycopg2 before it reaches the server (a parameter
    it cannot adapt) is the task's failure: the worker's savepoint, queued to travel with that
    statement, is not assumed to exist."""

    class Opaque:
        pass

    good, bad = run_batch_with_one_bad(app, session, effects, _Sends(Opaque()))
    assert_only_the_bad_one_failed(session, good, bad, "can't adapt type 'Opaque'")

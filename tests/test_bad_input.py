"""Hostile and malformed input: clear errors, no crash, no injection, nothing imported."""

from __future__ import annotations

import string
import sys

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import exc, inspect, select, text

import beanflow as bq
from beanflow import spec
from beanflow.spec.load import Problem

from .helpers import refuse
from .test_enqueue import Listening

ODD_CHANNELS = [
    "it's",
    'say "hi"',
    "with space",
    "ünïcødé ✓",
    "x'); DROP TABLE beanflow_tasks; --",
    "x" * 63,
    "é" * 31,  # 62 bytes
]


@pytest.mark.parametrize("channel", ODD_CHANNELS)
def test_odd_channel_names_round_trip_through_notify(app, session, db_url, channel):
    listener = Listening(db_url, [channel, "beanflow_test_sentinel"])
    odd = app.processor(channel=channel)(lambda: None)
    task = bq.enqueue(session, odd)
    session.commit()
    assert listener.received() == [channel]
    listener.connection.close()
    assert app.process_tasks([channel], burst=True) == 0
    session.refresh(task)
    assert task.state == bq.TaskState.DONE


@pytest.mark.parametrize("channel", ["x" * 64, "é" * 32, "", None])
def test_impossible_channel_names_are_refused_up_front(channel):
    with pytest.raises(ValueError, match="channel name"):
        bq.processor(channel=channel)(lambda: None)
    with pytest.raises(ValueError, match="channel name"):
        bq.Task(channel=channel, module="m", name="n")


def test_functions_whose_body_a_call_does_not_run_are_refused_as_processors():
    """A worker calls a processor and stores what it returns: an async or generator function
    would return an object that never ran (it was a confusing "result cannot be stored")."""
    from .workloads.app import awaits, yields

    with pytest.raises(TypeError, match="awaits is an async function"):
        bq.processor(channel="c")(awaits)
    with pytest.raises(TypeError, match="yields is a generator function"):
        bq.processor(channel="c")(yields)

    def by_position(first, /, second=2):  # noqa: ANN001, ANN202
        return first

    with pytest.raises(TypeError, match=r"required positional-only parameters \(first\)"):
        bq.processor(channel="c")(by_position)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ([1, 2], "kwargs must be a JSON object, got list"),
        ({"value": {1, 2}}, "kwargs cannot be stored as JSON: kwargs['value']: a set is not JSON"),
        ({"value": "x" * 1_000_001}, "kwargs are 1,000,014 characters of JSON; the limit is"),
        ({"other": 1}, "kwargs do not fit echo(value)"),
    ],
)
def test_bad_kwargs_are_refused_before_anything_is_written(kwargs, message):
    from .workloads.app import echo

    with pytest.raises(ValueError) as raised:
        echo.check_kwargs(kwargs)
    assert str(raised.value).startswith(message)


def test_rows_naming_unconfigured_code_fail_without_any_import(app, session):
    @app.processor(channel="default")
    def registered() -> None:
        pass

    session.add_all(
        [
            bq.Task(channel="default", module="os", name="system", kwargs={"command": "true"}),
            bq.Task(channel="default", module=__name__, name="not_a_processor"),
            bq.Task(channel="default", module="tests.never_configured", name="run"),
        ]
    )
    session.commit()
    assert app.process_tasks(["default"], burst=True) == 0
    session.expire_all()
    failed = session.scalars(select(bq.Task)).all()
    assert {task.state for task in failed} == {bq.TaskState.FAILED}
    assert all(
        task.error_message.startswith("ProcessorNotFound: no processor registered for ")
        for task in failed
    )
    assert "tests.never_configured" not in sys.modules


@pytest.mark.parametrize(
    ("column", "value", "constraint"),
    [
        ("state", "'QUEUED'", "ck_beanflow_tasks_state"),
        ("state", "'pending'", "ck_beanflow_tasks_state"),
        ("scheduled_at", "'-infinity'", "ck_beanflow_tasks_scheduled_at"),
        ("scheduled_at", "'0044-03-15 BC'", "ck_beanflow_tasks_scheduled_at"),
        ("created_at", "'50000-01-01'", "ck_beanflow_tasks_times"),
        ("started_at", "'-infinity'", "ck_beanflow_tasks_times"),
        ("finished_at", "'0001-01-01 00:00Z'", "ck_beanflow_tasks_times"),
    ],
)
def test_rows_written_in_sql_that_beanflow_could_not_read_are_refused(
    app, session, column, value, constraint
):
    """A task row from elsewhere (SQL, another language) with a state beanflow does not know,
    or due before year 1 (no claim would reach it, no listing could read it back): the
    INSERT fails, naming the rule; the rows beanflow can read go in as before."""
    insert = "INSERT INTO beanflow_tasks (channel, module, name, {}) VALUES ('c', 'm', 'f', {})"
    with pytest.raises(exc.IntegrityError, match=constraint):
        session.execute(text(insert.format(column, value)))
    session.rollback()
    session.execute(text(insert.format("scheduled_at", "'infinity'")))  # never due, readable
    session.execute(text(insert.format("state", "'CANCELLED'")))
    session.commit()
    assert len(session.scalars(select(bq.Task)).all()) == 2


def test_rows_written_in_sql_with_kwargs_that_do_not_fit_fail_only_themselves(app, session):
    @app.processor(channel="default")
    def takes(db, n: int = 0) -> int:
        return n

    too_deep = '{"n": ' + "[" * 5000 + "]" * 5000 + "}"  # stored by PostgreSQL, not read by json
    for kwargs in ("[1, 2]", '"x"', '{"db": 1}', too_deep, '{"n": 3}'):
        session.execute(
            text(
                "INSERT INTO beanflow_tasks (channel, module, name, kwargs) "
                "VALUES ('default', :module, 'takes', CAST(:kwargs AS jsonb))"
            ),
            {"module": takes.module, "kwargs": kwargs},
        )
    session.commit()
    assert app.process_tasks(["default"], burst=True) == 0
    outcomes = session.execute(  # in the order of the inserts
        select(bq.Task.state, bq.Task.error_message).order_by(bq.Task.scheduled_at)
    ).all()
    assert [state for state, _ in outcomes] == [bq.TaskState.FAILED] * 4 + [bq.TaskState.DONE]
    errors = [error for _, error in outcomes]
    assert errors[:2] == [
        "KwargsError: kwargs must be a JSON object, got list",
        "KwargsError: kwargs must be a JSON object, got str",
    ]
    assert errors[2].endswith("takes() got multiple values for keyword argument 'db'")
    assert errors[3] == "KwargsError: kwargs cannot be read: nested too deeply"


def _insert_rows(session, processor, *rows: tuple[str, str]) -> None:
    """Task rows of ``processor`` written in SQL, in this order: (kwargs, other columns)."""
    for kwargs, columns in rows:
        names = "".join(f", {column.split('=')[0]}" for column in filter(None, [columns]))
        values = "".join(f", {column.split('=', 1)[1]}" for column in filter(None, [columns]))
        session.execute(
            text(
                f"INSERT INTO beanflow_tasks (channel, module, name, kwargs{names}) "
                f"VALUES ('default', :module, :name, CAST(:kwargs AS jsonb){values})"
            ),
            {"module": processor.module, "name": processor.name, "kwargs": kwargs},
        )


def test_rows_written_in_sql_that_no_claim_can_take_fail_alone(app, session):
    """A due row whose claim fails (a user's trigger refuses it) or that cannot be read back
    (a year past 9999, written before the table's checks refused it: they apply to its
    updates, its failure's too) would make every claim of its channel fail, and stall it: it
    is failed alone, saying why, and the rows beside it run. Counts at the ends of their range
    (a claim adds one attempt, a negative crash count) are claimed and run as any other."""

    @app.processor(channel="default")
    def takes(n: int = 0) -> int:
        return n

    session.execute(
        text(
            "ALTER TABLE beanflow_tasks DROP CONSTRAINT ck_beanflow_tasks_times; "
            "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            "IF NEW.state = 'PROCESSING' AND NEW.kwargs ? 'refuse' THEN "
            "RAISE EXCEPTION 'refused by a trigger'; END IF; RETURN NEW; END $$; "
            "CREATE TRIGGER refuse BEFORE UPDATE ON beanflow_tasks "
            "FOR EACH ROW EXECUTE FUNCTION refuse()"
        )
    )
    _insert_rows(
        session,
        takes,
        ('{"n": 1}', ""),
        ('{"n": 2}', "created_at='50000-01-01'"),
        ('{"refuse": true}', ""),
        ('{"n": 4}', f"attempts={2**31 - 1}"),
        ('{"n": 5}', "crash_count=-1"),
        ('{"n": 6}', ""),
    )
    session.commit()
    app.create_tables()  # the checks are back, NOT VALID: the rows above stay
    assert app.process_tasks(["default"], burst=True) == 0
    rows = session.execute(
        select(bq.Task.state, bq.Task.attempts, bq.Task.error_message).order_by(
            bq.Task.scheduled_at
        )
    ).all()
    assert [(state, attempts) for state, attempts, _ in rows] == [
        (bq.TaskState.DONE, 1),
        (bq.TaskState.FAILED, 0),
        (bq.TaskState.FAILED, 0),
        (bq.TaskState.DONE, 2**31 - 1),
        (bq.TaskState.DONE, 1),
        (bq.TaskState.DONE, 1),
    ]
    assert rows[1].error_message == (
        "it cannot be claimed: (psycopg2.errors.CheckViolation) new row for relation "
        '"beanflow_tasks" violates check constraint "ck_beanflow_tasks_times"'
    )
    assert rows[2].error_message == (
        "it cannot be claimed: (psycopg2.errors.RaiseException) refused by a trigger"
    )
    failures = session.scalars(
        select(bq.Event.exception_type).where(bq.Event.type == "FAILED")
    ).all()
    assert sorted(failures) == ["sqlalchemy.exc.IntegrityError", "sqlalchemy.exc.InternalError"]


REFUSED_FOR_NOW = {
    "a cancelled statement": "query_canceled",
    "a lock timeout": "lock_not_available",
    "a deadlock": "deadlock_detected",
    "a read-only transaction": "read_only_sql_transaction",
}


@pytest.mark.parametrize("case", sorted(REFUSED_FOR_NOW))
@pytest.mark.parametrize("step", ["claim", "completion", "failure"])
def test_a_refusal_that_is_not_a_rows_fault_fails_no_task(app, session, case, step):
    """The server refuses a claim, a completion or a failure's record for a reason of its
    own: a statement or lock timeout, an operator's cancel, a deadlock, a read-only
    transaction (a failover) — here a trigger raises the same error three times. No task is
    failed or charged for it: the worker pauses and tries again, and the tasks run again,
    their attempt given back. Before, each due task was tried alone, and the ones whose claim
    failed again were failed for good ("it cannot be claimed"); a refused failure charged
    its task a crash."""

    @app.processor(channel="default")
    def takes(n: int) -> int:
        if step == "failure":
            raise ValueError(n)
        return n

    state = {"claim": "PROCESSING", "completion": "DONE", "failure": "FAILED"}[step]
    when = f"NEW.state = '{state}'"
    refuse(session, "beanflow_tasks", "UPDATE", REFUSED_FOR_NOW[case], times=3, when=when)
    tasks = [bq.enqueue(session, takes, n=n) for n in range(3)]
    session.commit()
    assert app.process_tasks(["default"], burst=True) == 0
    session.expire_all()
    ended = bq.TaskState.FAILED if step == "failure" else bq.TaskState.DONE
    assert [(t.state, t.attempts, t.crash_count) for t in tasks] == [(ended, 1, 0)] * 3
    assert session.scalar(text("SELECT last_value FROM refusals")) > 3  # refused 3 times


def test_a_row_no_claim_can_take_that_arrives_during_a_batch_fails_alone(app, session, db_url):
    """The row comes due while a batch runs: the completion's statement, which also claims
    the next batch, fails. The row is failed; the batch's task, whose completion was rolled
    back with it, is returned to the queue with its attempt given back, and runs again."""
    runs = []
    session.execute(text("ALTER TABLE beanflow_tasks DROP CONSTRAINT ck_beanflow_tasks_times"))
    session.commit()

    @app.processor(channel="default")
    def adds_a_bad_row() -> None:
        runs.append(1)
        if len(runs) == 1:  # committed by another connection: due before this batch's commit
            with app.engine.begin() as connection:
                _insert_rows(connection, adds_a_bad_row, ("{}", "created_at='50000-01-01'"))

    bq.enqueue(session, adds_a_bad_row)
    session.commit()
    assert app.process_tasks(["default"], burst=True) == 0
    rows = session.execute(
        select(bq.Task.state, bq.Task.attempts, bq.Task.error_message).order_by(
            bq.Task.scheduled_at
        )
    ).all()
    assert rows == [
        (bq.TaskState.DONE, 1, None),
        (bq.TaskState.FAILED, 0, "it cannot be claimed: year 50000 is out of range"),
    ]
    assert len(runs) == 2


def test_create_tables_brings_an_existing_database_up_to_date(app, session):
    """An earlier version's database: what a newer one adds (a nullable column, an index, the
    checks) is added by create_tables, the checks for the rows written from then on."""
    session.execute(
        text(
            "ALTER TABLE beanflow_tasks DROP CONSTRAINT ck_beanflow_tasks_state, "
            "DROP CONSTRAINT ck_beanflow_tasks_scheduled_at, "
            "DROP CONSTRAINT ck_beanflow_tasks_times, DROP COLUMN workflow_run_id "
            "CASCADE; INSERT INTO beanflow_tasks (channel, module, name, state) "
            "VALUES ('c', 'm', 'f', 'QUEUED')"
        )
    )
    session.commit()
    app.create_tables()
    found = inspect(app.engine)
    assert "workflow_run_id" in {c["name"] for c in found.get_columns("beanflow_tasks")}
    assert "ix_beanflow_tasks_workflow_run" in {
        i["name"] for i in found.get_indexes("beanflow_tasks")
    }
    assert {c["name"] for c in found.get_check_constraints("beanflow_tasks")} == {
        "ck_beanflow_tasks_state",
        "ck_beanflow_tasks_scheduled_at",
        "ck_beanflow_tasks_times",
    }
    with pytest.raises(exc.IntegrityError, match="ck_beanflow_tasks_state"):
        session.execute(text("UPDATE beanflow_tasks SET channel = 'd' WHERE state = 'QUEUED'"))
    session.rollback()
    app.create_tables()  # again: nothing left to add


yaml_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-5, 5)
    | st.floats(allow_nan=False)
    | st.text(string.printable, max_size=12),
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(
            st.sampled_from(
                [
                    "version",
                    "database",
                    "processors",
                    "channels",
                    "schedules",
                    "retry_policies",
                    "worker",
                    "packages",
                    "function",
                    "channel",
                    "kind",
                    "delay",
                    "cron",
                    "processor",
                    "workers",
                    "retry_policy",
                    "maximum_attempt",
                    "kwargs",
                    "timezone",
                    "x",
                ]
            ),
            children,
            max_size=4,
        )
    ),
    max_leaves=12,
)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(document=yaml_values)
def test_any_yaml_document_compiles_or_reports_located_problems(tmp_path, document):
    path = tmp_path / "beanflow.yaml"
    path.write_text(yaml.safe_dump(document))
    app, problems = spec.check(path)
    assert (app is None) == bool(problems)
    assert all(isinstance(p, Problem) and p.line >= 1 and p.column >= 1 for p in problems)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(text=st.text(string.printable + "{}[]:-#&*!|>'\"%@`", max_size=200))
def test_any_text_compiles_or_reports_located_problems(tmp_path, text):
    path = tmp_path / "beanflow.yaml"
    path.write_text(text)
    app, problems = spec.check(path)
    assert (app is None) == bool(problems)
    assert all(str(p).startswith(f"{path}:") for p in problems)

"""Enqueue is the caller's transaction; NOTIFY is sent once per channel, on commit only."""

from __future__ import annotations

import select
from collections.abc import Iterator

import psycopg2
import pytest
from psycopg2 import sql
from sqlalchemy import func
from sqlalchemy import select as sa_select
from sqlalchemy.engine import make_url

import beanflow as bq
from beanflow.models import TaskState


class Listening:
    """A separate connection LISTENing on some channels, collecting what arrives."""

    def __init__(self, db_url: str, channels: list[str]) -> None:
        url = make_url(db_url)
        self.connection = psycopg2.connect(
            dbname=url.database,
            user=url.username,
            host=url.host or url.query.get("host"),
            port=url.port,
        )
        self.connection.autocommit = True
        with self.connection.cursor() as cursor:
            for channel in channels:
                cursor.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))

    def received(self) -> list[str]:
        """Every notification delivered so far. A sentinel NOTIFY sent afterwards on this
        same connection arrives after all of them, so nothing in flight is missed."""
        with self.connection.cursor() as cursor:
            cursor.execute("NOTIFY beanflow_test_sentinel")
        channels: list[str] = []
        while True:
            self.connection.poll()
            if not self.connection.notifies:
                select.select([self.connection], [], [], 10)
            while self.connection.notifies:
                notify = self.connection.notifies.pop(0)
                if notify.channel == "beanflow_test_sentinel":
                    return channels
                channels.append(notify.channel)


@pytest.fixture
def listening(db_url: str) -> Iterator[Listening]:
    listener = Listening(
        db_url, ["images", "files", "beanflow_test_sentinel", 'we\'ird "chan"; DROP TABLE x']
    )
    yield listener
    listener.connection.close()


@pytest.fixture
def resize(app: bq.BeanQueue) -> bq.Processor:
    @app.processor(channel="images")
    def resize_image(width: int, height: int) -> None:
        pass

    return resize_image


def count_tasks(app: bq.BeanQueue) -> int:
    with app.session_factory() as other:
        return other.scalar(sa_select(func.count()).select_from(bq.Task))


def test_enqueue_only_adds_to_the_callers_transaction(app, session, resize):
    task = bq.enqueue(session, resize, width=1, height=2)
    assert task in session and not session.new  # inserted at once, attached as persistent
    assert count_tasks(app) == 0  # not visible before the caller commits
    session.commit()
    assert count_tasks(app) == 1
    assert (task.channel, task.module, task.name, task.kwargs) == (
        "images",
        __name__,
        "resize_image",
        {"width": 1, "height": 2},
    )
    assert task.state == TaskState.PENDING


def test_run_returns_an_unsaved_task(session, resize):
    task = resize.run(width=1, height=2)
    assert isinstance(task, bq.Task) and task not in session


def test_bad_kwargs_are_refused_before_anything_is_written(session, resize):
    with pytest.raises(ValueError, match="do not fit resize_image"):
        resize.run(width=1)
    with pytest.raises(ValueError, match="cannot be stored as JSON"):
        resize.run(width=object(), height=1)


def test_one_notify_per_channel_per_transaction(app, session, resize, listening):
    @app.processor(channel="files")
    def upload() -> None:
        pass

    for _ in range(3):
        bq.enqueue(session, resize, width=1, height=1)
        session.flush()
    bq.enqueue(session, upload)
    bq.enqueue_many(session, resize, [{"width": 2, "height": 2}] * 5)
    bq.enqueue_many(session, upload, [{}] * 2)
    assert listening.received() == []  # nothing before commit
    session.commit()
    assert sorted(listening.received()) == ["files", "images"]


def test_no_notify_for_a_rolled_back_transaction(session, resize, listening):
    bq.enqueue(session, resize, width=1, height=1)
    session.flush()
    session.rollback()
    assert listening.received() == []


def test_no_notify_for_a_rolled_back_savepoints_rows_only(session, resize, listening):
    savepoint = session.begin_nested()
    bq.enqueue(session, resize, width=1, height=1)
    session.flush()
    savepoint.rollback()
    session.commit()
    assert listening.received() == []

    savepoint = session.begin_nested()
    bq.enqueue(session, resize, width=1, height=1)
    session.flush()
    savepoint.rollback()
    bq.enqueue(session, resize, width=2, height=2)  # the outer transaction still notifies
    session.commit()
    assert listening.received() == ["images"]


def test_bulk_enqueue_is_one_statement_and_notifies(app, session, resize, listening):
    statements = []
    from sqlalchemy import event

    @event.listens_for(app.engine, "before_cursor_execute")
    def record(conn, cursor, statement, parameters, context, executemany):
        statements.append(statement)

    assert bq.enqueue_many(session, resize, [{"width": n, "height": n} for n in range(500)]) == 500
    session.commit()
    inserts = [s for s in statements if s.startswith("INSERT INTO beanflow_tasks")]
    assert len(inserts) == 1
    assert count_tasks(app) == 500
    assert listening.received() == ["images"]


def test_channel_names_cannot_inject_sql(app, session, listening):
    channel = 'we\'ird "chan"; DROP TABLE x'

    @app.processor(channel=channel)
    def odd() -> None:
        pass

    bq.enqueue(session, odd)
    session.commit()
    assert listening.received() == [channel]
    assert count_tasks(app) == 1


def test_a_task_has_its_id_before_any_flush(session, resize):
    task = bq.enqueue(session, resize, width=1, height=2)
    assert task.id is not None  # a reference can be stored at once
    built = bq.Task(channel="images", module="m", name="n")
    assert built.id is not None and built.id != task.id
    session.commit()
    assert session.get(bq.Task, task.id) is task


def test_enqueue_is_one_statement_with_the_transactions_first_notify(app, session, resize):
    from sqlalchemy import event

    statements: list[str] = []

    @event.listens_for(app.engine, "before_cursor_execute")
    def record(conn, cursor, statement, parameters, context, executemany):
        statements.append(statement)

    bq.enqueue(session, resize, width=1, height=1)
    bq.enqueue(session, resize, width=2, height=2)
    session.commit()
    assert len(statements) == 2  # no flush, no separate NOTIFY
    assert all(s.startswith("INSERT INTO beanflow_tasks") for s in statements)
    assert ["pg_notify" in s for s in statements] == [True, False]


def test_a_rolled_back_savepoint_takes_its_task_out_of_the_session(app, session, resize):
    from sqlalchemy import inspect

    kept = bq.enqueue(session, resize, width=1, height=1)
    savepoint = session.begin_nested()
    inner = savepoint.session.begin_nested()
    dropped = bq.enqueue(session, resize, width=2, height=2)
    inner.commit()  # released into the savepoint, which then rolls back
    savepoint.rollback()
    assert dropped not in session and inspect(dropped).transient
    assert kept in session
    session.commit()
    assert [t.kwargs["width"] for t in session.scalars(sa_select(bq.Task))] == [1]

    rolled = bq.enqueue(session, resize, width=3, height=3)
    session.rollback()
    assert rolled not in session and inspect(rolled).transient


def test_a_users_row_references_an_enqueued_task_in_the_same_transaction(app, session, resize):
    from sqlalchemy import Column, ForeignKey, Integer, MetaData, Table
    from sqlalchemy.dialects.postgresql import UUID

    orders = Table(
        "orders",
        MetaData(),
        Column("id", Integer, primary_key=True),
        Column("task_id", UUID(as_uuid=True), ForeignKey(bq.Task.id), nullable=False),
    )
    orders.create(session.connection())
    task = bq.enqueue(session, resize, width=1, height=1)
    session.execute(orders.insert().values(id=1, task_id=task.id))
    session.commit()
    assert session.execute(sa_select(orders.c.task_id)).scalar() == task.id
    assert task.state == TaskState.PENDING and task.scheduled_at is not None

"""Workers under a server's limits: statement and idle-in-transaction timeouts, and too few
connections. A server of the test's own (embedded, in its own folder)."""

from __future__ import annotations

import signal

import pytest
from sqlalchemy import func, select, text

import beanflow as bq

from .helpers import Workers, wait_for
from .workloads import app as workloads
from .workloads.app import Effect, UserBase

# real processes: `pytest -m "not slow"` skips them in the inner loop
pytestmark = pytest.mark.slow


@pytest.fixture
def limited_server(own_server):
    app = bq.BeanQueue(bq.Config(env={}, DATABASE_URL=own_server.url))
    app.create_tables()
    UserBase.metadata.create_all(app.engine)
    yield own_server, app
    app.engine.dispose()


def configure(app, server, restart: bool = False, **settings: str) -> None:
    """ALTER SYSTEM settings on the test's own server, then reload (or restart)."""
    with app.engine.connect() as connection:
        connection.execution_options(isolation_level="AUTOCOMMIT")
        for name, value in settings.items():
            connection.execute(text(f"ALTER SYSTEM SET {name} = '{value}'"))
        connection.execute(text("SELECT pg_reload_conf()"))
    app.engine.dispose()
    if restart:
        server.restart()


def test_workers_keep_working_under_statement_and_idle_timeouts(limited_server, tmp_path):
    server, app = limited_server
    url = server.url
    configure(app, server, statement_timeout="1s", idle_in_transaction_session_timeout="300ms")
    # every look at the database below is a transaction of its own: one left open between
    # looks would be cut by the server's idle_in_transaction_session_timeout when the test stalls
    with app.session_factory() as session:
        idle = bq.enqueue(session, workloads.idle_in_transaction, key="idle", seconds=1.0).id
        slow = bq.enqueue(session, workloads.slow_query, seconds=5).id
        quick = [bq.enqueue(session, workloads.quick, value=n).id for n in range(5)]
        session.commit()

    def task(task_id) -> bq.Task:
        with app.session_factory(expire_on_commit=False) as session:
            return session.get(bq.Task, task_id)

    workers = Workers(url, tmp_path)
    process = workers.start("limits", MAX_WORKER_CRASHES=2, WORKER_HEARTBEAT_PERIOD=0.2)
    try:
        for task_id in [idle, slow, *quick]:
            wait_for(
                lambda task_id=task_id: (
                    task(task_id).state in (bq.TaskState.DONE, bq.TaskState.FAILED)
                ),
                "every task to settle",
            )
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0
        workers.kill_all()
    # the server cut the idle transaction's connection twice: failed, not retried forever
    idle_task, slow_task = task(idle), task(slow)
    assert (idle_task.state, idle_task.crash_count) == (bq.TaskState.FAILED, 2)
    assert idle_task.error_message == (
        "its worker died or lost its database connection 2 times while running it"
    )
    assert slow_task.state == bq.TaskState.FAILED
    assert "canceling statement due to statement timeout" in slow_task.error_message
    assert all(task(t).state == bq.TaskState.DONE for t in quick)
    with app.session_factory() as session:
        assert session.scalar(select(func.count()).select_from(Effect)) == 0
    assert "lost its database connection" in workers.output(process)


def test_too_few_connections_is_a_clear_error(limited_server, tmp_path):
    server, app = limited_server
    url = server.url
    configure(app, server, restart=True, max_connections="4", superuser_reserved_connections="0")
    workers = Workers(url, tmp_path)
    holders = [app.engine.connect() for _ in range(4)]  # every slot taken
    try:
        process = workers.start("limits")
        assert process.wait(60) == 1
    finally:
        for connection in holders:
            connection.close()
    output = workers.output(process)
    assert "Error: cannot use the database: " in output
    assert "too many clients" in output and "Traceback" not in output

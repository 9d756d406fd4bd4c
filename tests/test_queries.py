"""The hot path's statements are served by the partial index, whatever the table's size."""

from __future__ import annotations

import json
import uuid
from datetime import timedelta

import pytest
from sqlalchemy import select, text

from beanflow.engine.queries import Prepared, Queries, channel_parameters
from beanflow.models import Event, Task, Worker

PENDING_ROWS = 100_000


@pytest.fixture
def deep_queue(app):
    """100,000 pending tasks on 'deep', as many done ones, and a worker row."""
    worker_id = uuid.uuid4()
    with app.engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO beanflow_tasks (id, channel, module, name, state) "
                "SELECT gen_random_uuid(), CASE WHEN n % 10 = 0 THEN 'other' ELSE 'deep' END, "
                "'m', 'f', CASE WHEN n <= :pending THEN 'PENDING' ELSE 'DONE' END "
                "FROM generate_series(1, :total) AS n"
            ),
            {"pending": PENDING_ROWS, "total": 2 * PENDING_ROWS},
        )
        connection.execute(
            text("INSERT INTO beanflow_workers (id, name, channels) VALUES (:id, 'w', '{deep}')"),
            {"id": worker_id},
        )
    with app.engine.begin() as connection:  # as autovacuum would, once the rows are in
        connection.execute(text("ANALYZE beanflow_tasks"))
    return worker_id


def plan(connection, statement, parameters) -> dict:
    compiled = statement.compile(dialect=connection.dialect)
    sql_text = str(compiled)
    rows = connection.exec_driver_sql(
        "EXPLAIN (FORMAT JSON) " + sql_text,
        compiled.construct_params(parameters)
        | {k: v for k, v in compiled.params.items() if k not in parameters},
    ).scalar()
    return rows[0]["Plan"] if isinstance(rows, list) else json.loads(rows)[0]["Plan"]


def nodes(node: dict):
    yield node
    for child in node.get("Plans", []):
        yield from nodes(child)


def scans_of(node: dict, table: str) -> list[tuple[str, str | None]]:
    return [
        (n["Node Type"], n.get("Index Name"))
        for n in nodes(node)
        if n.get("Relation Name") == table
    ]


@pytest.mark.parametrize("channels", [["deep"], ["deep", "other", "empty"]])
def test_claim_uses_the_partial_index_in_order(app, deep_queue, channels):
    queries = Queries(Task, Worker, Event, channel_count=len(channels), batch_size=10)
    parameters = {"worker": deep_queue} | channel_parameters(channels)
    with app.engine.begin() as connection:
        root = plan(connection, queries.claim, parameters)
    scans = scans_of(root, "beanflow_tasks")
    assert scans.count(("Index Scan", "ix_beanflow_tasks_pending")) == len(channels)
    assert not [s for s in scans if s[0] == "Seq Scan"]
    # rows come out of the index in order: no node sorts all pending rows of a channel
    assert all(
        n["Node Type"] != "Sort" or n["Plan Rows"] <= 10 * len(channels) for n in nodes(root)
    )


def test_next_due_uses_the_partial_index(app, deep_queue):
    queries = Queries(Task, Worker, Event)
    with app.engine.begin() as connection:
        root = plan(connection, queries.next_due, {"channel_0": "deep"})
    assert scans_of(root, "beanflow_tasks") == [("Index Scan", "ix_beanflow_tasks_pending")]


def test_claim_returns_the_oldest_due_tasks(app, deep_queue):
    queries = Queries(Task, Worker, Event, batch_size=10)
    with app.engine.begin() as connection:
        claimed = connection.execute(
            queries.claim, {"worker": deep_queue, "channel_0": "deep"}
        ).all()
        assert len(claimed) == 10
        assert all(row.channel == "deep" and row.worker_id == deep_queue for row in claimed)
        oldest = connection.execute(
            text("SELECT max(scheduled_at) FROM beanflow_tasks WHERE state = 'PROCESSING'")
        ).scalar()
        younger = connection.execute(
            text(
                "SELECT count(*) FROM beanflow_tasks WHERE state = 'PENDING' AND channel = 'deep' "
                "AND scheduled_at < :oldest"
            ),
            {"oldest": oldest},
        ).scalar()
        assert younger == 0


def test_reap_uses_indexes(app, deep_queue):
    queries = Queries(Task, Worker, Event)
    with app.engine.begin() as connection:
        root = plan(connection, queries.reap, {"timeout": timedelta(seconds=100), "max_crashes": 3})
    assert not [s for s in scans_of(root, "beanflow_tasks") if s[0] == "Seq Scan"]


@pytest.mark.parametrize("name", ["complete", "fail", "release", "heartbeat"])
def test_single_task_statements_use_indexes(app, deep_queue, name):
    queries = Queries(Task, Worker, Event)
    parameters = {
        "task_id": uuid.uuid4(),
        "worker": deep_queue,
        "task_ids": [uuid.uuid4()],
        "task_results": [None],
        "retry_at": None,
        "error": "e",
        "exception_type": "E",
        "traceback": "t",
        "unstarted": [],
        "lost": False,
        "max_crashes": 3,
    }
    with app.engine.begin() as connection:
        root = plan(connection, getattr(queries, name), parameters)
    for table in ("beanflow_tasks", "beanflow_workers"):
        assert not [s for s in scans_of(root, table) if s[0] == "Seq Scan"], (name, table)


@pytest.mark.parametrize("channels", [["deep"], ["deep", "other"]])
def test_prepared_claim_generic_plan_uses_the_partial_index(app, deep_queue, channels):
    """Workers run the claim PREPAREd, with one generic plan for all parameters: that plan
    must use the index as well."""
    queries = Queries(Task, Worker, Event, channel_count=len(channels), batch_size=10)
    prepared = Prepared("claim_under_test", queries.claim, *queries.task.c)
    with app.engine.connect() as connection:
        connection.exec_driver_sql("SET plan_cache_mode = force_generic_plan")
        prepared.prepare(connection)
        parameters = {"worker": deep_queue} | channel_parameters(channels)
        root = plan(connection, prepared.execute, parameters)
        connection.rollback()
    scans = scans_of(root, "beanflow_tasks")
    assert scans.count(("Index Scan", "ix_beanflow_tasks_pending")) == len(channels)
    assert not [s for s in scans if s[0] == "Seq Scan"]


def test_children_and_events_of_a_task_are_found_by_index(app, deep_queue):
    with app.engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO beanflow_events (task_id, type) SELECT id, 'CLAIMED' "
                "FROM beanflow_tasks LIMIT 50000"
            )
        )
        connection.execute(text("ANALYZE beanflow_events"))
        task_id = connection.execute(text("SELECT id FROM beanflow_tasks LIMIT 1")).scalar()
        children = plan(connection, select(Task.id).where(Task.parent_id == task_id), {})
        events = plan(connection, select(Event.id).where(Event.task_id == task_id), {})
    assert "ix_beanflow_tasks_parent" in [n.get("Index Name") for n in nodes(children)]
    assert "ix_beanflow_events_task_id" in [n.get("Index Name") for n in nodes(events)]

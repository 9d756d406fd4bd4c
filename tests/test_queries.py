"""The hot path's statements are served by the partial index, whatever the table's size."""

from __future__ import annotations

import dataclasses
import json
import threading
import uuid
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, select, text

from beanflow.engine.queries import Prepared, Queries, channel_parameters
from beanflow.models import Cancellation, Event, Task, Worker

from .conftest import create_database, database_url, drop_database
from .helpers import wait_for

PENDING_ROWS = 100_000


@dataclasses.dataclass
class DeepQueue:
    engine: Engine
    worker: uuid.UUID


@pytest.fixture(scope="module")
def deep_queue(server_url, template_database):
    """A database of this module's tests: 100,000 pending tasks on 'deep', as many done ones,
    and a worker row. Tests that write to it roll back."""
    name = create_database(server_url, template_database)
    engine = create_engine(database_url(server_url, name))
    worker_id = uuid.uuid4()
    with engine.begin() as connection:
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
    with engine.begin() as connection:  # as autovacuum would, once the rows are in
        connection.execute(text("ANALYZE beanflow_tasks"))
    yield DeepQueue(engine, worker_id)
    engine.dispose()
    drop_database(server_url, name)


def plan(connection, statement, parameters) -> dict:
    compiled = statement.compile(dialect=connection.dialect)
    sql_text = str(compiled)
    rows = connection.exec_driver_sql(
        "EXPLAIN (FORMAT JSON) " + sql_text,
        compiled.construct_params(parameters)
        | {k: v for k, v in compiled.params.items() if k not in parameters},
    ).scalar()
    return root_of(rows)


def root_of(explained) -> dict:
    """The root node of an ``EXPLAIN (FORMAT JSON)`` answer (decoded or not by the driver)."""
    return (explained if isinstance(explained, list) else json.loads(explained))[0]["Plan"]


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
def test_claim_uses_the_partial_index_in_order(deep_queue, channels):
    queries = Queries(Task, Worker, Event, channel_count=len(channels), batch_size=10)
    parameters = {"worker": deep_queue.worker} | channel_parameters(channels)
    with deep_queue.engine.begin() as connection:
        root = plan(connection, queries.claim, parameters)
    scans = scans_of(root, "beanflow_tasks")
    assert scans.count(("Index Scan", "ix_beanflow_tasks_pending")) == len(channels)
    assert not [s for s in scans if s[0] == "Seq Scan"]
    # rows come out of the index in order: no node sorts all pending rows of a channel
    assert all(
        n["Node Type"] != "Sort" or n["Plan Rows"] <= 10 * len(channels) for n in nodes(root)
    )


def test_next_due_uses_the_partial_index(deep_queue):
    queries = Queries(Task, Worker, Event)
    with deep_queue.engine.begin() as connection:
        root = plan(connection, queries.next_due, {"channel_0": "deep"})
    assert scans_of(root, "beanflow_tasks") == [("Index Scan", "ix_beanflow_tasks_pending")]


def test_claim_returns_the_oldest_due_tasks(deep_queue):
    queries = Queries(Task, Worker, Event, batch_size=10)
    with deep_queue.engine.connect() as connection:  # rolled back at the end
        claimed = connection.execute(
            queries.claim, {"worker": deep_queue.worker, "channel_0": "deep"}
        ).all()
        assert len(claimed) == 10
        assert all(row.channel == "deep" and row.worker_id == deep_queue.worker for row in claimed)
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


def test_reap_uses_indexes(deep_queue):
    queries = Queries(Task, Worker, Event, cancellation_model=Cancellation)
    with deep_queue.engine.begin() as connection:
        root = plan(connection, queries.reap, {"timeout": timedelta(seconds=100), "max_crashes": 3})
    assert not [s for s in scans_of(root, "beanflow_tasks") if s[0] == "Seq Scan"]


@pytest.mark.parametrize("name", ["complete", "settle", "release", "heartbeat"])
def test_single_task_statements_use_indexes(deep_queue, name):
    queries = Queries(Task, Worker, Event, cancellation_model=Cancellation)
    parameters = {
        "task_id": uuid.uuid4(),
        "worker": deep_queue.worker,
        "task_ids": [uuid.uuid4()],
        "task_results": [None],
        "retry_at": None,
        "state": "FAILED",
        "event": "FAILED",
        "refund": 0,
        "error": "e",
        "exception_type": "E",
        "traceback": "t",
        "innocent": [],
        "charged": [],
        "max_crashes": 3,
    }
    with deep_queue.engine.begin() as connection:
        root = plan(connection, getattr(queries, name), parameters)
    for table in ("beanflow_tasks", "beanflow_workers"):
        assert not [s for s in scans_of(root, table) if s[0] == "Seq Scan"], (name, table)


def claims(queries: Queries) -> dict[str, Any]:
    """The claim alone, and with a completion (what a worker's commit sends)."""
    return {"claim": queries.claim, "complete_and_claim": queries.complete_and_claim_up_to(10)}


@pytest.mark.parametrize("statement", ["claim", "complete_and_claim"])
@pytest.mark.parametrize("channels", [["deep"], ["deep", "other"]])
def test_prepared_claim_generic_plan_uses_the_partial_index(deep_queue, channels, statement):
    """Workers run the claim PREPAREd, with one generic plan for all parameters: that plan
    must use the index as well; a completion in the same statement finds its tasks by key."""
    queries = Queries(Task, Worker, Event, channel_count=len(channels), batch_size=10)
    prepared = Prepared("claim_under_test", claims(queries)[statement])
    with deep_queue.engine.connect() as connection:
        connection.exec_driver_sql("SET plan_cache_mode = force_generic_plan")
        prepared.prepare(connection)
        parameters = {"worker": deep_queue.worker, "task_ids": [uuid.uuid4()]}
        parameters |= {"task_results": [None]} | channel_parameters(channels)
        root = plan(connection, prepared.execute, parameters)
        connection.rollback()
        connection.exec_driver_sql("DEALLOCATE claim_under_test")
    scans = scans_of(root, "beanflow_tasks")
    assert scans.count(("Index Scan", "ix_beanflow_tasks_pending")) == len(channels)
    assert not [s for s in scans if s[0] == "Seq Scan" or s[0].startswith("Bitmap")]
    if statement == "complete_and_claim":
        assert ("Index Scan", "beanflow_tasks_pkey") in scans


def test_children_and_events_of_a_task_are_found_by_index(deep_queue):
    with deep_queue.engine.connect() as connection:  # rolled back at the end
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


DEAD_ROWS = 500_000


@pytest.fixture(scope="module")
def stale_queue(server_url, template_database):
    """A task table as a fresh deployment has it after a long run: never analyzed, autovacuum
    behind (off), 1,000,000 dead tuples (500,000 tasks claimed, then completed), and as many
    dead entries in the partial index of PROCESSING rows."""
    name = create_database(server_url, template_database)
    engine = create_engine(database_url(server_url, name))
    worker_id = uuid.uuid4()
    with engine.begin() as connection:
        connection.execute(text("ALTER TABLE beanflow_tasks SET (autovacuum_enabled = false)"))
        connection.execute(
            text("INSERT INTO beanflow_workers (id, name, channels) VALUES (:id, 'w', '{c}')"),
            {"id": worker_id},
        )
        connection.execute(
            text(
                "INSERT INTO beanflow_tasks (id, channel, module, name) "
                "SELECT gen_random_uuid(), 'c', 'm', 'f' FROM generate_series(1, :n)"
            ),
            {"n": DEAD_ROWS + 1_000},
        )
        connection.execute(
            text(
                "UPDATE beanflow_tasks SET state = 'PROCESSING', worker_id = :worker "
                "WHERE id IN (SELECT id FROM beanflow_tasks ORDER BY scheduled_at LIMIT :n)"
            ),
            {"worker": worker_id, "n": DEAD_ROWS},
        )
    with engine.begin() as connection:
        connection.execute(
            text("UPDATE beanflow_tasks SET state = 'DONE' WHERE state = 'PROCESSING'")
        )
        never_analyzed = connection.execute(
            text(
                "SELECT last_analyze IS NULL AND last_autoanalyze IS NULL "
                "FROM pg_stat_user_tables WHERE relname = 'beanflow_tasks'"
            )
        ).scalar()
    assert never_analyzed
    yield DeepQueue(engine, worker_id)
    engine.dispose()
    drop_database(server_url, name)


def generic_plan(connection, name: str, statement, parameters: dict, *columns) -> dict:
    """The plan a worker runs: the statement PREPAREd, with plan_cache_mode generic."""
    prepared = Prepared(name, statement, *columns)
    connection.exec_driver_sql("SET plan_cache_mode = force_generic_plan")
    prepared.prepare(connection)
    try:
        return plan(connection, prepared.execute, parameters)
    finally:
        connection.rollback()
        connection.exec_driver_sql(f"DEALLOCATE {name}")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["complete", "settle"])
def test_completion_finds_tasks_by_key_on_a_stale_table(stale_queue, name):
    """Neither statistics nor dead tuples change how a task is found: by its primary key,
    never through the partial index full of completed tasks' dead entries."""
    queries = Queries(Task, Worker, Event)
    parameters = {
        "task_id": uuid.uuid4(),
        "task_ids": [uuid.uuid4(), uuid.uuid4()],
        "task_results": [None, None],
        "worker": stale_queue.worker,
        "retry_at": None,
        "state": "FAILED",
        "event": "FAILED",
        "refund": 0,
        "error": "e",
        "exception_type": "E",
        "traceback": "t",
    }
    statement = getattr(queries, name)
    with stale_queue.engine.connect() as connection:
        if name == "complete":  # PREPAREd by workers
            root = generic_plan(connection, "stale_complete", statement, parameters)
        else:
            root = plan(connection, statement, parameters)
    scans = [s for s in scans_of(root, "beanflow_tasks") if s[0] != "ModifyTable"]
    assert scans == [("Index Scan", "beanflow_tasks_pkey")], scans


@pytest.mark.slow
@pytest.mark.parametrize("statement", ["claim", "complete_and_claim"])
def test_claim_walks_the_pending_index_on_a_stale_table(stale_queue, statement):
    """An index scan, not a bitmap scan: index scans mark the dead entries they pass, so the
    claimed tasks' entries are skipped cheaply ever after. A completion in the same
    statement finds its tasks by key, never through the index of PROCESSING tasks."""
    queries = Queries(Task, Worker, Event, batch_size=10)
    parameters = {"worker": stale_queue.worker, "channel_0": "c"}
    parameters |= {"task_ids": [uuid.uuid4()], "task_results": [None]}
    with stale_queue.engine.connect() as connection:
        root = generic_plan(connection, "stale_claim", claims(queries)[statement], parameters)
        due = plan(connection, queries.next_due, {"channel_0": "c"})
    scans = [s for s in scans_of(root, "beanflow_tasks") if s[0] != "ModifyTable"]
    assert scans.count(("Index Scan", "ix_beanflow_tasks_pending")) == 1
    assert set(scans) <= {
        ("Index Scan", "ix_beanflow_tasks_pending"),
        ("Index Scan", "beanflow_tasks_pkey"),
    }, scans
    assert scans_of(due, "beanflow_tasks") == [("Index Scan", "ix_beanflow_tasks_pending")]


@pytest.mark.slow
def test_a_claim_from_the_frontier_skips_the_dead_entries_before_it(stale_queue):
    """The claimed tasks' entries stay in the pending index until a VACUUM: a claim that starts
    from the index's first entry reads their pages, one from the frontier (``floor_0``, the
    oldest task the worker's last claim took) does not."""
    from beanflow.engine.queries.tasks import BEFORE_ANY_TASK

    queries = Queries(Task, Worker, Event, batch_size=10)
    compiled = queries.claim.compile(dialect=stale_queue.engine.dialect)
    pages = {}
    with stale_queue.engine.connect() as connection:
        frontier = connection.execute(
            text("SELECT min(scheduled_at) FROM beanflow_tasks WHERE state = 'PENDING'")
        ).scalar()
        for name, floor in (("from the start", BEFORE_ANY_TASK), ("from the frontier", frontier)):
            parameters = {"worker": stale_queue.worker, "channel_0": "c", "floor_0": floor}
            explained = connection.exec_driver_sql(
                "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + str(compiled),
                compiled.construct_params(parameters)
                | {k: v for k, v in compiled.params.items() if k not in parameters},
            ).scalar()
            connection.rollback()  # the claim is undone
            (scan,) = [
                node
                for node in nodes(root_of(explained))
                if node.get("Index Name") == "ix_beanflow_tasks_pending"
            ]
            assert scan["Actual Rows"] == 10, name
            pages[name] = scan["Shared Hit Blocks"] + scan["Shared Read Blocks"]
    assert pages["from the frontier"] * 20 < pages["from the start"], pages


def test_the_completion_claims_the_next_batch_before_it_completes_this_one(db_url):
    """``complete_and_claim`` claims first: its claim reads the queue as of the statement's
    start, not after the completion's writes (a task another worker claimed meanwhile would
    be locked by its recheck, and that worker's completion kept waiting for this commit).
    Shown by holding the row the completion must update: the statement waits there, its
    claim already made (the pending task is locked)."""
    from beanflow.engine.connections import WorkerConnections

    engine = create_engine(db_url)
    worker, held, pending = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    with engine.begin() as connection:
        connection.execute(
            text("INSERT INTO beanflow_workers (id, name, channels) VALUES (:id, 'w', '{c}')"),
            {"id": worker},
        )
        connection.execute(
            text(
                "INSERT INTO beanflow_tasks (id, channel, module, name, state, worker_id) "
                "VALUES (:held, 'c', 'm', 'f', 'PROCESSING', :worker), "
                "(:pending, 'c', 'm', 'f', 'PENDING', NULL)"
            ),
            {"held": held, "pending": pending, "worker": worker},
        )
    queries = Queries(Task, Worker, Event, channel_count=1, batch_size=16)
    connections = WorkerConnections(engine, ["c"], queries, Task)
    connections.open()
    session = connections.session
    pid = session.connection().exec_driver_sql("SELECT pg_backend_pid()").scalar()
    answer: list[Any] = []
    with engine.connect() as blocker, engine.connect() as onlooker:
        blocker.execute(
            text("SELECT 1 FROM beanflow_tasks WHERE id = :id FOR UPDATE"), {"id": held}
        )
        statement = threading.Thread(
            target=lambda: answer.append(
                connections.complete_and_claim(16).run(
                    session,
                    {"task_ids": [held], "task_results": [None], "worker": worker}
                    | channel_parameters(["c"]),
                )
            )
        )
        statement.start()
        wait_for(
            lambda: onlooker.execute(
                text("SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = :pid"),
                {"pid": pid},
            ).scalar(),
            "the completion to wait for the held row",
        )
        unlocked = onlooker.execute(
            text("SELECT id FROM beanflow_tasks WHERE id = :id FOR UPDATE SKIP LOCKED"),
            {"id": pending},
        ).all()
        onlooker.rollback()
        blocker.rollback()
        statement.join()
    session.commit()
    (completed,), claimed = answer[0]
    assert unlocked == []  # claimed before the completion reached the held row
    assert completed == 1 and [task.id for task in claimed] == [pending]
    connections.dispose()
    engine.dispose()


def test_plans_made_while_the_table_is_small_hold_when_it_grows(db_url):
    """A worker prepares its statements when it starts, often on a table that is small and was
    never analyzed; their generic plans must not scan the table, which grows under them
    (autovacuum off: no ANALYZE replans them)."""
    from beanflow.engine.connections import WorkerConnections

    engine = create_engine(db_url)
    with engine.begin() as connection:
        connection.execute(text("ALTER TABLE beanflow_tasks SET (autovacuum_enabled = false)"))
        connection.execute(
            text(
                "INSERT INTO beanflow_tasks (id, channel, module, name) "
                "SELECT gen_random_uuid(), 'c', 'm', 'f' FROM generate_series(1, 20)"
            )
        )
        worker = uuid.uuid4()
        connection.execute(
            text("INSERT INTO beanflow_workers (id, name, channels) VALUES (:id, 'w', '{c}')"),
            {"id": worker},
        )
    queries = Queries(Task, Worker, Event, channel_count=1, batch_size=16)
    connections = WorkerConnections(engine, ["c"], queries, Task)
    connections.open()
    session = connections.session
    _, claimed = connections.claim(16).run(session, {"worker": worker} | channel_parameters(["c"]))
    completion = {"task_ids": [t.id for t in claimed], "task_results": [None] * 16}
    completed = session.execute(
        connections.complete.execute, completion | {"worker": worker}
    ).scalar()
    session.rollback()
    (done,), tasks = connections.complete_and_claim(16).run(
        session, completion | {"worker": worker} | channel_parameters(["c"])
    )
    session.rollback()
    assert len(claimed) == completed == 16  # the plans are made: each ran once
    assert len(tasks) == 16 and done == 0  # (the first rolled back)
    with engine.begin() as connection:  # the table grows, never analyzed
        connection.execute(
            text(
                "INSERT INTO beanflow_tasks (id, channel, module, name, state) "
                "SELECT gen_random_uuid(), 'c', 'm', 'f', 'DONE' FROM generate_series(1, 200000)"
            )
        )
    connection = session.connection()
    for statement in (
        "EXECUTE beanflow_complete(NULL, '{}', '{}', gen_random_uuid())",
        f"EXECUTE beanflow_claim_16('{worker}', 'c', '-infinity', 0, 0, 1)",
        f"EXECUTE beanflow_complete_claim_16(NULL, '{{}}', '{{}}', '{worker}', 'c', "
        "'-infinity', 0, 0, 1)",
    ):
        root = root_of(connection.exec_driver_sql("EXPLAIN (FORMAT JSON) " + statement).scalar())
        assert not [s for s in scans_of(root, "beanflow_tasks") if s[0] == "Seq Scan"], statement
    connections.dispose()
    engine.dispose()


def test_workflow_progression_plans_made_on_small_tables_hold_as_they_grow(db_url, monkeypatch):
    """A worker prepares the progression's statements at its first step's end, often while
    the workflow tables are small and never analyzed: their generic plans must find rows
    through indexes (no scan, no join reading a whole table) once those tables are large."""
    from beanflow import spec
    from beanflow.engine.connections import WorkerConnections

    monkeypatch.setenv("TEST_DB_URL", db_url)
    deployment = spec.load("tests/workloads/flows.yaml")
    workflows = deployment.workflows
    tables = (
        "beanflow_tasks",
        "beanflow_workflow_steps",
        "beanflow_workflow_runs",
        "beanflow_workflow_tallies",
    )
    with deployment.app.engine.begin() as connection:
        for table in tables:
            connection.exec_driver_sql(f"ALTER TABLE {table} SET (autovacuum_enabled = false)")
    # a worker's connection, with its completion counting the steps down
    queries = Queries(
        Task, Worker, Event, batch_size=16, completion_columns=[workflows.completion_column]
    )
    connections = WorkerConnections(deployment.app.engine, ["flows"], queries, Task)
    connections.open()
    session = connections.session
    run = workflows.start(session, "diamond", {})
    session.commit()
    (task,) = session.scalars(select(Task).where(Task.workflow_run_id == run.id))
    completion = connections.complete_and_claim(16)
    given = {"task_ids": [task.id], "task_results": [None], "worker": uuid.uuid4()}
    completing = given | channel_parameters(["idle"])  # claims nothing
    (_, counted), _ = completion.run(session, completing)
    assert counted == 1  # a step without tallies: its run is locked to advance
    workflows.on_tasks_ended(session, [task], [], counted)  # prepares and plans the rest
    session.rollback()
    workflows.on_tasks_ended(session, [task], [], None)  # and a larger batch's count-down
    session.rollback()
    with deployment.app.engine.begin() as grow:  # 200,000 runs of one step each, tallied
        grow.execute(
            text(
                "WITH r AS (INSERT INTO beanflow_workflow_runs (id, workflow, state, input) "
                "SELECT gen_random_uuid(), 'diamond', 'DONE', '{}' FROM generate_series(1, 200000) "
                "RETURNING id), t AS (INSERT INTO beanflow_tasks (id, channel, module, name, "
                "state, workflow_run_id) SELECT gen_random_uuid(), 'flows', 'm', 'f', 'DONE', id "
                "FROM r RETURNING id, workflow_run_id) INSERT INTO beanflow_workflow_steps "
                "(run_id, step, index, task_id) SELECT workflow_run_id, 'top', 0, id FROM t"
            )
        )
        grow.execute(
            text(
                "INSERT INTO beanflow_workflow_tallies (run_id, step, slot, open) "
                "SELECT id, 'top', 0, 1 FROM beanflow_workflow_runs WHERE state = 'DONE'"
            )
        )
    ids, done = [str(run.id)], [str(task.id)]
    for prepared, parameters in (
        (completion.prepared, completing),
        (workflows.sql.count_down, {"done": done, "failed": []}),
        (workflows.sql.read, {"runs": ids, "done": done, "failed": [], "whole": False}),
        (
            workflows.sql.write,
            {"steps": [], "tallies": [], "tasks": [], "notify": []}
            | {"moved_ids": ids, "moved": {}},
        ),
    ):
        clause = prepared.execute.element
        explain = text("EXPLAIN (FORMAT JSON) " + clause.text).bindparams(
            *clause._bindparams.values()
        )
        root = root_of(session.execute(explain, parameters).scalar())
        for node in nodes(root):
            if node.get("Relation Name") in tables and "Scan" in node["Node Type"]:
                found_by = node.get("Index Cond") or node.get("Recheck Cond")  # bitmap: both
                assert found_by, (prepared.name, node["Node Type"], node["Relation Name"])
                # ended tasks' steps found by their ids, not among all the steps of their runs
                assert "task_id" not in node.get("Filter", ""), (prepared.name, node["Filter"])
    connections.dispose()
    deployment.app.engine.dispose()

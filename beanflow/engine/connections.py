"""A worker's own connections: the hot path's session, and the LISTEN connection."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

from psycopg2.extensions import TRANSACTION_STATUS_INERROR
from sqlalchemy import Integer, column, inspect, select
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import instance_state
from sqlalchemy.orm.state import InstanceState

from .. import db
from .notify import Listener
from .queries import Prepared, Queries
from .queries.tasks import COMPLETED, COMPUTED

# for the rest of a transaction in which a hot statement gets its generic plan
NO_SEQUENTIAL_SCANS = "SET LOCAL enable_seqscan = off"
# the hot-path connection's own setting: its statements are planned once, for any parameters
PLAN_ONCE = "SET plan_cache_mode = force_generic_plan"
# what a task given the session may have left on it, undone: its settings (back to the
# connection's own, as it opened, and PLAN_ONCE), its role, its session-level advisory locks
# (which a rollback does not release)
RESET_SESSION = f"RESET ALL; RESET ROLE; {PLAN_ONCE}; SELECT pg_advisory_unlock_all()"
_PREPARED = "beanflow_prepared"  # a connection's info: the names PREPAREd on it


def prepare_once(connection: Connection, prepared: Prepared) -> None:
    """PREPARE ``prepared`` on this hot-path connection (``db.make_hot_path_engine``) unless
    it is there already. Its first EXECUTE, the caller's next statement, makes its generic
    plan with sequential scans ruled out: planned on a table that is still small (and never
    analyzed), a statement would otherwise scan the whole table on every batch as it grows."""
    names = connection.connection.info.setdefault(_PREPARED, set())
    if prepared.name not in names:
        prepared.prepare(connection)  # a session-level PREPARE: it stays
        db.send_with_next_statement(connection, NO_SEQUENTIAL_SCANS)
        names.add(prepared.name)


def execute(connection: Connection, prepared: Prepared, parameters: dict[str, Any]) -> Any:
    """Run ``prepared``'s statement: EXECUTEd on a worker's hot-path connection (PREPAREd
    there once), sent as it is anywhere else (where it runs once in a while)."""
    if db.on_hot_path(connection):
        prepare_once(connection, prepared)
        return connection.execute(prepared.execute, parameters)
    return connection.execute(prepared.statement, parameters)


class TaskLoader:
    """The task model's objects, persistent in a session, from plain rows of its table: what
    the ORM's loading makes of them, at a fraction of its cost. The ORM builds its loaders
    for every statement it runs (~35 µs a task for a claim of ten, the largest part of a
    worker's CPU on a drain of no-op tasks); a claim needs only the columns put in place.

    A model that asks for more than columns (a ``load`` event or reconstructor, inheritance,
    a version counter, a property that is not one of its table's columns) is loaded by the
    ORM, as is any model in a session something listens to for loaded objects."""

    def __init__(self, model: type) -> None:
        self.model = model
        mapper = inspect(model)
        positions = {column: i for i, column in enumerate(mapper.local_table.c)}
        self.identity = mapper._identity_class
        self.new = mapper.class_manager.new_instance
        self.columns = [(p.key, positions.get(p.columns[0])) for p in mapper.column_attrs]
        self.key = positions.get(mapper.primary_key[0]) if len(mapper.primary_key) == 1 else None
        self.plain = (
            self.key is not None
            and all(len(p.columns) == 1 for p in mapper.column_attrs)
            and all(position is not None for _, position in self.columns)
            and mapper.inherits is None
            and mapper.polymorphic_on is None
            and mapper.version_id_col is None
            and not mapper.class_manager.dispatch.load
        )

    def loads(self, session: Session) -> bool:
        """Whether this loader, rather than the ORM, makes the objects in ``session``."""
        return self.plain and not session.dispatch.loaded_as_persistent

    def load(self, session: Session, rows: list[Any], offset: int) -> list[Any]:
        """The objects of ``rows``, whose table columns start at ``offset`` (a row whose key
        is NULL makes none); an object already in the session is updated and returned."""
        identity_map: Any = session.identity_map
        tasks, states = [], []
        for row in rows:
            key = row[offset + self.key]  # type: ignore[operator]
            if key is None:
                continue
            identity = (self.identity, (key,), None)
            task = identity_map.get(identity)
            if task is None:
                task = self.new()
                state = instance_state(task)
                state.key, state.identity_token = identity, None
                state.session_id = session.hash_key
                identity_map._add_unpresent(state, identity)
            else:
                state = instance_state(task)
            values = state.dict
            for name, position in self.columns:
                values[name] = row[offset + position]  # type: ignore[operator]
            states.append((state, values))
            tasks.append(task)
        InstanceState._commit_all_states(states, identity_map)
        return tasks


class ClaimStatement:
    """A claim PREPAREd on the hot-path connection, as the worker sends it: the tasks it
    claims come back as the task model's objects, persistent in the session."""

    def __init__(self, prepared: Prepared, loader: TaskLoader, *extra: Any) -> None:
        self.prepared, self.loader, self.extra = prepared, loader, len(extra)
        # where the loader cannot make them: the ORM's loading (its rows: object, *extra)
        self.orm = select(loader.model, *extra).from_statement(prepared.execute)

    def run(self, session: Session, parameters: dict[str, Any]) -> tuple[list[Any], list[Any]]:
        """Send it; returns the extra columns of its first row (none for a claim alone) and
        the tasks it claimed."""
        if self.loader.loads(session):
            rows = session.connection().execute(self.prepared.execute, parameters).all()
            first = rows[0][: self.extra] if rows else ()
            return list(first), self.loader.load(session, rows, self.extra)
        rows = session.execute(self.orm, parameters).all()
        first = rows[0][1:] if rows else ()
        return list(first), [row[0] for row in rows if row[0] is not None]


class WorkerConnections:
    """The hot path runs on a connection of its own, with its statements (claim, complete)
    PREPAREd on it and its savepoints sent with the next statement
    (``db.make_hot_path_engine``); the LISTEN connection is another. Both are opened
    together, and dropped together when either breaks."""

    def __init__(self, engine: Engine, channels: Iterable[str], queries: Queries, model: type):
        self.engine = engine
        self.channels = list(channels)
        self.queries, self.model = queries, model
        self.complete = Prepared("beanflow_complete", queries.complete, column("count", Integer))
        # claims (alone, or with a completion) of each size used, PREPAREd and as read back
        self._claims: dict[str, ClaimStatement] = {}
        self.loader = TaskLoader(model)
        # the first columns of a completion's rows: how many it completed, what it computed
        self._completion = [
            column(COMPLETED, Integer),
            *(column(f"{COMPUTED}_{i}") for i in range(len(queries.completion_columns))),
        ]
        self._hot_engine = db.make_hot_path_engine(engine.url)
        self.session: Session | None = None
        self.listener: Listener | None = None
        self._used = False  # a task given the session ran since the last batch's completion

    def open(self) -> bool:
        """Connect unless connected; True when this made new connections."""
        if self.session is not None:
            return False
        connection = self._hot_engine.connect()
        try:
            # planned once for this connection: the statements' parameters never change the plan
            connection.exec_driver_sql(PLAN_ONCE)
            prepare_once(connection, self.complete)  # and planned now
            connection.execute(
                self.complete.execute, {"task_ids": [], "task_results": [], "worker": uuid.uuid4()}
            )
            connection.commit()
        except BaseException:
            _drop(connection)  # else its engine's only connection stays checked out for ever
            raise
        self.session = Session(bind=connection, expire_on_commit=False, autoflush=True)
        self.listener = Listener(self.engine, self.channels)
        return True

    def claim(self, size: int) -> ClaimStatement:
        """The claim of up to ``size`` tasks, PREPAREd on this connection when first used."""
        return self._prepared(f"beanflow_claim_{size}", partial(self.queries.claim_up_to, size))

    def complete_and_claim(self, size: int) -> ClaimStatement:
        """``complete`` and the claim of up to ``size`` tasks in one statement, PREPAREd on
        this connection when first used."""
        return self._prepared(
            f"beanflow_complete_claim_{size}",
            partial(self.queries.complete_and_claim_up_to, size),
            *self._completion,
        )

    def _prepared(self, name: str, build: Callable[[], Any], *extra: Any) -> ClaimStatement:
        """A statement returning the task model's rows (after ``extra`` columns), PREPAREd on
        this connection, planned by the caller's EXECUTE."""
        if name not in self._claims:
            prepared = Prepared(name, build(), *extra, *self.queries.task.c)
            self._claims[name] = ClaimStatement(prepared, self.loader, *extra)
        claim = self._claims[name]
        assert self.session is not None
        prepare_once(self.session.connection(), claim.prepared)
        return claim

    def commits(self) -> int:
        """How many transactions the hot-path connection has committed (``db.commits``)."""
        assert self.session is not None
        return db.commits(self.session.get_bind())  # type: ignore[arg-type]

    def watch_session(self) -> None:
        """A task given the session starts: note whether its statements may change the
        session's state (``db.watch_session``), and that the batch used the session."""
        assert self.session is not None
        db.watch_session(self.session.get_bind())  # type: ignore[arg-type]
        self._used = True

    def reset_session(self, if_changed: bool = False) -> None:
        """Undo what a task given the session left on its connection: whatever it SET (for
        the session or its transaction, by SET or set_config, its role included) and the
        advisory locks it took for the session. The tasks after it and the worker's own
        statements run with the connection's settings. Sent with the next statement. With
        ``if_changed``, only when one of its statements may have changed them (a SET in a
        function it called is undone with the batch's completion: ``reset_after_batch``); and
        if one of them may have dropped the worker's prepared statements, they are prepared
        again where they are next used."""
        assert self.session is not None
        connection: Any = self.session.get_bind()
        if not if_changed or db.session_changed(connection):
            db.send_with_next_statement(connection, RESET_SESSION, for_the_session=True)
        if if_changed and db.prepared_dropped(connection):  # its DEALLOCATE or DISCARD
            # prepared again, and planned afresh, where they are next used
            db.send_with_next_statement(connection, "DEALLOCATE ALL", for_the_session=True)
            connection.connection.info.pop(_PREPARED, None)

    def reset_after_batch(self) -> None:
        """With a batch's completion: undo what its tasks given the session may have left on
        it through the functions they called, which their statements do not show."""
        if self._used:
            self._used = False
            self.reset_session()

    def in_failed_transaction(self) -> bool:
        """Whether a statement failed in the hot-path connection's transaction, which
        PostgreSQL then refuses to go on with (until a rollback to a savepoint before it)."""
        assert self.session is not None
        dbapi = self.session.get_bind().connection.dbapi_connection  # type: ignore[union-attr]
        return dbapi.info.transaction_status == TRANSACTION_STATUS_INERROR

    def broken(self) -> bool:
        """Whether the hot-path connection is gone (the server dropped it, or it was closed,
        by a task for instance): what ran in its transaction is lost."""
        if self.session is None:
            return True
        connection = self.session.get_bind()
        try:
            return bool(
                connection.invalidated
                or connection.closed
                or connection.connection.dbapi_connection.closed  # type: ignore[union-attr]
            )
        except Exception:  # noqa: BLE001 - asking a dead connection may raise too
            return True

    def close(self) -> None:
        """Drop both connections (they may be broken already)."""
        if self.listener is not None:
            self.listener.close()
            self.listener = None
        if self.session is not None:
            connection = self.session.get_bind()
            with contextlib.suppress(Exception):  # the connection is already broken
                self.session.close()
            _drop(connection)  # type: ignore[arg-type]
            self.session = None

    def dispose(self) -> None:
        self.close()
        self._hot_engine.dispose()


def _drop(connection: Connection) -> None:
    """Close ``connection`` for good (it may be broken), giving its slot back to its pool."""
    with contextlib.suppress(Exception):
        connection.invalidate()
    with contextlib.suppress(Exception):
        connection.close()

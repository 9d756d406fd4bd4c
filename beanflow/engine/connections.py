"""A worker's own connections: the hot path's session, and the LISTEN connection."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

from psycopg2.extensions import TRANSACTION_STATUS_INERROR
from sqlalchemy import Integer, column, select
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session

from .. import db
from .notify import Listener
from .queries import Prepared, Queries
from .queries.tasks import COMPLETED

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
        self._claims: dict[str, tuple[Prepared, Any]] = {}
        self._completed = column(COMPLETED, Integer)
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

    def claim(self, size: int) -> Any:
        """The claim of up to ``size`` tasks, PREPAREd on this connection when first used;
        its rows are the task model's objects."""
        return self._prepared(f"beanflow_claim_{size}", partial(self.queries.claim_up_to, size))

    def complete_and_claim(self, size: int) -> Any:
        """``complete`` and the claim of up to ``size`` tasks in one statement, PREPAREd on
        this connection when first used; its rows are (a task model's object, or None when
        it claimed none; how many tasks it completed)."""
        return self._prepared(
            f"beanflow_complete_claim_{size}",
            partial(self.queries.complete_and_claim_up_to, size),
            self._completed,
        )

    def _prepared(self, name: str, build: Callable[[], Any], *extra: Any) -> Any:
        """A statement returning the task model's rows (after ``extra`` columns), read back as
        its objects; PREPAREd on this connection, planned by the caller's EXECUTE."""
        if name not in self._claims:
            prepared = Prepared(name, build(), *extra, *self.queries.task.c)
            self._claims[name] = (
                prepared,
                select(self.model, *extra).from_statement(prepared.execute),
            )
        prepared, statement = self._claims[name]
        assert self.session is not None
        prepare_once(self.session.connection(), prepared)
        return statement

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

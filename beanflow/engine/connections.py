"""A worker's own connections: the hot path's session, and the LISTEN connection."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterable
from typing import Any

from sqlalchemy import Integer, column, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from .. import db
from .notify import Listener
from .queries import Prepared, Queries

# for the rest of a transaction in which a hot statement gets its generic plan
NO_SEQUENTIAL_SCANS = "SET LOCAL enable_seqscan = off"


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
        # claims of each size used, read back as the task model's objects
        self._claims: dict[int, tuple[Prepared, Any]] = {}
        self._prepared_here: set[str] = set()  # on the current connection
        self._hot_engine = db.make_hot_path_engine(engine.url)
        self.session: Session | None = None
        self.listener: Listener | None = None

    def open(self) -> bool:
        """Connect unless connected; True when this made new connections."""
        if self.session is not None:
            return False
        connection = self._hot_engine.connect()
        # planned once for this connection: the statements' parameters never change the plan
        connection.exec_driver_sql("SET plan_cache_mode = force_generic_plan")
        self.complete.prepare(connection)
        # its generic plan is made by its first EXECUTE, now, while sequential scans are ruled
        # out: planned on a table that is still small (and never analyzed), the completion
        # would otherwise scan the whole table on every batch as it grows
        connection.exec_driver_sql(NO_SEQUENTIAL_SCANS)
        connection.execute(
            self.complete.execute, {"task_ids": [], "task_results": [], "worker": uuid.uuid4()}
        )
        self._prepared_here = {self.complete.name}
        connection.commit()
        self.session = Session(bind=connection, expire_on_commit=False, autoflush=True)
        self.listener = Listener(self.engine, self.channels)
        return True

    def claim(self, size: int) -> Any:
        """The claim of up to ``size`` tasks, PREPAREd on this connection when first used."""
        if size not in self._claims:
            claim = Prepared(
                f"beanflow_claim_{size}", self.queries.claim_up_to(size), *self.queries.task.c
            )
            self._claims[size] = (claim, select(self.model).from_statement(claim.execute))
        claim, statement = self._claims[size]
        if claim.name not in self._prepared_here:
            assert self.session is not None
            connection = self.session.connection()
            claim.prepare(connection)  # a session-level PREPARE: it stays
            # planned by its first EXECUTE, the caller's, in this transaction (see open())
            db.send_with_next_statement(connection, NO_SEQUENTIAL_SCANS)
            self._prepared_here.add(claim.name)
        return statement

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
                connection.invalidate()
                connection.close()
            self.session = None

    def dispose(self) -> None:
        self.close()
        self._hot_engine.dispose()

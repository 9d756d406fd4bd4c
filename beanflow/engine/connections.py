"""A worker's own connections: the hot path's session, and the LISTEN connection."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

from sqlalchemy import Integer, column, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from .. import db
from .notify import Listener
from .queries import Prepared, Queries


class WorkerConnections:
    """The hot path runs on a connection of its own, with its statements (claim, complete)
    PREPAREd on it and its savepoints sent with the next statement
    (``db.make_hot_path_engine``); the LISTEN connection is another. Both are opened
    together, and dropped together when either breaks."""

    def __init__(self, engine: Engine, channels: Iterable[str], queries: Queries, model: type):
        self.engine = engine
        self.channels = list(channels)
        self.claim = Prepared("beanflow_claim", queries.claim, *queries.task.c)
        self.complete = Prepared("beanflow_complete", queries.complete, column("count", Integer))
        # the claim, read back as the task model's objects
        self.claimed = select(model).from_statement(self.claim.execute)
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
        for prepared in (self.claim, self.complete):
            prepared.prepare(connection)
        connection.commit()
        self.session = Session(bind=connection, expire_on_commit=False, autoflush=True)
        self.listener = Listener(self.engine, self.channels)
        return True

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

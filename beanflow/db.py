"""Engine and session factory; picks the embedded server when no URL is configured."""

from __future__ import annotations

import re
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import URL, make_url

from . import embedded
from .config import Config
from .models.jsonb import read_json


def database_url(config: Config) -> str:
    """The configured URL with a psycopg2 driver, or the embedded server's URL."""
    if config.DATABASE_URL is None:
        return embedded.start(config.EMBEDDED_DIR)
    url = make_url(config.DATABASE_URL)
    # SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3; beanflow speaks psycopg2
    if url.drivername in ("postgresql", "postgres"):
        url = url.set(drivername="postgresql+psycopg2")
    return url.render_as_string(hide_password=False)


def make_engine(config: Config) -> Engine:
    """An engine for the configured database."""
    return create_engine(database_url(config), json_deserializer=read_json)


_QUEUED = "beanflow_queued_statements"
_QUEUED_FOR_SESSION = "beanflow_queued_session_statements"  # sent whenever the next one goes
_IN_FLIGHT = "beanflow_sent_with_a_statement"  # queued statements prefixed to the one running
_HOT_PATH = "beanflow_hot_path"  # an execution option of the hot-path engine's connections
_COMMITS = "beanflow_commits"  # how many transactions the hot-path connection has committed
_CHANGED = "beanflow_session_changed"  # a statement since watch_session() may have changed it
_UNPREPARED = "beanflow_prepared_dropped"  # … or dropped prepared statements or plans
# a statement that may change its session's state: a SET or RESET (settings, the role), or a
# call of set_config or of an advisory lock function
_MAY_CHANGE_SESSION = re.compile(r"(?:^|;)\s*(?:re)?set\b|set_config|advisory", re.IGNORECASE)
# one that may drop the session's prepared statements or their plans
_MAY_DROP_PREPARED = re.compile(r"(?:^|;)\s*(?:deallocate|discard)\b", re.IGNORECASE)


def on_hot_path(connection: Connection) -> bool:
    """Whether ``connection`` is a worker's hot-path connection (``make_hot_path_engine``)."""
    return bool(connection.get_execution_options().get(_HOT_PATH))


def send_with_next_statement(
    connection: Connection, statement: str, for_the_session: bool = False
) -> None:
    """Queue a statement whose result nobody reads (``SET LOCAL …``) to travel in the same
    round trip as the connection's next one. Dropped if the transaction ends first, unless it
    is ``for_the_session`` (a RESET, say: queued once however often it is asked for): then it
    goes with the next statement, whenever."""
    if not for_the_session:
        connection.connection.info.setdefault(_QUEUED, []).append(statement)
        return
    queued = connection.connection.info.setdefault(_QUEUED_FOR_SESSION, [])
    if statement not in queued:
        queued.append(statement)


def make_hot_path_engine(url: str | URL) -> Engine:
    """An engine for a worker's hot path, where savepoints cost no round trip of their own.

    A worker runs each task in a savepoint. Sent as they happen, SAVEPOINT and RELEASE would
    double the round trips of a batch of no-op tasks. Here they are queued and sent in front
    of the next statement that needs an answer (psycopg2 sends several statements in one
    query); a savepoint released or rolled back before any statement was sent inside it is
    simply dropped, since nothing ran in it. SQLAlchemy's own bookkeeping is unchanged.
    Code that bypasses SQLAlchemy (a raw DBAPI cursor) would not be inside the savepoint.
    """
    engine = create_engine(
        url,
        pool_size=1,
        max_overflow=0,
        execution_options={_HOT_PATH: True},
        json_deserializer=read_json,
    )
    dialect = engine.dialect
    roll_back_now = dialect.do_rollback_to_savepoint

    def queued(connection: Connection) -> list[str]:
        return connection.connection.info.setdefault(_QUEUED, [])

    def do_savepoint(connection: Connection, name: str) -> None:
        queued(connection).append(f"SAVEPOINT {quote(name)}")

    def do_release_savepoint(connection: Connection, name: str) -> None:
        statements, opening = queued(connection), f"SAVEPOINT {quote(name)}"
        if opening in statements:
            statements.remove(opening)  # nothing was sent inside it: it never has to exist
        else:
            statements.append(f"RELEASE SAVEPOINT {quote(name)}")

    def do_rollback_to_savepoint(connection: Connection, name: str) -> None:
        statements, opening = queued(connection), f"SAVEPOINT {quote(name)}"
        if opening in statements:
            del statements[statements.index(opening) :]  # all of it is inside the savepoint
        else:
            roll_back_now(connection, name)

    def quote(name: str) -> str:
        return dialect.identifier_preparer.quote(name)

    dialect.do_savepoint = do_savepoint  # type: ignore[method-assign]
    dialect.do_release_savepoint = do_release_savepoint  # type: ignore[method-assign]
    dialect.do_rollback_to_savepoint = do_rollback_to_savepoint  # type: ignore[method-assign]

    @event.listens_for(engine, "before_cursor_execute", retval=True)
    def send_queued(connection, cursor, statement, parameters, context, executemany):  # type: ignore[no-untyped-def]
        info = connection.connection.info
        if _MAY_CHANGE_SESSION.search(statement):
            info[_CHANGED] = True
        if _MAY_DROP_PREPARED.search(statement):
            info[_UNPREPARED] = True
        for_session, statements = info.pop(_QUEUED_FOR_SESSION, ()), info.pop(_QUEUED, ())
        if for_session or statements:
            prefix = "".join(f"{s}; " for s in (*for_session, *statements))
            if executemany:
                cursor.execute(prefix)
            else:
                statement = prefix + statement
                info[_IN_FLIGHT] = (for_session, statements)
        return statement, parameters

    @event.listens_for(engine, "after_cursor_execute")
    def sent(connection, cursor, statement, parameters, context, executemany):  # type: ignore[no-untyped-def]
        connection.connection.info.pop(_IN_FLIGHT, None)

    @event.listens_for(engine, "handle_error")
    def not_sent(context: Any) -> None:
        """A statement the driver refused before sending it (a parameter it cannot adapt):
        the statements queued in front of it were not sent either, and stay queued."""
        if context.connection is None or context.connection.invalidated:
            return
        info = context.connection.connection.info
        in_flight = info.pop(_IN_FLIGHT, None)
        if in_flight and getattr(context.original_exception, "pgcode", None) is None:
            for_session, statements = in_flight
            info.setdefault(_QUEUED_FOR_SESSION, [])[:0] = for_session
            queued(context.connection)[:0] = statements

    @event.listens_for(engine, "commit")
    @event.listens_for(engine, "rollback")
    def forget_queued(connection: Connection) -> None:
        connection.connection.info.pop(_QUEUED, None)

    @event.listens_for(engine, "commit")
    def count_commit(connection: Connection) -> None:
        info = connection.connection.info
        info[_COMMITS] = info.get(_COMMITS, 0) + 1

    return engine


def watch_session(connection: Connection) -> None:
    """From now on, note whether a statement sent on the hot-path ``connection`` may change
    its session's state: a SET or RESET, a call of ``set_config`` or of an advisory lock
    function (what a function of the user's does is not seen); or drop its prepared
    statements (DEALLOCATE, DISCARD)."""
    connection.connection.info[_CHANGED] = False
    connection.connection.info[_UNPREPARED] = False


def session_changed(connection: Connection) -> bool:
    """Whether a statement since ``watch_session`` may have changed the session's state."""
    return bool(connection.connection.info.get(_CHANGED, True))


def prepared_dropped(connection: Connection) -> bool:
    """Whether a statement since ``watch_session`` may have dropped prepared statements."""
    return bool(connection.connection.info.get(_UNPREPARED, False))


def commits(connection: Connection) -> int:
    """How many transactions the hot-path ``connection`` has committed."""
    return int(connection.connection.info.get(_COMMITS, 0))

"""LISTEN side of the wake-up: a dedicated connection that sleeps until a notify.

The NOTIFY side lives with the models (``beanflow.models.task.notify_channels``), because it
is emitted from the user's own session.
"""

from __future__ import annotations

import contextlib
import os
import select
from collections.abc import Iterable
from typing import Any

from psycopg2 import sql
from sqlalchemy.engine import Engine


class Listener:
    """A connection LISTENing on channels, outside the pool, in autocommit mode."""

    def __init__(self, engine: Engine, channels: Iterable[str]) -> None:
        self.channels = list(channels)
        # a new connection of its own, never one from the pool (which may be stale after a
        # server restart, and must not be handed out again once it LISTENs)
        arguments, keywords = engine.dialect.create_connect_args(engine.url)
        self.connection: Any = engine.dialect.loaded_dbapi.connect(*arguments, **keywords)
        try:
            self.connection.autocommit = True
            with self.connection.cursor() as cursor:
                for channel in self.channels:
                    # a quoted identifier: a channel name can never inject SQL
                    cursor.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
        except BaseException:
            self.close()  # not left open until the garbage collector finds it
            raise

    def wait(self, timeout: float, wake_fd: int | None = None) -> bool:
        """Sleep until a notify arrives, ``wake_fd`` is readable, or ``timeout`` seconds pass.

        Returns True when it was woken by a notify. A probe after a silent timeout finds a
        connection that died quietly (raises psycopg2.OperationalError, like any other loss).
        """
        readers = [self.connection] + ([wake_fd] if wake_fd is not None else [])
        ready, _, _ = select.select(readers, [], [], max(timeout, 0))
        if not ready:
            with self.connection.cursor() as cursor:
                cursor.execute("SELECT 1")
        return self.drain()

    def drain(self) -> bool:
        """Consume pending notifications; True if there were any."""
        self.connection.poll()
        woke = bool(self.connection.notifies)
        self.connection.notifies.clear()
        return woke

    def close(self) -> None:
        # closing a broken connection must not raise
        with contextlib.suppress(Exception):
            self.connection.close()


def drain_pipe(fd: int) -> None:
    """Empty a self-pipe (written to wake a select())."""
    os.set_blocking(fd, False)
    with contextlib.suppress(BlockingIOError):
        while os.read(fd, 4096):
            pass

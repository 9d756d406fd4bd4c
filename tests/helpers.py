"""Helpers for tests that run real worker processes and wait on database state."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

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


class Workers:
    """Worker processes started with ``python -m beanflow -a APP process CHANNEL…``."""

    def __init__(self, db_url: str, folder: Path) -> None:
        self.db_url = db_url
        self.folder = folder
        self.processes: list[subprocess.Popen] = []

    def start(
        self,
        *channels: str,
        app: str = "tests.workloads.app:app",
        burst: bool = False,
        **settings: object,
    ) -> subprocess.Popen:
        env = {key: value for key, value in os.environ.items() if not key.startswith("BEANFLOW_")}
        env.update({f"BEANFLOW_{key}": str(value) for key, value in settings.items()})
        env["BEANFLOW_DATABASE_URL"] = self.db_url
        env["PYTHONPATH"] = str(ROOT)
        log = open(self.folder / f"worker-{len(self.processes)}.log", "w")  # noqa: SIM115
        command = [sys.executable, "-m", "beanflow", "-a", app, "process", *channels]
        if burst:
            command.append("--burst")
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        process.log_path = log.name  # type: ignore[attr-defined]
        self.processes.append(process)
        return process

    @staticmethod
    def output(process: subprocess.Popen) -> str:
        return Path(process.log_path).read_text()  # type: ignore[attr-defined]

    def kill_all(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)
                process.wait()

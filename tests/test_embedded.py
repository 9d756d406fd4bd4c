"""The zero-setup default: an embedded server when no URL is configured, and only then."""

from __future__ import annotations

import subprocess

import psutil
import pytest

from .helpers import ROOT, run_python

# real processes: `pytest -m "not slow"` skips them in the inner loop
pytestmark = pytest.mark.slow


def run_quickstart(tmp_path, **env: str) -> subprocess.CompletedProcess:
    script = str(ROOT / "examples" / "quickstart" / "quickstart.py")
    return run_python(script, cwd=tmp_path, BEANFLOW_EMBEDDED_DIR=str(tmp_path / "state"), **env)


def servers_in(folder) -> list[psutil.Process]:
    return [
        p
        for p in psutil.process_iter(["name", "cmdline"])
        if p.info["name"] == "postgres" and str(folder) in " ".join(p.info["cmdline"] or [])
    ]


def test_quickstart_runs_on_the_embedded_server_and_stops_it(tmp_path):
    result = run_quickstart(tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("using the embedded PostgreSQL in") == 1
    rows = [line.split() for line in result.stdout.splitlines()[3:] if line.strip()]
    assert len(rows) == 4
    assert {row[1] for row in rows} == {"DONE"}
    assert sorted(row[2] for row in rows) == ["1", "1", "1", "2"]  # one task was retried
    parents = [row[3] for row in rows if row[3] != "-"]
    assert len(parents) == 1 and parents[0] in {row[0] for row in rows}  # one child task
    assert "failed, attempt 1" in result.stderr and ", next at " in result.stderr
    assert (tmp_path / "state" / "pgdata" / "PG_VERSION").exists()
    assert servers_in(tmp_path / "state") == []  # the last user stopped it


def test_a_configured_url_never_starts_the_embedded_server(tmp_path, db_url):
    result = run_quickstart(tmp_path, BEANFLOW_DATABASE_URL=db_url)
    assert result.returncode == 0, result.stderr
    assert "embedded" not in result.stderr
    assert not (tmp_path / "state").exists()

"""The operations' commands, run as a person would: in a folder with a beanflow.yaml, no
--config, against a real database."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import pytest

from .helpers import environment, run_python

SPEC = """\
version: 1
database: ${TEST_DB_URL}
processors:
  echo: {function: 'tests.workloads.app:echo', channel: work}
  boom: {function: 'tests.workloads.app:boom', channel: work}
"""


@pytest.fixture
def project(tmp_path, db_url):
    (tmp_path / "beanflow.yaml").write_text(textwrap.dedent(SPEC))

    def beanflow(*arguments: str, status: int = 0) -> str:
        result = run_python("-m", "beanflow", *arguments, cwd=tmp_path, TEST_DB_URL=db_url)
        assert result.returncode == status, result.stderr
        return result.stdout + result.stderr

    return beanflow


def test_submit_status_tasks_task_retry_cancel_purge(project, db_url):
    # submit reads ./beanflow.yaml by itself
    ok = project("submit", "work", "echo", "-k", '{"value": 1}').strip()
    bad = project("submit", "work", "boom", "-k", '{"message": "it broke"}').strip()
    later = project("submit", "work", "echo", "-k", '{"value": 2}', "--in", "1h").strip()
    ran = project("run", "--burst", status=3)  # a task failed
    assert "burst over: 1 done, 1 failed, 0 cancelled, 0 retried, 1 pending" in ran

    status = json.loads(project("status", "--json"))
    (work,) = status["channels"]
    assert (work["channel"], work["scheduled"], work["done_last_hour"]) == ("work", 1, 1)
    assert work["failed_last_hour"] == 1
    assert "work" in project("status")  # the tables, plain when not a terminal
    assert "ValueError: it broke" in ran and "Traceback" in ran  # a failure for good

    failed = json.loads(project("tasks", "--state", "failed", "--json"))["tasks"]
    assert [t["id"] for t in failed] == [bad]
    page = json.loads(project("tasks", "--limit", "2", "--json"))
    assert len(page["tasks"]) == 2 and page["next"]
    rest = json.loads(project("tasks", "--limit", "2", "--after", page["next"], "--json"))
    assert {t["id"] for t in page["tasks"] + rest["tasks"]} == {ok, bad, later}

    shown = project("task", bad)
    assert "ValueError: it broke" in shown and "Traceback (most recent call last)" in shown
    detail = json.loads(project("task", bad, "--json"))
    assert [e["type"] for e in detail["events"]] == ["CLAIMED", "FAILED"]

    assert project("retry", bad).strip() == "1 task(s) retried"
    assert json.loads(project("task", bad, "--json"))["task"]["state"] == "PENDING"
    assert "1 pending task(s) cancelled" in project("cancel", later)
    assert json.loads(project("task", later, "--json"))["task"]["state"] == "CANCELLED"
    assert project("retry", "--cancelled", "--channel", "work").strip() == "1 task(s) retried"

    assert project("db", "url").strip().endswith(db_url.rsplit("/", 1)[1])

    deleted = project("purge", "--older-than", "0s", "--state", "done")
    assert "1 tasks done" in deleted
    assert json.loads(project("tasks", "--state", "done", "--json"))["tasks"] == []


def test_bad_arguments_are_named(tmp_path, db_url):
    (tmp_path / "beanflow.yaml").write_text(textwrap.dedent(SPEC))

    def fails(*arguments: str) -> str:
        result = run_python("-m", "beanflow", *arguments, cwd=tmp_path, TEST_DB_URL=db_url)
        assert result.returncode != 0
        return result.stderr

    assert "'nope' is not a task id" in fails("task", "nope")
    assert "give task ids, or filters" in fails("retry")
    assert "--since 'yesterday'" in fails("tasks", "--since", "yesterday")


@pytest.mark.skipif(shutil.which("psql") is None, reason="psql is not installed")
def test_db_shell_opens_psql_on_the_database(tmp_path, db_url):
    (tmp_path / "beanflow.yaml").write_text(textwrap.dedent(SPEC))
    result = subprocess.run(
        [sys.executable, "-m", "beanflow", "db", "shell"],
        cwd=tmp_path,
        env=environment(TEST_DB_URL=db_url),
        input="SELECT count(*) AS beanflow_tables FROM pg_tables "
        "WHERE tablename LIKE 'beanflow_%';\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "beanflow_tables" in result.stdout and " 9\n" in result.stdout

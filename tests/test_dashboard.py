"""The dashboard over HTTP (Starlette's test client, a real database): what each page shows,
what each action does, and what it refuses. The browser tests are in test_dashboard_browser."""

from __future__ import annotations

import base64
import re
import uuid

import pytest
from sqlalchemy import func, select
from starlette.applications import Starlette
from starlette.routing import Mount
from starlette.testclient import TestClient

import beanflow as bq
from beanflow import ops
from beanflow.dashboard import DashboardSettings
from beanflow.dashboard.web import create_app
from beanflow.errors import BeanflowError
from beanflow.models import EventType, TaskState


@pytest.fixture
def echo(app):
    @app.processor(channel="web")
    def echo(value: object = 0) -> object:
        return value

    return echo


def client_for(app, **settings) -> TestClient:
    return TestClient(create_app(ops.Operations(app), DashboardSettings(**settings)))


@pytest.fixture
def client(app):
    return client_for(app)


def csrf(client: TestClient, path: str = "/") -> str:
    """The CSRF token a page's forms carry (and its cookie, now in the client)."""
    page = client.get(path)
    return re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)


def finish(session, task, state: TaskState, error: str | None = None) -> None:
    task.state, task.error_message = state, error
    task.started_at = task.finished_at = session.scalar(select(func.now()))
    session.commit()


def test_every_page_answers(client, session, echo):
    task = bq.enqueue(session, echo, value=1)
    session.commit()
    for path in ("/", "/tasks", f"/tasks/{task.id}", "/workers", "/schedules"):
        page = client.get(path)
        assert page.status_code == 200, (path, page.text)
        assert "<title>" in page.text and "beanflow" in page.text
    assert client.get("/static/dashboard.css").status_code == 200
    assert client.get("/static/dashboard.js").status_code == 200


def test_overview_counts_and_throughput(client, session, echo):
    done = bq.enqueue(session, echo, value=1)
    failed = bq.enqueue(session, echo, value=2)
    bq.enqueue(session, echo, value=3)
    session.commit()
    finish(session, done, TaskState.DONE)
    finish(session, failed, TaskState.FAILED, "E: no")
    page = client.get("/").text
    row = re.search(r'<tr data-channel="web">.*?</tr>', page, re.S)
    cells = re.findall(r'<td class="n[^"]*"[^>]*>(?:<a[^>]*>)?([^<]*)', row.group(0))
    # due, scheduled, running, oldest due, done 1h, failed 1h, cancelled 1h
    assert cells[0] == "1" and cells[1:3] == ["0", "0"] and cells[4:] == ["1", "1", "0"]
    assert "1 done</span>" in page and "1 failed</span>" in page  # the chart's title


def test_tasks_filter_and_page(client, session, echo):
    tasks = [bq.enqueue(session, echo, value=n) for n in range(60)]
    session.commit()
    finish(session, tasks[0], TaskState.FAILED, "KeyError: 'sku-42' missing")
    first = client.get("/tasks").text
    assert first.count('class="mono" href="/tasks/') == ops.PAGE
    following = re.search(r'href="(\?after=[^"]+)" id="next-page"', first).group(1)
    second = client.get("/tasks" + following.replace("&amp;", "&")).text
    assert second.count('class="mono" href="/tasks/') == 10
    found = client.get("/tasks", params={"state": "FAILED", "error": "sku-42"}).text
    assert found.count('class="mono" href="/tasks/') == 1 and str(tasks[0].id) in found
    none = client.get("/tasks", params={"channel": "elsewhere", "since": "1h"}).text
    assert "No task matches." in none


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"state": "SLEEPING"}, "bad filter: &#39;SLEEPING&#39; is not a valid TaskState"),
        ({"since": "yesterday"}, "bad filter: &#39;yesterday&#39; is neither a duration"),
        ({"parent": "42"}, "bad filter: badly formed hexadecimal UUID string"),
        ({"channel": "a\x00b"}, "bad filter: channel: text with the NUL character matches no"),
        ({"error": "\x00"}, "bad filter: error: text with the NUL character matches no task"),
        ({"since": "999999999d"}, "bad filter: &#34;999999999d&#34; is longer than 100 years"),
        ({"after": "nonsense"}, "not a page cursor: &#39;nonsense&#39;"),
    ],
)
def test_a_bad_filter_is_a_400_naming_it(client, params, message):
    page = client.get("/tasks", params=params)
    assert page.status_code == 400 and message in page.text


def test_an_unknown_task_is_a_404(client):
    assert client.get(f"/tasks/{uuid.uuid4()}").status_code == 404
    assert "is not a task id" in client.get("/tasks/not-an-id").text


def test_what_a_task_holds_is_shown_as_text(client, session, echo):
    attack = "<script>window.hacked = 1</script><img src=x onerror=alert(1)>"
    task = bq.enqueue(session, echo, value=attack)
    session.commit()
    finish(session, task, TaskState.FAILED, attack)
    for path in (f"/tasks/{task.id}", "/tasks"):
        page = client.get(path).text
        assert "<script>window.hacked" not in page and "<img src=x" not in page
        assert "&lt;script&gt;window.hacked = 1&lt;/script&gt;" in page


def test_retry_and_cancel_from_a_task_page(client, session, echo, app):
    failed = bq.enqueue(session, echo, value=1)
    pending = bq.enqueue(session, echo, value=2)
    session.commit()
    finish(session, failed, TaskState.FAILED, "E: no")
    token = csrf(client, f"/tasks/{failed.id}")
    answer = client.post(f"/tasks/{failed.id}/retry", data={"csrf": token}, follow_redirects=False)
    assert answer.status_code == 303 and "1+task+retried" in answer.headers["location"]
    answer = client.post(f"/tasks/{pending.id}/cancel", data={"csrf": token})
    assert "1 pending task(s) cancelled" in answer.text  # the page it is sent back to
    session.expire_all()
    assert session.get(bq.Task, failed.id).state == TaskState.PENDING
    assert session.get(bq.Task, pending.id).state == TaskState.CANCELLED
    events = [e.type for e in session.get(bq.Task, failed.id).events]
    assert events[-1] == EventType.RETRIED


def test_bulk_retry_of_the_failed_tasks_matching_a_filter(client, session, echo):
    tasks = [bq.enqueue(session, echo, value=n) for n in range(5)]
    session.commit()
    for task in tasks[:3]:
        finish(session, task, TaskState.FAILED, "E: no")
    page = client.get("/tasks", params={"state": "FAILED", "channel": "web"}).text
    assert 'id="retry-matching"' in page
    token = re.search(r'name="csrf" value="([^"]+)"', page).group(1)
    answer = client.post("/tasks/retry", data={"csrf": token, "state": "FAILED", "channel": "web"})
    assert "3 task(s) retried" in answer.text
    session.expire_all()
    states = session.scalars(select(bq.Task.state)).all()
    assert states.count(TaskState.PENDING) == 5


def test_purge_deletes_finished_tasks_older_than_asked(client, session, echo):
    old, fresh = bq.enqueue(session, echo, value=1), bq.enqueue(session, echo, value=2)
    session.commit()
    finish(session, old, TaskState.DONE)
    finish(session, fresh, TaskState.DONE)
    old.finished_at = old.finished_at - ops.timedelta(days=8)
    session.commit()
    token = csrf(client)
    answer = client.post("/purge", data={"csrf": token, "older_than": "7d", "state": "DONE"})
    assert "purged: 1 tasks done" in answer.text
    assert session.scalars(select(bq.Task.id)).all() == [fresh.id]
    answer = client.post("/purge", data={"csrf": token, "older_than": "soon", "state": "DONE"})
    assert answer.status_code == 400 and "older than:" in answer.text


def test_an_action_without_the_page_token_is_refused(client, session, echo, app):
    task = bq.enqueue(session, echo, value=1)
    session.commit()
    token = csrf(client)  # the client has the cookie, the forged forms have no token
    for data in ({}, {"csrf": "forged"}):
        answer = client.post(f"/tasks/{task.id}/cancel", data=data)
        assert answer.status_code == 403 and "CSRF" in answer.text
    stranger = client_for(app)  # another site's form: the token, but not our cookie
    assert stranger.post(f"/tasks/{task.id}/cancel", data={"csrf": token}).status_code == 403
    session.expire_all()
    assert session.get(bq.Task, task.id).state == TaskState.PENDING


def test_read_only_hides_and_refuses_actions(app, session, echo):
    client = client_for(app, read_only=True)
    task = bq.enqueue(session, echo, value=1)
    session.commit()
    finish(session, task, TaskState.FAILED, "E: no")
    page = client.get(f"/tasks/{task.id}").text
    assert 'id="read-only"' in page and 'id="retry"' not in page
    assert '<form method="post"' not in page
    assert 'id="purge-form"' not in client.get("/").text
    answer = client.post(f"/tasks/{task.id}/retry", data={"csrf": "x"})
    assert answer.status_code == 403 and "read-only" in answer.text
    session.expire_all()
    assert session.get(bq.Task, task.id).state == TaskState.FAILED


def test_a_token_is_asked_of_every_request(app):
    client = client_for(app, token="s3cret")
    refused = client.get("/")
    assert refused.status_code == 401 and refused.headers["www-authenticate"].startswith("Basic")
    assert client.get("/static/dashboard.css").status_code == 401
    wrong = base64.b64encode(b"me:wrong").decode()
    assert client.get("/", headers={"Authorization": f"Basic {wrong}"}).status_code == 401
    right = base64.b64encode(b"anyone:s3cret").decode()
    assert client.get("/", headers={"Authorization": f"Basic {right}"}).status_code == 200
    assert client.get("/", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert client.get("/", headers={"Authorization": "Basic !!!"}).status_code == 401


def test_listening_beyond_the_loopback_needs_a_token():
    DashboardSettings(host="127.0.0.1").check()
    DashboardSettings(host="0.0.0.0", token="s3cret").check()
    with pytest.raises(BeanflowError, match="refusing to serve the dashboard on 0.0.0.0"):
        DashboardSettings(host="0.0.0.0").check()


def test_mounted_under_a_prefix_its_links_and_redirects_keep_it(app, session, echo):
    task = bq.enqueue(session, echo, value=1)
    session.commit()
    outer = Starlette(routes=[Mount("/queue", create_app(ops.Operations(app)))])
    client = TestClient(outer)
    page = client.get("/queue/tasks").text
    assert f'href="/queue/tasks/{task.id}"' in page and 'href="/queue/static/dashboard.css"' in page
    token = re.search(r'name="csrf" value="([^"]+)"', client.get("/queue/").text).group(1)
    answer = client.post(
        f"/queue/tasks/{task.id}/cancel", data={"csrf": token}, follow_redirects=False
    )
    assert answer.headers["location"].startswith(f"/queue/tasks/{task.id}?notice=")


def test_a_database_that_does_not_answer_is_a_503_page():
    config = bq.Config(env={}, DATABASE_URL="postgresql://postgres@127.0.0.1:1/none")
    client = client_for(bq.BeanQueue(config))
    page = client.get("/")
    assert page.status_code == 503 and "the database did not answer" in page.text


def test_the_file_declares_the_dashboard_and_a_public_one_needs_its_token(tmp_path, monkeypatch):
    from beanflow import spec

    path = tmp_path / "beanflow.yaml"
    path.write_text(
        "version: 1\ndatabase: postgresql://u@db.example/x\n"
        "dashboard: {host: 0.0.0.0, port: 9000}\n"
    )
    monkeypatch.delenv("BEANFLOW_DASHBOARD_TOKEN", raising=False)
    deployment, problems = spec.check(path)
    assert [str(p).removeprefix(f"{path}:") for p in problems] == [
        "3:13: dashboard.host: refusing to serve the dashboard on 0.0.0.0 without "
        "authentication: set BEANFLOW_DASHBOARD_TOKEN (or dashboard: token: in beanflow.yaml), "
        "or bind 127.0.0.1"
    ]
    monkeypatch.setenv("BEANFLOW_DASHBOARD_TOKEN", "s3cret")
    deployment, problems = spec.check(path)
    assert problems == []
    assert deployment.dashboard == DashboardSettings("0.0.0.0", 9000, False, "s3cret")
    path.write_text(
        "version: 1\ndatabase: postgresql://u@db.example/x\n"
        "dashboard: {read_only: true, token: '${MY_TOKEN}'}\n"
    )
    monkeypatch.setenv("MY_TOKEN", "t0ken")
    deployment, problems = spec.check(path)
    assert deployment.dashboard == DashboardSettings(read_only=True, token="t0ken")

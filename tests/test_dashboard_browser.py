"""The dashboard in a real browser: Debian's Chromium driven by Playwright, against the real
``beanflow dashboard`` command, real worker processes and a real database.

Chromium comes from the system (``apt-get install chromium``; ``.ci/run`` installs it) or
BEANFLOW_CHROMIUM; a run without it fails saying so. Each page's screenshot is saved in
BEANFLOW_SCREENSHOTS (default ``.screenshots/``); ``BEANFLOW_SCREENSHOTS=docs/images`` refreshes
the README's pictures.
"""

from __future__ import annotations

import os
import signal
import socket
import textwrap
import urllib.error
import urllib.request
from pathlib import Path

import pytest

import beanflow as bq
from beanflow.models import TaskState
from tests.workloads import app as workloads

from .helpers import ROOT, Processes, beanflow, wait_for

pytestmark = pytest.mark.slow

CHROMIUM = os.environ.get("BEANFLOW_CHROMIUM", "/usr/bin/chromium")
SCREENSHOTS = Path(os.environ.get("BEANFLOW_SCREENSHOTS", ROOT / ".screenshots"))

SPEC = """\
version: 1
database: ${TEST_DB_URL}
processors:
  echo: {function: 'tests.workloads.app:echo', channel: work}
  boom: {function: 'tests.workloads.app:boom', channel: work}
schedules:
  nightly_report: {processor: echo, cron: '0 3 * * *', timezone: Europe/Paris, kwargs: {value: 1}}
"""


@pytest.fixture(scope="session")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail(
            f"no Chromium at {CHROMIUM}: install Debian's package (apt-get install chromium) "
            "or set BEANFLOW_CHROMIUM to a Chromium executable"
        )
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


class Watched:
    """A browser page and what it said: console errors, uncaught exceptions, dialogs."""

    def __init__(self, browser, **options) -> None:
        self.context = browser.new_context(viewport={"width": 1280, "height": 860}, **options)
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.dialogs: list[str] = []
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        self.page.on("pageerror", lambda error: self.errors.append(str(error)))
        self.page.on("dialog", self._dialog)

    def _dialog(self, dialog) -> None:
        self.dialogs.append(dialog.message)
        dialog.accept()  # a confirm() before an action: yes

    def shot(self, name: str) -> None:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=SCREENSHOTS / f"dashboard-{name}.png", full_page=True)


@pytest.fixture
def watched(browser):
    opened: list[Watched] = []

    def open_page(**options) -> Watched:
        opened.append(Watched(browser, **options))
        return opened[-1]

    yield open_page
    for one in opened:
        one.context.close()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def answers(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=2)
    except urllib.error.HTTPError:
        return True  # it answered, if only to refuse
    except OSError:
        return False
    return True


@pytest.fixture
def project(tmp_path, db_url):
    spec = tmp_path / "beanflow.yaml"
    spec.write_text(textwrap.dedent(SPEC))
    processes = Processes(tmp_path, TEST_DB_URL=db_url)

    class Project:
        file = spec

        def dashboard(self, *options: str, file: str | Path = spec, **env: str) -> str:
            """Start ``beanflow dashboard`` and return its URL once it answers."""
            port = free_port()
            process = processes.start("dashboard", str(file), "--port", str(port), *options, **env)
            url = f"http://127.0.0.1:{port}"
            wait_for(lambda: answers(url + "/") or process.poll() is not None, "the dashboard")
            assert process.poll() is None, processes.output(process)
            return url

        def worker(self):
            return processes.start(
                "-a", "tests.workloads.app:app", "process", "work", BEANFLOW_DATABASE_URL=db_url
            )

        start = processes.start

    yield Project()
    processes.kill_all()


def state_of(session, task) -> TaskState:
    session.expire_all()
    return session.get(bq.Task, task.id).state


def test_every_page_loads_without_errors_and_refreshes_live(project, watched, session, tmp_path):
    for n in range(40):
        bq.enqueue(session, workloads.echo, value={"order": n, "sku": f"SKU-{n:03}"})
    failed = [
        bq.enqueue(session, workloads.boom, message=f"payment gateway said no (order {n})")
        for n in range(3)
    ]
    session.commit()
    project.worker()
    wait_for(lambda: state_of(session, failed[-1]) == TaskState.FAILED, "the failures")
    running = bq.enqueue(session, workloads.slow_once, flag=str(tmp_path / "running"))
    session.commit()
    wait_for((tmp_path / "running").exists, "a task to be running")
    url = project.dashboard()
    browser = watched()
    page = browser.page
    for name, path in [
        ("overview", "/"),
        ("tasks", "/tasks"),
        ("task", f"/tasks/{failed[0].id}"),
        ("running-task", f"/tasks/{running.id}"),
        ("workers", "/workers"),
        ("schedules", "/schedules"),
    ]:
        assert page.goto(url + path).status == 200, path
        page.wait_for_load_state("networkidle")
        browser.shot(name)
    assert "nightly_report" in page.inner_text("#schedule-list")
    page.goto(url + "/workers")
    assert "alive" in page.inner_text("#worker-list") and "slow_once" in page.inner_text(
        "#worker-list"
    )

    # the overview's numbers change without a reload: the page stays the same document
    page.goto(url + "/")
    page.evaluate("window.sameDocument = true")
    bq.enqueue(session, workloads.echo, value="later")
    session.commit()
    due = "tr[data-channel=work] [data-count=due]"
    assert page.inner_text(due) == "0"  # its worker is busy with the running task
    page.wait_for_function(f"document.querySelector({due!r}).innerText === '1'", timeout=30_000)
    assert page.evaluate("window.sameDocument") is True
    assert browser.errors == []


def test_a_failed_task_shows_its_traceback_and_retry_makes_it_done(
    project, watched, session, tmp_path
):
    task = bq.enqueue(session, workloads.fails_once, flag=str(tmp_path / "failed-once"))
    session.commit()
    project.worker()
    wait_for(lambda: state_of(session, task) == TaskState.FAILED, "the first run to fail")
    browser = watched()
    page = browser.page
    page.goto(project.dashboard() + f"/tasks/{task.id}")
    traceback = page.locator("pre.traceback")
    assert traceback.is_visible()
    assert "RuntimeError: the first run fails" in traceback.inner_text()
    assert "Traceback (most recent call last)" in traceback.inner_text()
    page.click("#retry")
    assert "1 task retried" in page.inner_text(".notice")
    wait_for(lambda: state_of(session, task) == TaskState.DONE, "the retried task to run")
    page.wait_for_selector("#task-state .state-done", timeout=30_000)  # a live refresh
    page.reload()
    assert page.inner_text("#task-result") == '"ran again"'
    assert browser.errors == []


def test_cancel_stops_a_running_task(project, watched, session, tmp_path):
    flag = tmp_path / "started"
    task = bq.enqueue(session, workloads.slow_once, flag=str(flag))
    session.commit()
    project.worker()
    wait_for(flag.exists, "the task to start")
    browser = watched()
    page = browser.page
    page.goto(project.dashboard() + f"/tasks/{task.id}")
    assert "PROCESSING" in page.inner_text("#task-state")
    page.click("#cancel")
    assert browser.dialogs == ["Cancel this task?"]
    wait_for(lambda: state_of(session, task) == TaskState.CANCELLED, "the task to stop")
    page.wait_for_selector("#task-state .state-cancelled", timeout=30_000)
    assert "cancelled by" in page.inner_text("#task-error")
    assert browser.errors == []


def test_a_script_in_a_task_is_shown_not_run(project, watched, session):
    script = "<script>window.hacked = 1; alert('kwargs')</script>"
    image = "<img src=x onerror=\"window.hacked = 2; alert('error')\">"
    shown = bq.enqueue(session, workloads.echo, value=script)
    failed = bq.enqueue(session, workloads.boom, message=image)
    session.commit()
    project.worker()
    wait_for(lambda: state_of(session, failed) == TaskState.FAILED, "the failure")
    url = project.dashboard()
    browser = watched()
    page = browser.page
    for path in ("/tasks", f"/tasks/{shown.id}", f"/tasks/{failed.id}", "/tasks?error=onerror"):
        page.goto(url + path)
        page.wait_for_load_state("networkidle")
        assert page.evaluate("window.hacked") is None, path
    page.goto(url + f"/tasks/{shown.id}")
    assert script in page.inner_text("#task-kwargs")
    page.goto(url + f"/tasks/{failed.id}")
    assert image in page.inner_text("#task-error")
    assert browser.dialogs == [] and browser.errors == []


def test_read_only_refuses_an_action(project, watched, session, tmp_path):
    task = bq.enqueue(session, workloads.boom, message="no")
    session.commit()
    project.worker()
    wait_for(lambda: state_of(session, task) == TaskState.FAILED, "the failure")
    url = project.dashboard("--read-only")
    browser = watched()
    page = browser.page
    page.goto(url + f"/tasks/{task.id}")
    assert page.is_visible("#read-only") and page.locator("#retry").count() == 0
    # the browser posts the action anyway (with its cookie): refused, nothing changes
    refused = page.request.post(url + f"/tasks/{task.id}/retry", form={"csrf": "x"})
    assert refused.status == 403 and "read-only" in refused.text()
    assert state_of(session, task) == TaskState.FAILED


def test_a_non_local_bind_needs_a_token_and_the_browser_gives_it(project, watched, db_url):
    refused = beanflow("dashboard", str(project.file), "--host", "0.0.0.0", TEST_DB_URL=db_url)
    assert refused.returncode == 2
    assert "refusing to serve the dashboard on 0.0.0.0 without authentication" in refused.stderr
    url = project.dashboard("--host", "0.0.0.0", BEANFLOW_DASHBOARD_TOKEN="s3cret")
    assert watched().page.request.get(url + "/").status == 401  # no credentials
    let_in = watched(http_credentials={"username": "oncall", "password": "s3cret"})
    assert let_in.page.goto(url + "/").status == 200
    assert let_in.errors == []


def test_beanflow_run_serves_the_dashboard_its_file_declares(project, tmp_path, db_url):
    port = free_port()
    with project.file.open("a") as spec:
        spec.write(f"dashboard: {{port: {port}, read_only: true}}\n")
    process = project.start("run", str(project.file))
    wait_for(lambda: answers(f"http://127.0.0.1:{port}/"), "the dashboard of beanflow run")
    page = urllib.request.urlopen(f"http://127.0.0.1:{port}/workers").read().decode()
    assert 'id="read-only"' in page
    process.send_signal(signal.SIGTERM)
    assert process.wait(60) == 0


def test_a_run_page_draws_its_graph_and_resumes_a_failed_run(project, watched, db_url, tmp_path):
    from beanflow import spec
    from tests.workloads.flows import FlowBase

    os.environ["TEST_DB_URL"] = db_url
    try:
        flows = spec.load("tests/workloads/flows.yaml", default=False)
    finally:
        del os.environ["TEST_DB_URL"]
    FlowBase.metadata.create_all(flows.app.engine)
    flag = tmp_path / "ready"
    with flows.app.session_factory() as session:
        done = flows.workflows.start(session, "onboard", {"user_id": 8, "emails": 3}).id
        failed = flows.workflows.start(session, "resumable", {"flag": str(flag)}).id
        session.commit()
    assert flows.app.process_tasks(["flows"], burst=True) == 0
    url = project.dashboard(file="tests/workloads/flows.yaml")
    browser = watched()
    page = browser.page
    page.goto(url + f"/runs/{done}")
    assert page.locator("svg.graph g.step").count() == 6  # five steps and on_failure
    assert page.locator("svg.graph .tone-done").count() == 5
    browser.shot("run")
    page.goto(url + "/runs")
    browser.shot("runs")
    page.goto(url + f"/runs/{failed}")
    assert "RuntimeError: not yet" in page.inner_text("#run-error")
    flag.write_text("now")
    page.click("#retry-run")
    assert "run resumed" in page.inner_text(".notice")
    assert flows.app.process_tasks(["flows"], burst=True) == 0
    page.wait_for_selector("#run-state .state-done", timeout=30_000)  # a live refresh
    assert browser.errors == []
    flows.app.engine.dispose()

"""The dashboard's pages and actions (Starlette, Jinja2 templates autoescaped)."""

from __future__ import annotations

import base64
import binascii
import json
import logging
import secrets
import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import jinja2
from sqlalchemy.exc import OperationalError
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import URL, FormData
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from ..config import parse_duration
from ..errors import BeanflowError
from ..models import FINAL_STATES, RunState, TaskState
from ..ops import Operations, Retention, TaskFilter, Throughput, format_age, operator, parse_moment
from ..workflows import RunDetail, Workflow, WorkflowError, Workflows, step_state
from . import DashboardSettings

logger = logging.getLogger(__name__)

HERE = Path(__file__).parent
CSRF_COOKIE = "beanflow_csrf"
REFRESH_SECONDS = 5  # how often a page refreshes its live parts (paused while hidden)


def create_app(
    ops: Operations,
    settings: DashboardSettings | None = None,
    workflows: Workflows | None = None,
) -> Starlette:
    """The dashboard's ASGI application over ``ops`` (and a deployment's ``workflows``)."""
    settings = settings or DashboardSettings()
    pages = _Pages(ops, settings, workflows)
    routes = [
        Route("/", pages.overview),
        Route("/tasks", pages.tasks),
        Route("/tasks/retry", pages.retry_matching, methods=["POST"]),
        Route("/tasks/{task_id}", pages.task),
        Route("/tasks/{task_id}/retry", pages.retry, methods=["POST"]),
        Route("/tasks/{task_id}/cancel", pages.cancel, methods=["POST"]),
        Route("/workers", pages.workers),
        Route("/schedules", pages.schedules),
        Route("/runs", pages.runs),
        Route("/runs/{run_id}", pages.run),
        Route("/runs/{run_id}/cancel", pages.cancel_run, methods=["POST"]),
        Route("/runs/{run_id}/retry", pages.retry_run, methods=["POST"]),
        Route("/purge", pages.purge, methods=["POST"]),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    middleware = [Middleware(BaseHTTPMiddleware, dispatch=_Guard(settings))]
    return Starlette(
        routes=routes,
        middleware=middleware,
        exception_handlers={
            HTTPException: pages.error,
            OperationalError: pages.database_error,
        },
    )


class _Guard:
    """Authentication (when a token is set) and the CSRF cookie of every page."""

    def __init__(self, settings: DashboardSettings) -> None:
        self.token = settings.token

    async def __call__(
        self, request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        if self.token and not self._authenticated(request):
            return PlainTextResponse(
                "authentication required",
                status_code=401,
                headers={"WWW-Authenticate": 'Basic realm="beanflow"'},
            )
        given = request.cookies.get(CSRF_COOKIE)
        request.state.csrf = given or secrets.token_urlsafe(24)
        response = await call_next(request)
        if not given:
            response.set_cookie(
                CSRF_COOKIE, request.state.csrf, httponly=True, samesite="strict", path="/"
            )
        return response

    def _authenticated(self, request: Request) -> bool:
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer":
            return secrets.compare_digest(value.strip().encode(), self.token.encode())
        if scheme.lower() == "basic":
            try:
                _, _, password = base64.b64decode(value).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):
                return False
            return secrets.compare_digest(password.encode(), self.token.encode())
        return False


class _Pages:
    """The pages and actions; each runs its database work on Starlette's thread pool."""

    def __init__(
        self, ops: Operations, settings: DashboardSettings, workflows: Workflows | None
    ) -> None:
        self.ops, self.settings, self.workflows = ops, settings, workflows
        environment = jinja2.Environment(
            loader=jinja2.FileSystemLoader(HERE / "templates"),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
        )
        environment.filters.update(age=format_age, when=_when, pretty=_pretty, short=_short)
        environment.globals.update(refresh_seconds=REFRESH_SECONDS)
        self.templates = Jinja2Templates(env=environment)

    def render(self, request: Request, name: str, status: int = 200, **context: Any) -> Response:
        context |= {
            "base": request.scope.get("root_path", ""),  # where the dashboard is mounted
            "read_only": self.settings.read_only,
            "csrf": request.state.csrf,
            "notice": request.query_params.get("notice"),
        }
        return self.templates.TemplateResponse(request, name, context, status_code=status)

    def _read(self, work: Callable[[Any], Any]) -> Awaitable[Any]:
        def run() -> Any:
            with self.ops.app.session_factory() as session:
                return work(session)

        return run_in_threadpool(run)

    def _act(self, work: Callable[[Any], Any]) -> Awaitable[Any]:
        def run() -> Any:
            with self.ops.app.session_factory() as session:
                done = work(session)
                session.commit()
                return done

        return run_in_threadpool(run)

    async def _form(self, request: Request) -> FormData:
        """The action's form, once the request may act: not read-only, the page's token."""
        if self.settings.read_only:
            raise HTTPException(403, "this dashboard is read-only")
        form = await request.form()
        cookie = request.cookies.get(CSRF_COOKIE, "")
        given = str(form.get("csrf", ""))
        if not cookie or not secrets.compare_digest(given.encode(), cookie.encode()):
            raise HTTPException(403, "the form's CSRF token is missing or stale: reload the page")
        return form

    # ---- pages -----------------------------------------------------------------------------

    async def overview(self, request: Request) -> Response:
        def read(session: Any) -> dict[str, Any]:
            return {
                "counts": self.ops.counts(session),
                "throughput": self.ops.throughput(session),
                "workers": self.ops.workers(session, gone=0),
            }

        found = await self._read(read)
        chart = _chart(found["throughput"])
        return self.render(request, "overview.html", chart=chart, **found)

    async def tasks(self, request: Request) -> Response:
        where = _filter(request.query_params)
        after = request.query_params.get("after") or None
        try:
            page = await self._read(lambda session: self.ops.tasks(session, where, after))
        except BeanflowError as error:
            raise HTTPException(400, str(error)) from None
        given = {key: value for key, value in request.query_params.items() if key != "after"}
        next_url = "?" + urlencode(given | {"after": page.next}) if page.next else None
        return self.render(
            request,
            "tasks.html",
            page=page,
            where=where,
            query=request.query_params,
            states=[s.value for s in TaskState],
            next_url=next_url,
            first_url="?" + urlencode(given) if after else None,
            retryable=where.state in (TaskState.FAILED, TaskState.CANCELLED),
        )

    async def task(self, request: Request) -> Response:
        task_id = _task_id(request.path_params["task_id"])
        detail = await self._read(lambda session: self.ops.task(session, task_id))
        if detail is None:
            raise HTTPException(404, f"no task {task_id}")
        task = detail.task
        return self.render(
            request,
            "task.html",
            detail=detail,
            task=task,
            final=task.state in FINAL_STATES,
            retryable=task.state in (TaskState.FAILED, TaskState.CANCELLED),
            timings=_timings(task),
            opened=max((i for i, e in enumerate(detail.events) if e.traceback), default=None),
        )

    async def workers(self, request: Request) -> Response:
        found = await self._read(lambda session: self.ops.workers(session, gone=50))
        return self.render(request, "workers.html", workers=found)

    async def schedules(self, request: Request) -> Response:
        found = await self._read(self.ops.schedules)
        return self.render(request, "schedules.html", schedules=found)

    async def runs(self, request: Request) -> Response:
        workflow = request.query_params.get("workflow") or None
        state = request.query_params.get("state") or None
        if state is not None and state not in RunState.__members__:
            raise HTTPException(400, f"bad filter: {state!r} is not a run state")
        if workflow is not None and "\x00" in workflow:
            raise HTTPException(400, "bad filter: workflow: no name has the NUL character")
        found = []
        if self.workflows is not None:
            workflows = self.workflows
            found = await self._read(
                lambda session: workflows.runs(session, workflow, state and RunState(state))
            )
        return self.render(
            request,
            "runs.html",
            runs=found,
            declared=sorted(self.workflows.definitions) if self.workflows else [],
            states=[s.value for s in RunState],
            query=request.query_params,
        )

    async def run(self, request: Request) -> Response:
        run_id = _uuid(request.path_params["run_id"], "run")
        workflows = self.workflows
        detail = None
        if workflows is not None:
            detail = await self._read(lambda session: workflows.run(session, run_id))
        if workflows is None or detail is None:
            raise HTTPException(404, f"no run {run_id}")
        definition = workflows.definitions.get(detail.run.workflow)
        return self.render(
            request,
            "run.html",
            detail=detail,
            run=detail.run,
            graph=_graph(definition, detail) if definition else None,
            drawing=workflows.draw(detail, definition) if definition else [],
            ended=detail.run.state != RunState.RUNNING,
        )

    # ---- actions ---------------------------------------------------------------------------

    async def retry(self, request: Request) -> Response:
        await self._form(request)
        task_id = _task_id(request.path_params["task_id"])
        count = await self._act(lambda session: self.ops.retry(session, [task_id], operator()))
        return _back(request, f"/tasks/{task_id}", f"{count} task retried")

    async def cancel(self, request: Request) -> Response:
        form = await self._form(request)
        task_id = _task_id(request.path_params["task_id"])
        descendants = form.get("descendants") == "on"
        result = await self._act(
            lambda session: self.ops.cancel(session, [task_id], descendants, operator())
        )
        return _back(
            request,
            f"/tasks/{task_id}",
            f"{len(result.cancelled)} pending task(s) cancelled, "
            f"{len(result.requested)} running task(s) being stopped",
        )

    async def cancel_run(self, request: Request) -> Response:
        await self._form(request)
        run_id = _uuid(request.path_params["run_id"], "run")
        workflows = self._workflows()
        done = await self._act(lambda session: workflows.cancel(session, run_id, operator()))
        return _back(request, f"/runs/{run_id}", "run cancelled" if done else "not running")

    async def retry_run(self, request: Request) -> Response:
        await self._form(request)
        run_id = _uuid(request.path_params["run_id"], "run")
        workflows = self._workflows()
        try:
            count = await self._act(lambda session: workflows.retry(session, run_id, operator()))
        except WorkflowError as error:
            raise HTTPException(400, str(error)) from None
        return _back(request, f"/runs/{run_id}", f"run resumed: {count} step task(s) retried")

    def _workflows(self) -> Workflows:
        if self.workflows is None:
            raise HTTPException(404, "no workflows are declared")
        return self.workflows

    async def retry_matching(self, request: Request) -> Response:
        form = await self._form(request)
        where = _filter(form)
        if where.state not in (TaskState.FAILED, TaskState.CANCELLED):
            raise HTTPException(400, "only failed or cancelled tasks can be retried")
        count = await run_in_threadpool(self.ops.retry_all, where, operator())
        query = {k: v for k, v in form.items() if k not in ("csrf", "after") and v}
        target = str(URL("/tasks").include_query_params(**query))
        return _back(request, target, f"{count} task(s) retried")

    async def purge(self, request: Request) -> Response:
        form = await self._form(request)
        try:
            age = timedelta(seconds=parse_duration(str(form.get("older_than", ""))))
        except ValueError as error:
            raise HTTPException(400, f"older than: {error}") from None
        chosen = set(form.getlist("state"))
        states = [state for state in FINAL_STATES if state.value in chosen]
        if not states:
            raise HTTPException(400, "choose the states to purge")
        retention = Retention().older_than(age, states)
        totals = await run_in_threadpool(self.ops.purge_all, retention, states)
        deleted = ", ".join(f"{count:,} {kind}" for kind, count in totals.items() if count)
        return _back(request, "/", f"purged: {deleted or 'nothing to delete'}")

    # ---- errors ----------------------------------------------------------------------------

    async def error(self, request: Request, error: Exception) -> Response:
        assert isinstance(error, HTTPException)
        if not hasattr(request.state, "csrf"):  # refused before the guard ran
            return PlainTextResponse(error.detail, status_code=error.status_code)
        code = error.status_code
        return self.render(request, "error.html", status=code, code=code, message=error.detail)

    async def database_error(self, request: Request, error: Exception) -> Response:
        logger.warning("dashboard: the database did not answer: %s", error)
        message = "the database did not answer: " + str(error).splitlines()[0]
        return self.render(request, "error.html", status=503, code=503, message=message)


def _back(request: Request, path: str, notice: str) -> Response:
    """After an action, back to a page that says what was done (303: the browser GETs it)."""
    target = URL(request.scope.get("root_path", "") + path).include_query_params(notice=notice)
    return RedirectResponse(str(target), status_code=303)


def _task_id(text: str) -> uuid.UUID:
    return _uuid(text, "task")


def _uuid(text: str, kind: str) -> uuid.UUID:
    try:
        return uuid.UUID(text)
    except ValueError:
        raise HTTPException(404, f"{text!r} is not a {kind} id") from None


def _filter(given: Any) -> TaskFilter:
    """A TaskFilter from a query string or form; a bad value is a 400 naming it."""

    def value(key: str) -> str | None:
        text = str(given.get(key) or "").strip()
        return text or None

    try:
        state = value("state")
        since, until, parent = value("since"), value("until"), value("parent")
        return TaskFilter(
            state=TaskState(state.upper()) if state else None,
            channel=value("channel"),
            processor=value("processor"),
            since=parse_moment(since) if since else None,
            until=parse_moment(until) if until else None,
            parent=uuid.UUID(parent) if parent else None,
            error=value("error"),
        )
    except ValueError as error:
        raise HTTPException(400, f"bad filter: {error}") from None


def _when(moment: datetime | None) -> str:
    if moment is None:
        return "-"
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _pretty(value: Any) -> str:
    return json.dumps(value, indent=2, default=str, ensure_ascii=False)


def _short(value: Any) -> str:
    return str(value)[:8]


def _timings(task: Any) -> list[tuple[str, str]]:
    """What a person asks of a task's time: when, how long it waited, how long it ran."""
    rows = [
        ("created", _when(task.created_at)),
        ("scheduled", _when(task.scheduled_at)),
        ("started", _when(task.started_at)),
        ("finished", _when(task.finished_at)),
    ]
    if task.started_at:
        rows.append(("waited", format_age(task.started_at - task.scheduled_at)))
    if task.started_at and task.finished_at:
        rows.append(("ran", format_age(task.finished_at - task.started_at)))
    return rows


BOX_WIDTH, BOX_HEIGHT, COLUMN, ROW = 170, 46, 220, 64


def _graph(workflow: Workflow, detail: RunDetail) -> dict[str, Any]:
    """The run's steps as boxes in columns by depth, each coloured by its state, and an arrow
    from each upstream step (the on_failure step apart, under the rest)."""
    depth = workflow.levels()
    rows: dict[int, int] = {}
    boxes: dict[str, dict[str, Any]] = {}
    for name in workflow.steps:
        column = depth[name]
        row = rows.get(column, 0)
        rows[column] = row + 1
        boxes[name] = {"x": 10 + column * COLUMN, "y": 10 + row * ROW}
    bottom = max(rows.values()) * ROW + 10
    if workflow.on_failure is not None:
        boxes["on_failure"] = {"x": 10, "y": bottom + 10}
        bottom += ROW + 10
    for name, box in boxes.items():
        state = step_state(detail, name, handler=name == "on_failure")
        box |= {"name": name, "state": state, "tone": _tone(state), "w": BOX_WIDTH}
        box["h"] = BOX_HEIGHT
    edges = []
    for name, step in workflow.steps.items():
        for upstream in step.after:
            a, b = boxes[upstream], boxes[name]
            x1, y1 = a["x"] + BOX_WIDTH, a["y"] + BOX_HEIGHT / 2
            x2, y2 = b["x"], b["y"] + BOX_HEIGHT / 2
            middle = (x1 + x2) / 2
            edges.append(f"M{x1},{y1} C{middle},{y1} {middle},{y2} {x2 - 6},{y2}")
    width = 10 + (max(depth.values(), default=0) + 1) * COLUMN
    return {"boxes": list(boxes.values()), "edges": edges, "width": width, "height": bottom}


def _tone(state: str) -> str:
    if "failed" in state or "cancelled" in state or "gone" in state:
        return "failed"
    if state.startswith("×") and all(part.endswith("done") for part in state[1:].split(", ")):
        return "done"
    if state in ("done", "skipped", "empty"):
        return "done" if state == "done" else "skipped"
    if state in ("waiting", "not run", "if it fails", "not needed"):
        return "waiting"
    return "running"


def _chart(found: Throughput, width: int = 720, height: int = 140) -> dict[str, Any]:
    """Bars of the tasks done and failed in each slice, scaled to the tallest."""
    totals = [d + f for d, f in zip(found.done, found.failed, strict=True)]
    peak = max(totals, default=0) or 1
    slot = width / len(totals)
    bars = []
    for i, (done, failed) in enumerate(zip(found.done, found.failed, strict=True)):
        at = found.start + found.step * i
        done_height = done / peak * height
        failed_height = failed / peak * height
        bars.append(
            {
                "x": round(i * slot + 1, 1),
                "width": round(slot - 2, 1),
                "done_y": round(height - done_height, 1),
                "done_height": round(done_height, 1),
                "failed_y": round(height - done_height - failed_height, 1),
                "failed_height": round(failed_height, 1),
                "title": f"{_when(at)}: {done:,} done, {failed:,} failed",
            }
        )
    minutes = round(found.step.total_seconds() * len(totals) / 60)
    return {
        "bars": bars,
        "width": width,
        "height": height,
        "peak": max(totals, default=0),
        "done": sum(found.done),
        "failed": sum(found.failed),
        "span": f"{minutes} min",
    }

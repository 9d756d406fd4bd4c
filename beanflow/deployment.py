"""A Deployment: what a beanflow.yaml compiles to, the default one, and how it runs.

``spec.compile`` builds a Deployment; ``BeanQueue`` knows nothing of files. ``beanflow.load``
makes the Deployment it returns the default one, through which ``enqueue(session, "name", …)``
resolves declared processor names. ``run_deployment`` starts what ``beanflow run`` starts.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import inspect
from sqlalchemy.orm import Session

from . import db, metrics
from .app import BeanQueue
from .dashboard import DashboardServer, DashboardSettings
from .engine.pool import ChannelPlan, Supervisor
from .engine.queries import Queries
from .engine.queries import enqueue_many as enqueue_many_statement
from .engine.schedules import Schedule, Scheduler
from .engine.service import PeriodicService
from .errors import ProcessorNotFound, TablesMissing
from .models.task import current_task, insert_task, notify_channels
from .ops import Operations, Retention, RetentionService, database_now, report_burst
from .processors.processor import Processor
from .workflows import Workflows, WorkflowService

# how a supervisor hands the resolved database URL to its workers (not on the command line,
# where `ps` would show its password)
WORKER_DATABASE_URL = "BEANFLOW_RUN_DATABASE_URL"


@dataclasses.dataclass
class Deployment:
    """Everything a beanflow.yaml declares, compiled: the app (config, registry, database),
    processors by their declared names, the worker processes per channel, the schedules."""

    app: BeanQueue
    processors: dict[str, Processor] = dataclasses.field(default_factory=dict)
    channels: list[ChannelPlan] = dataclasses.field(default_factory=list)
    schedules: list[Schedule] = dataclasses.field(default_factory=list)
    retention: Retention = dataclasses.field(default_factory=Retention)
    # where a running deployment serves /metrics and /healthz: (host, port); None: it does not
    metrics: tuple[str, int] | None = None
    dashboard: DashboardSettings | None = None  # served by a running deployment when set
    workflows: Workflows | None = None  # the workflows it declares
    path: Path | None = None  # the file it was compiled from (workers compile it again)

    def resolve(self, channel: str | None, name: str) -> Processor:
        """The processor declared as ``name``, or else the app's processor called ``name``
        (``function`` or ``module:function``); on ``channel`` when given."""
        declared = self.processors.get(name)
        if declared is None:
            return self.app.resolve(channel, name)
        if channel not in (None, declared.channel):
            raise ProcessorNotFound(
                f"processor {name!r} belongs to channel {declared.channel!r}, not {channel!r}"
            )
        return declared

    def enqueue(self, session: Session, name: str, /, **kwargs: Any) -> Any:
        """``enqueue`` the processor declared as ``name`` in this deployment."""
        return enqueue(session, self.resolve(None, name), **kwargs)

    def plan(self, channel: str) -> ChannelPlan:
        return next(plan for plan in self.channels if plan.channel == channel)


_default: Deployment | None = None


def set_default(deployment: Deployment | None) -> None:
    """Make ``deployment`` the one through which ``enqueue`` resolves names (``load`` does)."""
    global _default
    _default = deployment


def default() -> Deployment:
    """The default deployment; raises ProcessorNotFound when no file was loaded."""
    if _default is None:
        raise ProcessorNotFound(
            "no beanflow.yaml was loaded: call beanflow.load(path) once at start-up to resolve "
            "processors by name, or pass the processor itself"
        )
    return _default


def _processor(processor: Processor | str | Callable[..., Any]) -> Processor:
    """One rule for every spelling: a Processor; the name of one in the default deployment;
    or a plain function that the default deployment declares."""
    if isinstance(processor, Processor):
        return processor
    if isinstance(processor, str):
        return default().resolve(None, processor)
    known = _default.processors.values() if _default is not None else []
    declared = [p for p in known if p.func is processor]
    if len(declared) == 1:
        return declared[0]
    name = getattr(processor, "__qualname__", repr(processor))
    if declared:
        names = ", ".join(sorted(p.name for p in declared))
        raise ProcessorNotFound(f"{name} is declared several times ({names}): enqueue it by name")
    raise ProcessorNotFound(
        f"{name} is not a processor: decorate it with @processor, or declare it in "
        "beanflow.yaml and load the file"
    )


def enqueue(
    session: Session, processor: Processor | str | Callable[..., Any], /, **kwargs: Any
) -> Any:
    """Insert a task running ``processor(**kwargs)`` in ``session``'s transaction and return
    it; the caller commits (the task becomes visible, and workers are notified, on commit).

    ``processor`` is a Processor, the name of one in the default deployment (the file
    ``beanflow.load()`` loaded), or a function that deployment declares."""
    task = _processor(processor).run(**kwargs)
    insert_task(session, task)
    return task


def enqueue_many(
    session: Session,
    processor: Processor | str | Callable[..., Any],
    kwargs_list: Sequence[dict[str, Any]],
    /,
) -> int:
    """Insert one task per kwargs with a single statement, in ``session``'s transaction (the
    caller commits); returns the number of tasks. Like ``enqueue``, it notifies on commit."""
    processor = _processor(processor)
    arguments = [processor.check_kwargs(kwargs) for kwargs in kwargs_list]
    if not arguments:
        return 0
    parent = current_task.get()
    parameters = {
        "task_channel": processor.channel,
        "task_module": processor.module,
        "task_name": processor.name,
        "arguments": arguments,
        "parent_id": parent.id if parent is not None else None,
    }
    session.execute(enqueue_many_statement(processor.task_class.__table__), parameters)
    notify_channels(session, [processor.channel])
    return len(arguments)


def start(session: Session, workflow: str, /, input: Any = None, key: str | None = None) -> Any:
    """Start a run of the default deployment's ``workflow`` in ``session``'s transaction (it
    and its first steps exist once the caller commits); with ``key``, a second start with the
    same key returns the first run. Returns the WorkflowRun."""
    workflows = default().workflows
    if workflows is None:
        raise ProcessorNotFound(f"no workflow {workflow!r}: the loaded file declares none")
    return workflows.start(session, workflow, input, key)


def run_deployment(
    deployment: Deployment,
    *,
    burst: bool = False,
    create_tables: bool = False,
    log_arguments: Sequence[str] = (),
    fail_on_pending: bool = False,
    metrics_port: int | None = None,
) -> int:
    """Run what a deployment declares until stopped (or, with ``burst``, until no task is due):
    its worker processes per channel, supervised and restarted, and its schedules. Returns
    the exit status (a burst run ends with a summary line; its status says whether a task
    failed, or with ``fail_on_pending`` whether tasks are left: ``ops.report_burst``).
    Workers are ``beanflow run FILE --worker-channel C`` processes, which compile the same
    file and run ``run_worker``. ``metrics_port`` serves /metrics and /healthz there (over
    the file's ``metrics:``); the file's ``dashboard:`` serves the dashboard."""
    app = deployment.app
    serving = deployment.metrics
    if metrics_port is not None:
        serving = (serving[0] if serving else "127.0.0.1", metrics_port)
    if serving is not None:
        metrics.enable_multiprocess()  # before the workers start: they inherit it
    # resolved once (this may start the embedded server), then handed to the workers
    app.config.DATABASE_URL = db.database_url(app.config)
    if create_tables:
        app.create_tables()
    elif not all(inspect(app.engine).has_table(m.__tablename__) for m in app.models):
        raise TablesMissing(f"beanflow create-tables --config {deployment.path}")
    plans = [plan for plan in deployment.channels if plan.workers > 0]
    queries = Queries(app.task_model, app.worker_model, app.event_model)

    def command(plan: ChannelPlan) -> list[str]:
        return [
            *(sys.executable, "-m", "beanflow", *log_arguments, "run", str(deployment.path)),
            *("--worker-channel", plan.channel, *(["--burst"] if burst else [])),
        ]

    def due_channels() -> set[str]:
        with app.engine.connect() as connection:
            rows = connection.execute(
                queries.due_channels, {"channels": [plan.channel for plan in plans]}
            )
            return {row.channel for row in rows}

    services: list[PeriodicService] = [
        RetentionService(Operations(app, deployment.schedules), deployment.retention)
    ]
    if deployment.schedules:
        services.insert(0, Scheduler(app, deployment.schedules))
    if deployment.workflows is not None:
        services.append(WorkflowService(deployment.workflows))
    supervisor = Supervisor(
        plans,
        command,
        services,
        grace_period=app.config.SHUTDOWN_GRACE_PERIOD,
        burst=burst,
        due_channels=due_channels,
        env=os.environ | {WORKER_DATABASE_URL: app.config.DATABASE_URL},
    )
    started = database_now(app)
    ops = Operations(app, deployment.schedules)
    servers: list[metrics.MetricsServer | DashboardServer] = []
    if serving is not None:
        servers.append(metrics.MetricsServer(ops, supervisor.worker_processes, *serving))
    if deployment.dashboard is not None:
        servers.append(DashboardServer(ops, deployment.dashboard, deployment.workflows))
    for server in servers:
        server.start()
    try:
        status = supervisor.run()
    finally:
        for server in servers:
            server.stop()
    if burst and status == 0:
        status = report_burst(app, [p.channel for p in plans], started, fail_on_pending)
    return status


def run_worker(deployment: Deployment, channel: str, *, burst: bool = False) -> int:
    """Run one worker process of ``run_deployment`` on ``channel``, with its channel's
    settings and the database its supervisor resolved."""
    config = deployment.app.config
    config.DATABASE_URL = os.environ.get(WORKER_DATABASE_URL, config.DATABASE_URL)
    plan = deployment.plan(channel)
    config.BATCH_SIZE = plan.batch_size or config.BATCH_SIZE
    config.POLL_TIMEOUT = plan.poll_timeout or config.POLL_TIMEOUT
    return deployment.app.process_tasks([channel], burst=burst, supervisor=os.getppid())

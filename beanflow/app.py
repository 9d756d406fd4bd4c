"""BeanQueue: a Config, a processor registry and a database engine, put together."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any

from sqlalchemy import CheckConstraint, Engine, inspect
from sqlalchemy.orm import sessionmaker

from . import db
from .config import Config, import_object
from .engine.interface import TaskEndHook
from .errors import ConfigError, ProcessorNotFound
from .models.cancellation import Cancellation
from .models.schedule import ScheduleState
from .models.waiter import Waiter
from .models.workflow import WorkflowRun, WorkflowStep, WorkflowTally
from .processors.processor import ExceptionTypes, Processor
from .processors.registry import ProcessorRegistry, processor
from .processors.retry import RetryPolicy

NONE_REGISTERED = (
    "none (declare processors in a beanflow.yaml, which commands read from the current folder "
    "or from --config, or name the app with -a MODULE.APP)"
)


class BeanQueue:
    """The application: what to run (its registry) and where (its database)."""

    def __init__(self, config: Config | None = None) -> None:
        self.config = config if config is not None else Config()
        self.registry = ProcessorRegistry()
        # see QueueApp.task_end_hooks
        self.task_end_hooks: list[TaskEndHook] = []

    # ---- models and database ---------------------------------------------------------------

    @functools.cached_property
    def task_model(self) -> type:
        return _model(self.config.TASK_MODEL, "TASK_MODEL")

    @functools.cached_property
    def worker_model(self) -> type:
        return _model(self.config.WORKER_MODEL, "WORKER_MODEL")

    @functools.cached_property
    def event_model(self) -> type:
        return _model(self.config.EVENT_MODEL, "EVENT_MODEL")

    @functools.cached_property
    def engine(self) -> Engine:
        """The SQLAlchemy engine (starts the embedded server when no URL is configured)."""
        return db.make_engine(self.config)

    @functools.cached_property
    def session_factory(self) -> sessionmaker:
        return sessionmaker(bind=self.engine)

    @property
    def models(self) -> list[type]:
        """The models whose tables beanflow uses."""
        return [
            self.worker_model,
            self.task_model,
            self.event_model,
            ScheduleState,
            Cancellation,
            Waiter,
            WorkflowRun,
            WorkflowStep,
            WorkflowTally,
        ]

    def create_tables(self) -> None:
        """Create beanflow's tables and their indexes where missing (a newer version's new
        tables, nullable columns, indexes and checks are added to an existing database; a
        check as NOT VALID: it applies to rows written from then on)."""
        for model in self.models:
            table = model.__table__
            model.metadata.create_all(self.engine, tables=[table])
            found = inspect(self.engine)
            present = {c["name"] for c in found.get_columns(table.name)}
            checks = {c["name"] for c in found.get_check_constraints(table.name)}
            with self.engine.begin() as connection:
                for column in table.columns:
                    if column.name not in present and column.nullable:
                        kind = column.type.compile(dialect=self.engine.dialect)
                        connection.exec_driver_sql(
                            f'ALTER TABLE "{table.name}" ADD COLUMN "{column.name}" {kind}'
                        )
                for check in table.constraints:
                    if isinstance(check, CheckConstraint) and check.name not in checks:
                        connection.exec_driver_sql(
                            f'ALTER TABLE "{table.name}" ADD CONSTRAINT "{check.name}" '
                            f"CHECK ({check.sqltext}) NOT VALID"
                        )
            for index in table.indexes:
                index.create(self.engine, checkfirst=True)

    # ---- processors ------------------------------------------------------------------------

    def processor(
        self,
        channel: str,
        *,
        retry_policy: RetryPolicy | None = None,
        retry_exceptions: ExceptionTypes | None = None,
        auto_complete: bool = True,
        timeout: float | None = None,
    ) -> Callable[[Callable[..., Any]], Processor]:
        """Register a function as the processor of ``channel``'s tasks in this app."""
        return processor(
            channel,
            retry_policy=retry_policy,
            retry_exceptions=retry_exceptions,
            auto_complete=auto_complete,
            timeout=timeout,
            task_model=self.task_model,
            registry=self.registry,
        )

    def load_processors(self) -> ProcessorRegistry:
        """Scan ``PROCESSOR_PACKAGES`` (each once); returns the registry."""
        try:
            self.registry.scan(self.config.PROCESSOR_PACKAGES)
        except KeyboardInterrupt:
            raise
        except BaseException as error:  # noqa: BLE001 - the user's package failed to import
            raise ConfigError(
                f"PROCESSOR_PACKAGES: cannot import {self.config.PROCESSOR_PACKAGES}: "
                f"{type(error).__name__}: {error}"
            ) from error
        for found in self.registry.processors.values():
            found.task_model = found.task_model or self.task_model
        return self.registry

    def resolve(self, channel: str | None, name: str) -> Processor:
        """The registered processor called ``name`` (``function`` or ``module:function``), on
        ``channel`` when given; raises ProcessorNotFound saying what is wrong."""
        registry = self.load_processors()
        channels = [channel] if channel is not None else sorted(registry.channels())
        found = [p for c in channels for p in registry.find(c, name)]
        if len(found) == 1:
            return found[0]
        if found:
            names = ", ".join(f"{p.module}:{p.name}" for p in found)
            raise ProcessorNotFound(f"{name!r} is ambiguous ({names}); name it as module:function")
        elsewhere = [p for c in registry.channels() for p in registry.find(c, name)]
        if elsewhere:
            raise ProcessorNotFound(
                f"processor {name!r} belongs to channel {elsewhere[0].channel!r}, not {channel!r}"
            )
        known = ", ".join(sorted(f"{p.name} ({p.channel})" for p in registry.processors.values()))
        raise ProcessorNotFound(
            f"no processor named {name!r}; registered: {known or NONE_REGISTERED}"
        )

    # ---- enqueue and work ------------------------------------------------------------------

    def process_tasks(
        self, channels: Iterable[str], *, burst: bool = False, supervisor: int | None = None
    ) -> int:
        """Run a worker on ``channels`` in this process until SIGTERM/SIGINT (or, with
        ``burst``, until no task is due). Returns the exit status: 0, or 1 if this worker was
        found dead by another one. ``supervisor``: the pid of the process that supervises
        this one (the worker stops if it dies, and drains once however many signals come)."""
        from .engine.worker import TaskWorker

        channels = list(channels)
        registered = self.load_processors().channels()
        idle = [channel for channel in channels if channel not in registered]
        if idle:
            raise ProcessorNotFound(
                f"no processor is registered for channel(s) {', '.join(map(repr, idle))}; "
                f"registered channels: {', '.join(sorted(registered)) or 'none'} "
                f"(PROCESSOR_PACKAGES={self.config.PROCESSOR_PACKAGES})"
            )
        return TaskWorker(self, channels, burst=burst, supervisor=supervisor).run()


def _model(path: str, setting: str) -> type:
    try:
        return import_object(path)
    except ImportError as error:
        raise ConfigError(f"{setting}={path!r}: {error}") from None

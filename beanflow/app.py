"""BeanQueue: a Config, a processor registry and a database engine, put together."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from sqlalchemy import ARRAY, Engine, Text, bindparam, cast, func, insert, literal, select
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Session, sessionmaker

from . import db
from .config import Config, ConfigError, import_object
from .engine.pool import ChannelPlan
from .engine.schedules import Schedule
from .models.task import Task, current_task, notify_channels
from .processors.processor import ExceptionTypes, Processor
from .processors.registry import ProcessorRegistry, processor
from .processors.retry import RetryPolicy


class BeanQueue:
    """The application: what to run (its registry) and where (its database)."""

    # the application of the last beanflow.load(): ``enqueue`` resolves names through it
    default: BeanQueue | None = None

    def __init__(self, config: Config | None = None) -> None:
        self.config = config if config is not None else Config()
        self.registry = ProcessorRegistry()
        # filled by a declarative spec (beanflow.load): processors by their declared name,
        # cron schedules, and the worker pool's plan
        self.names: dict[str, Processor] = {}
        self.schedules: list[Schedule] = []
        self.pool: list[ChannelPlan] = []
        self._scanned = False

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

    def create_tables(self) -> None:
        """Create the task, worker and event tables (and their indexes) if missing."""
        tables = [m.__table__ for m in (self.worker_model, self.task_model, self.event_model)]
        tables[0].metadata.create_all(self.engine, tables=tables)

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
        """Scan ``PROCESSOR_PACKAGES`` once; returns the registry."""
        if not self._scanned:
            self.registry.scan(self.config.PROCESSOR_PACKAGES)
            for processor in self.registry.processors.values():
                if processor.task_model is None:
                    processor.task_model = self.task_model
            self.mark_scanned()
        return self.registry

    def mark_scanned(self) -> None:
        """Record that PROCESSOR_PACKAGES were scanned (by the caller)."""
        self._scanned = True

    def resolve(self, channel: str | None, name: str) -> Processor:
        """The processor called ``name`` (``function`` or ``module:function``), on ``channel``
        when given; raises LookupError saying what is wrong."""
        registry = self.load_processors()
        declared = self.names.get(name)
        if declared is not None and channel in (None, declared.channel):
            return declared
        if declared is not None:
            raise LookupError(
                f"processor {name!r} belongs to channel {declared.channel!r}, not {channel!r}"
            )
        channels = [channel] if channel is not None else sorted(registry.channels())
        found = [p for c in channels for p in registry.find(c, name)]
        if len(found) == 1:
            return found[0]
        if found:
            names = ", ".join(f"{p.module}:{p.name}" for p in found)
            raise LookupError(f"{name!r} is ambiguous ({names}); name it as module:function")
        elsewhere = [p for c in registry.channels() for p in registry.find(c, name)]
        if elsewhere:
            raise LookupError(
                f"processor {name!r} belongs to channel {elsewhere[0].channel!r}, not {channel!r}"
            )
        known = ", ".join(sorted(f"{p.name} ({p.channel})" for p in registry.processors.values()))
        raise LookupError(f"no processor named {name!r}; registered: {known or 'none'}")

    # ---- enqueue and work ------------------------------------------------------------------

    def process_tasks(self, channels: Iterable[str], *, burst: bool = False) -> int:
        """Run a worker on ``channels`` in this process until SIGTERM/SIGINT (or, with
        ``burst``, until no task is due). Returns the exit status: 0, or 1 if this worker was
        found dead by another one."""
        from .engine.worker import TaskWorker

        channels = list(channels)
        registered = self.load_processors().channels()
        idle = [channel for channel in channels if channel not in registered]
        if idle:
            raise LookupError(
                f"no processor is registered for channel(s) {', '.join(map(repr, idle))}; "
                f"registered channels: {', '.join(sorted(registered)) or 'none'} "
                f"(PROCESSOR_PACKAGES={self.config.PROCESSOR_PACKAGES})"
            )
        return TaskWorker(self, channels, burst=burst).run()


def enqueue(session: Session, processor: Processor | str, /, **kwargs: Any) -> Any:
    """Add a task running ``processor(**kwargs)`` to ``session`` and return it; the caller
    commits (the task becomes visible, and workers are notified, on commit).

    ``processor`` is a Processor, or the name of one in the last ``beanflow.load()``-ed file.
    """
    if isinstance(processor, str):
        if BeanQueue.default is None:
            raise LookupError(
                f"cannot resolve {processor!r}: no beanflow.yaml was loaded "
                "(call beanflow.load(path) first, or pass the processor)"
            )
        processor = BeanQueue.default.resolve(None, processor)
    task = processor.run(**kwargs)
    session.add(task)
    return task


def enqueue_many(
    session: Session, processor: Processor, kwargs_list: Sequence[dict[str, Any]], /
) -> int:
    """Insert one task per kwargs with a single statement, in ``session``'s transaction (the
    caller commits); returns the number of tasks. Like ``enqueue``, it notifies on commit."""
    arguments = [processor.check_kwargs(kwargs) for kwargs in kwargs_list]
    if not arguments:
        return 0
    table = (processor.task_model or Task).__table__
    parent = current_task.get()
    columns = {
        "channel": literal(processor.channel),
        "module": literal(processor.module),
        "name": literal(processor.name),
        # one array parameter for all rows: the statement's size does not grow with them
        "kwargs": cast(func.unnest(bindparam("arguments", type_=ARRAY(Text))), JSONB),
    }
    if parent is not None and "parent_id" in table.c:
        columns["parent_id"] = literal(parent.id, table.c.parent_id.type)
    rows = select(*[value.label(name) for name, value in columns.items()])
    statement = insert(table).from_select(list(columns), rows, include_defaults=False)
    session.execute(statement, {"arguments": arguments})
    notify_channels(session, [processor.channel])
    return len(arguments)


def _model(path: str, setting: str) -> type:
    try:
        return import_object(path)
    except ImportError as error:
        raise ConfigError(f"{setting}={path!r}: {error}") from None

"""Task model, its mixins, and ``listen_events``: the automatic NOTIFY and parent wiring."""

from __future__ import annotations

import contextvars
import enum
import uuid
import weakref
from collections.abc import Iterable
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    CheckConstraint,
    DateTime,
    Enum,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    event,
    func,
    inspect,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB, UUID
from sqlalchemy.engine import Connection
from sqlalchemy.orm import (
    Mapped,
    Session,
    SessionTransaction,
    declared_attr,
    make_transient,
    make_transient_to_detached,
    mapped_column,
    object_session,
    relationship,
    validates,
)

from ..engine.queries import enqueue_one, notify
from ..errors import KwargsError
from .base import Base
from .jsonb import jsonb_text

if TYPE_CHECKING:
    from .event import Event
    from .worker import Worker


# PostgreSQL's identifiers, NOTIFY channels included, are at most 63 bytes
MAX_CHANNEL_BYTES = 63


def check_channel(channel: object) -> str:
    """The channel name, or ValueError saying why it cannot be one. Any text works (it is
    quoted or bound wherever it is used) up to PostgreSQL's 63 bytes."""
    if not isinstance(channel, str) or not channel:
        raise ValueError(f"a channel name must be a non-empty string, got {channel!r}")
    size = len(channel.encode())
    if size > MAX_CHANNEL_BYTES:
        raise ValueError(
            f"channel name {channel[:20]!r}… is {size} bytes long; PostgreSQL "
            f"allows at most {MAX_CHANNEL_BYTES} bytes (NOTIFY channels are "
            "identifiers)"
        )
    return channel


class TaskState(str, enum.Enum):
    PENDING = "PENDING"
    PROCESSING = "PROCESSING"
    DONE = "DONE"
    FAILED = "FAILED"
    # by ``beanflow cancel`` / ``ops.cancel``, or by its processor raising ``Cancel``
    CANCELLED = "CANCELLED"


# the states a task never leaves by itself (a manual retry takes it back to PENDING)
FINAL_STATES = (TaskState.DONE, TaskState.FAILED, TaskState.CANCELLED)


# The task whose processor is running in this context; tasks enqueued meanwhile become its
# children. Set by beanflow.processors.processor, read by the before_insert hook below.
current_task: contextvars.ContextVar[Any] = contextvars.ContextVar(
    "beanflow_current_task", default=None
)


# the due times a task row may have besides 'infinity' (never due): Python's datetime holds
# them in any session time zone
EARLIEST_DUE = datetime(1, 1, 2, tzinfo=timezone.utc)
LATEST_DUE = datetime(9999, 12, 30, tzinfo=timezone.utc)


def as_due_time(moment: datetime) -> datetime | None:
    """``moment`` (a naive one in local time) as a task's due time, or None when no task can
    be due then."""
    try:
        aware = moment if moment.tzinfo else moment.astimezone()
    except (OverflowError, ValueError):  # year 1 or 9999 moved out of range by the offset
        return None
    return aware if EARLIEST_DUE <= aware <= LATEST_DUE else None


def _readable(column: str) -> str:
    """SQL: ``column`` holds a time that Python can read in any time zone."""
    return f"{column} BETWEEN '{EARLIEST_DUE}' AND '{LATEST_DUE}'"


class TaskModelMixin:
    """Columns of a task row, and the partial index that serves the claim."""

    id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True),
        primary_key=True,
        default=uuid.uuid4,
        server_default=func.gen_random_uuid(),  # for rows inserted in bulk, or by plain SQL
    )
    channel: Mapped[str] = mapped_column(String, nullable=False)
    module: Mapped[str] = mapped_column(String, nullable=False)
    name: Mapped[str] = mapped_column(String, nullable=False)
    kwargs: Mapped[dict[str, Any]] = mapped_column(
        JSONB, nullable=False, default=dict, server_default=text("'{}'::jsonb")
    )
    state: Mapped[TaskState] = mapped_column(
        Enum(TaskState, native_enum=False, length=16),
        nullable=False,
        default=TaskState.PENDING,
        server_default=TaskState.PENDING.value,
    )
    result: Mapped[Any] = mapped_column(JSONB(none_as_null=True), nullable=True)
    error_message: Mapped[str | None] = mapped_column(Text)
    # every attempt counts, including one whose worker died under it
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, default=0, server_default="0")
    # how many workers died while holding this task; see Config.MAX_WORKER_CRASHES
    crash_count: Mapped[int] = mapped_column(Integer, nullable=False, default=0, server_default="0")
    # when the task becomes due. clock_timestamp(), not now(): rows inserted by one
    # transaction keep their insertion order, which the claim follows.
    scheduled_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.clock_timestamp()
    )
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now()
    )
    # at most one task per key (a cron schedule's tick): enforced by a partial unique index
    unique_key: Mapped[str | None] = mapped_column(String, nullable=True)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    @declared_attr.directive
    def __table_args__(cls) -> tuple[Any, ...]:
        # Only pending rows are in this index, so the claim's cost does not grow with the
        # number of done or failed rows, and (channel, scheduled_at) gives the claim its order.
        return (
            # Rows written by other means than beanflow (SQL, another language) are refused
            # at once when beanflow could not read them back: a state it does not know, or a
            # time that Python's datetime cannot hold in any time zone (years 1 to 9999, a day
            # of margin at each end; a due time of -infinity, which no claim would reach either).
            CheckConstraint(
                "state IN ({})".format(", ".join(f"'{s.value}'" for s in TaskState)),
                name=f"ck_{cls.__tablename__}_state",
            ),
            CheckConstraint(
                f"scheduled_at = 'infinity' OR {_readable('scheduled_at')}",
                name=f"ck_{cls.__tablename__}_scheduled_at",
            ),
            CheckConstraint(
                " AND ".join(
                    f"({column} IS NULL OR {_readable(column)})"
                    for column in ("created_at", "started_at", "finished_at")
                ),
                name=f"ck_{cls.__tablename__}_times",
            ),
            Index(
                f"ix_{cls.__tablename__}_pending",
                "channel",
                "scheduled_at",
                postgresql_where=text("state = 'PENDING'"),
            ),
            # The operations' listing, newest first (keyset on created_at, id).
            Index(f"ix_{cls.__tablename__}_created", "created_at", "id"),
            # Finished rows of each final state by age: retention's purge, "failed in the last
            # hour"; a row enters one of them once, when it ends.
            *(
                Index(
                    f"ix_{cls.__tablename__}_{state.lower()}",
                    "finished_at",
                    postgresql_where=text(f"state = '{state}'"),
                )
                for state in ("DONE", "FAILED", "CANCELLED")
            ),
            Index(
                f"ix_{cls.__tablename__}_unique_key",
                "unique_key",
                unique=True,
                postgresql_where=text("unique_key IS NOT NULL"),
            ),
            # Partial, like the others, so that a row enters an index only while the engine
            # looks for it there: every insert and every state change writes fewer indexes.
            # Reaping and releasing look for a worker's PROCESSING tasks; children for theirs.
            *(
                Index(f"ix_{cls.__tablename__}_{suffix}", column, postgresql_where=text(where))
                for column, suffix, where in (
                    ("worker_id", "processing_worker", "state = 'PROCESSING'"),
                    ("parent_id", "parent", "parent_id IS NOT NULL"),
                    ("workflow_run_id", "workflow_run", "workflow_run_id IS NOT NULL"),
                )
                if _declares(cls, column)
            ),
        )

    def __init__(self, **values: Any) -> None:
        # the id is known at once (not at the first flush), so it can be referenced right away
        values.setdefault("id", uuid.uuid4())
        super().__init__(**values)

    @validates("channel")
    def _check_channel(self, key: str, channel: str) -> str:
        return check_channel(channel)

    @validates("kwargs")
    def _check_kwargs(self, key: str, kwargs: Any) -> Any:
        if not isinstance(kwargs, dict):
            raise KwargsError(f"kwargs must be a JSON object, got {type(kwargs).__name__}")
        try:
            jsonb_text(kwargs, "kwargs")
        except ValueError as error:
            raise KwargsError(f"kwargs cannot be stored as JSON: {error}") from None
        return kwargs

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} {self.id} {self.channel}:{self.module}.{self.name} "
            f"{self.state}>"
        )


def _declares(cls: type, name: str) -> bool:
    return any(name in vars(base) for base in cls.__mro__)


class TaskModelRefWorkerMixin:
    """The worker holding the task while it is PROCESSING."""

    @declared_attr
    def worker_id(cls) -> Mapped[uuid.UUID | None]:
        return mapped_column(
            UUID(as_uuid=True),
            ForeignKey("beanflow_workers.id", onupdate="CASCADE", ondelete="SET NULL"),
            nullable=True,
        )

    @declared_attr
    def worker(cls) -> Mapped[Worker | None]:
        return relationship("Worker", back_populates="tasks", uselist=False)


class TaskModelRefParentMixin:
    """The task whose processor enqueued this one, and this task's children."""

    @declared_attr
    def parent_id(cls) -> Mapped[uuid.UUID | None]:
        return mapped_column(
            UUID(as_uuid=True),
            ForeignKey(f"{cls.__tablename__}.id", ondelete="SET NULL"),
            nullable=True,
        )

    @declared_attr
    def parent(cls) -> Mapped[Any]:
        return relationship(cls.__name__, back_populates="children", remote_side=[cls.id])

    @declared_attr
    def children(cls) -> Mapped[list[Any]]:
        return relationship(cls.__name__, back_populates="parent")


class TaskModelRefWorkflowMixin:
    """The workflow run this task is a step of (None for a task enqueued on its own)."""

    @declared_attr
    def workflow_run_id(cls) -> Mapped[uuid.UUID | None]:
        return mapped_column(UUID(as_uuid=True), nullable=True)


class TaskModelRefEventMixin:
    """The task's events, oldest first."""

    @declared_attr
    def events(cls) -> Mapped[list[Event]]:
        return relationship(
            "Event", back_populates="task", order_by="Event.id", passive_deletes=True
        )


class Task(
    TaskModelMixin,
    TaskModelRefWorkerMixin,
    TaskModelRefParentMixin,
    TaskModelRefWorkflowMixin,
    TaskModelRefEventMixin,
    Base,
):
    __tablename__ = "beanflow_tasks"


# session -> {transaction: channels already notified in it}
_notified: weakref.WeakKeyDictionary[Session, weakref.WeakKeyDictionary[Any, set[str]]] = (
    weakref.WeakKeyDictionary()
)


def notify_channels(
    session: Session, channels: Iterable[str], connection: Connection | None = None
) -> None:
    """Emit ``pg_notify(channel, '')`` once per channel per transaction of ``session``.

    PostgreSQL delivers a notification only when its transaction commits, and drops it when
    the savepoint it was sent in rolls back; a channel counts as notified only in the
    (sub)transaction that sent it and in the ones nested inside it. Inside a flush, pass the
    flush's ``connection``.
    """
    for channel in to_notify(session, set(channels)):
        (connection or session).execute(notify(channel))


def to_notify(session: Session, channels: set[str]) -> list[str]:
    """The ``channels`` not yet notified in the current (sub)transaction of ``session``,
    counted as notified from now on (the caller notifies them)."""
    transaction = session.get_nested_transaction() or session.get_transaction()
    if transaction is None:
        return []
    sent = _notified.setdefault(session, weakref.WeakKeyDictionary())
    missing = []
    for channel in channels:
        scope = transaction
        while scope is not None and channel not in sent.get(scope, ()):
            scope = scope.parent
        if scope is None:
            missing.append(channel)
    if missing:
        sent.setdefault(transaction, set()).update(missing)
    return missing


# session -> [(the (sub)transaction a task was inserted in, the task)], until the outermost
# transaction ends: a savepoint rolled back takes its tasks out of the session
_inserted: weakref.WeakKeyDictionary[Session, list[tuple[SessionTransaction, weakref.ref[Any]]]] = (
    weakref.WeakKeyDictionary()
)


def insert_task(session: Session, task: Any) -> None:
    """INSERT ``task`` now, in ``session``'s transaction, and attach it to the session as
    persistent: what a flush would do, in one statement (its channel's NOTIFY folded in when
    the transaction has not sent it yet) and without the unit of work. Nothing is visible to
    others before the caller commits; a rolled-back savepoint removes the row and the task."""
    _adopt(task)
    mapper = inspect(type(task))
    values = {
        prop.columns[0].key: task.__dict__[prop.key]
        for prop in mapper.column_attrs
        if prop.key in task.__dict__
    }
    if session.get_transaction() is None:
        session.begin()  # what the statement would autobegin, now: the NOTIFY is counted in it
    notifying = bool(to_notify(session, {task.channel}))
    statement = enqueue_one(mapper.local_table, tuple(values), notifying)
    if notifying:
        values["notify_channel"] = task.channel
    session.execute(statement, values)
    make_transient_to_detached(task)  # the columns it did not set load on first access
    session.add(task)
    inserted = _inserted.setdefault(session, [])
    transaction = session.get_nested_transaction() or session.get_transaction()
    inserted.append((transaction, weakref.ref(task)))


def _adopt(task: Any) -> None:
    """Make ``task`` a child of the task whose processor is running, if any (same model)."""
    parent = current_task.get()
    if (
        parent is not None
        and getattr(task, "parent_id", False) is None
        and isinstance(parent, type(task))
    ):
        task.parent_id = parent.id


@event.listens_for(Session, "after_soft_rollback")
def _forget_rolled_back(session: Session, rolled_back: SessionTransaction) -> None:
    kept = []
    for transaction, task_ref in _inserted.get(session, ()):
        scope = transaction
        while scope is not None and scope is not rolled_back:
            scope = scope.parent
        task = task_ref()
        if scope is None:
            kept.append((transaction, task_ref))
        elif task is not None and task in session:
            session.expunge(task)
            make_transient(task)
    if kept:
        _inserted[session] = kept
    else:
        _inserted.pop(session, None)


@event.listens_for(Session, "after_commit")
def _forget_committed(session: Session) -> None:
    if session.get_nested_transaction() is None:  # the outermost transaction committed
        _inserted.pop(session, None)


def listen_events(task_cls: type) -> None:
    """Wire a Task model's ORM events: NOTIFY its channel on insert (and on an update that
    leaves it PENDING), and make a task inserted while a processor runs that task's child."""

    def before_insert(mapper: Any, connection: Any, target: Any) -> None:
        _adopt(target)

    def after_write(mapper: Any, connection: Any, target: Any) -> None:
        if target.state in (TaskState.PENDING, None):
            session = object_session(target)
            if session is not None:
                notify_channels(session, [target.channel], connection)

    event.listen(task_cls, "before_insert", before_insert, propagate=True)
    event.listen(task_cls, "after_insert", after_write, propagate=True)
    event.listen(task_cls, "after_update", after_write, propagate=True)


listen_events(Task)

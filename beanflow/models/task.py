"""Task model, its mixins, and ``listen_events``: the automatic NOTIFY and parent wiring."""

from __future__ import annotations

import contextvars
import enum
import uuid
import weakref
from collections.abc import Iterable
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    DateTime,
    Enum,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    event,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB, UUID
from sqlalchemy.engine import Connection
from sqlalchemy.orm import (
    Mapped,
    Session,
    declared_attr,
    mapped_column,
    object_session,
    relationship,
    validates,
)

from ..engine.queries import notify
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


# The task whose processor is running in this context; tasks enqueued meanwhile become its
# children. Set by beanflow.processors.processor, read by the before_insert hook below.
current_task: contextvars.ContextVar[Any] = contextvars.ContextVar(
    "beanflow_current_task", default=None
)


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
            Index(
                f"ix_{cls.__tablename__}_pending",
                "channel",
                "scheduled_at",
                postgresql_where=text("state = 'PENDING'"),
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
    transaction = session.get_nested_transaction() or session.get_transaction()
    if transaction is None:
        return
    sent = _notified.setdefault(session, weakref.WeakKeyDictionary())
    for channel in set(channels):
        scope = transaction
        while scope is not None and channel not in sent.get(scope, ()):
            scope = scope.parent
        if scope is None:
            (connection or session).execute(notify(channel))
            sent.setdefault(transaction, set()).add(channel)


def listen_events(task_cls: type) -> None:
    """Wire a Task model's ORM events: NOTIFY its channel on insert (and on an update that
    leaves it PENDING), and make a task inserted while a processor runs that task's child."""

    def before_insert(mapper: Any, connection: Any, target: Any) -> None:
        parent = current_task.get()
        if (
            parent is not None
            and hasattr(target, "parent_id")
            and target.parent_id is None
            and isinstance(parent, task_cls)
        ):
            target.parent_id = parent.id

    def after_write(mapper: Any, connection: Any, target: Any) -> None:
        if target.state in (TaskState.PENDING, None):
            session = object_session(target)
            if session is not None:
                notify_channels(session, [target.channel], connection)

    event.listen(task_cls, "before_insert", before_insert, propagate=True)
    event.listen(task_cls, "after_insert", after_write, propagate=True)
    event.listen(task_cls, "after_update", after_write, propagate=True)


listen_events(Task)

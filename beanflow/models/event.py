"""Event model: one row per task state transition (the task's history)."""

from __future__ import annotations

import enum
import uuid
from datetime import datetime
from typing import TYPE_CHECKING

from sqlalchemy import BigInteger, DateTime, Enum, ForeignKey, Identity, String, Text, func
from sqlalchemy.dialects.postgresql import UUID
from sqlalchemy.orm import Mapped, declared_attr, mapped_column, relationship

from .base import Base

if TYPE_CHECKING:
    from .task import Task


class EventType(str, enum.Enum):
    # PENDING -> PROCESSING: a worker claimed the task
    CLAIMED = "CLAIMED"
    # PROCESSING -> DONE
    COMPLETE = "COMPLETE"
    # PROCESSING -> PENDING with a later scheduled_at, by the retry policy
    FAILED_RETRY_SCHEDULED = "FAILED_RETRY_SCHEDULED"
    # PROCESSING -> FAILED
    FAILED = "FAILED"
    # PROCESSING -> PENDING without an attempt: its worker died or stopped before running it
    REQUEUED = "REQUEUED"
    # PENDING or PROCESSING -> CANCELLED (by an operator, or by its processor raising Cancel)
    CANCELLED = "CANCELLED"
    # PROCESSING -> PENDING at a later time, the attempt not counted: its processor raised Retry
    SNOOZED = "SNOOZED"
    # FAILED or CANCELLED -> PENDING by an operator (``beanflow retry``)
    RETRIED = "RETRIED"


class EventModelMixin:
    """Columns of an event row."""

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    type: Mapped[EventType] = mapped_column(
        Enum(EventType, native_enum=False, length=32), nullable=False
    )
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.clock_timestamp()
    )
    error_message: Mapped[str | None] = mapped_column(Text)
    exception_type: Mapped[str | None] = mapped_column(String)
    traceback: Mapped[str | None] = mapped_column(Text)
    # when the retry of a FAILED_RETRY_SCHEDULED event is due
    scheduled_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.id} {self.type}>"


class EventModelRefTaskMixin:
    """The task an event belongs to."""

    @declared_attr
    def task_id(cls) -> Mapped[uuid.UUID]:
        return mapped_column(
            UUID(as_uuid=True),
            ForeignKey("beanflow_tasks.id", ondelete="CASCADE"),
            nullable=False,
            index=True,
        )

    @declared_attr
    def task(cls) -> Mapped[Task]:
        return relationship("Task", back_populates="events")


class Event(EventModelMixin, EventModelRefTaskMixin, Base):
    __tablename__ = "beanflow_events"

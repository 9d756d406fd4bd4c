"""Worker model: one row per worker process, kept alive by its heartbeat."""

from __future__ import annotations

import enum
import uuid
from datetime import datetime
from typing import TYPE_CHECKING

from sqlalchemy import DateTime, Enum, Integer, String, func
from sqlalchemy.dialects.postgresql import ARRAY, UUID
from sqlalchemy.orm import Mapped, declared_attr, mapped_column, relationship

from .base import Base

if TYPE_CHECKING:
    from .task import Task


class WorkerState(str, enum.Enum):
    RUNNING = "RUNNING"
    # stopped cleanly (SIGTERM/SIGINT or end of a burst)
    SHUTDOWN = "SHUTDOWN"
    # found dead by another worker: its heartbeat was older than the timeout
    NO_HEARTBEAT = "NO_HEARTBEAT"


class WorkerModelMixin:
    """Columns of a worker row."""

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True, default=uuid.uuid4)
    name: Mapped[str] = mapped_column(String, nullable=False)
    pid: Mapped[int | None] = mapped_column(Integer)
    state: Mapped[WorkerState] = mapped_column(
        Enum(WorkerState, native_enum=False, length=16),
        nullable=False,
        default=WorkerState.RUNNING,
        server_default=WorkerState.RUNNING.value,
        index=True,
    )
    channels: Mapped[list[str]] = mapped_column(ARRAY(String), nullable=False)
    last_heartbeat: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now()
    )
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now()
    )

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.id} {self.name} {self.state}>"


class WorkerRefMixin:
    """The worker's tasks (the reverse of TaskModelRefWorkerMixin.worker)."""

    @declared_attr
    def tasks(cls) -> Mapped[list[Task]]:
        return relationship("Task", back_populates="worker", passive_deletes=True)


class Worker(WorkerModelMixin, WorkerRefMixin, Base):
    __tablename__ = "beanflow_workers"

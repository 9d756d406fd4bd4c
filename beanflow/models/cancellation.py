"""Cancellation: a request to cancel a running task, until its worker (or, if that worker
died, the one that reaps it) acts on it."""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import DateTime, String, func
from sqlalchemy.dialects.postgresql import UUID
from sqlalchemy.orm import Mapped, mapped_column

from .base import Base


class Cancellation(Base):
    """One row per running task asked to stop: its worker is notified at once, and a task whose
    worker dies before acting on it becomes CANCELLED instead of being re-queued. Rows of tasks
    that have ended are removed by retention."""

    __tablename__ = "beanflow_cancellations"

    task_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    requested_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now()
    )
    requested_by: Mapped[str] = mapped_column(String, nullable=False)

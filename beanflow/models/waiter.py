"""Waiter: a client waiting for a task to end (``beanflow submit --wait``)."""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import DateTime, func
from sqlalchemy.dialects.postgresql import UUID
from sqlalchemy.orm import Mapped, mapped_column

from .base import Base

# the channel on which a worker announces the end of a waited-for task (payload: its id)
DONE_CHANNEL = "beanflow_done"


class Waiter(Base):
    """One row per task someone waits for: the statement that completes or settles the task
    also notifies DONE_CHANNEL, so the waiter sleeps on LISTEN instead of polling. Rows of
    tasks that have ended are removed by the waiter, or else by retention."""

    __tablename__ = "beanflow_waiters"

    task_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    since: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now()
    )

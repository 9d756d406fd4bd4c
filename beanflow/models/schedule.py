"""ScheduleState: what the schedulers know of each cron schedule, shared by all of them."""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import DateTime, String, func
from sqlalchemy.dialects.postgresql import UUID
from sqlalchemy.orm import Mapped, mapped_column

from .base import Base


class ScheduleState(Base):
    """One row per schedule name: when any scheduler first saw it (catch-up never reaches
    back past that moment), and its latest tick enqueued."""

    __tablename__ = "beanflow_schedules"

    name: Mapped[str] = mapped_column(String, primary_key=True)
    first_seen: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now()
    )
    last_tick: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_task_id: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True))

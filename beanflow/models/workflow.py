"""Workflow runs and their steps: what a declared workflow's progression reads and writes.

A run is one row; each task a step releases is one step row (a fan-out step has one per
element), inserted in the transaction that releases it, keyed by (run, step, index) so that a
step is never released twice. A step decided without a task (skipped by its condition, or a
fan-out over an empty list) has one row with index -1 and its ``outcome``.

A fan-out step's elements are counted down in tallies, one row per slot (an element's slot is
its index modulo ``TALLY_SLOTS``). Workers claim neighbouring elements, which fall in different
slots: workers ending elements of one fan-out do not wait for each other (up to 64 elements in
their open transactions), and only the last element of a slot takes the run's lock.
"""

from __future__ import annotations

import enum
import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import DateTime, Enum, ForeignKey, Index, Integer, String, Text, func, text
from sqlalchemy.dialects.postgresql import JSONB, UUID
from sqlalchemy.orm import Mapped, mapped_column

from .base import Base


class RunState(str, enum.Enum):
    RUNNING = "RUNNING"
    DONE = "DONE"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"


class StepOutcome(str, enum.Enum):
    """How a step ended without running a task."""

    SKIPPED = "SKIPPED"  # its condition was false
    EMPTY = "EMPTY"  # a fan-out over an empty list


class WorkflowRun(Base):
    """One run of a declared workflow: its input, state, result or error."""

    __tablename__ = "beanflow_workflow_runs"

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True, default=uuid.uuid4)
    workflow: Mapped[str] = mapped_column(String, nullable=False)
    state: Mapped[RunState] = mapped_column(
        Enum(RunState, native_enum=False, length=16), nullable=False, default=RunState.RUNNING
    )
    input: Mapped[Any] = mapped_column(JSONB, nullable=False, default=dict)
    result: Mapped[Any] = mapped_column(JSONB(none_as_null=True), nullable=True)
    error: Mapped[str | None] = mapped_column(Text)
    failed_step: Mapped[str | None] = mapped_column(String)
    # at most one run per key: a second start with the key returns the first run
    unique_key: Mapped[str | None] = mapped_column(String)
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now()
    )
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        Index("ix_beanflow_workflow_runs_created", "created_at", "id"),
        Index(  # retention
            "ix_beanflow_workflow_runs_finished",
            "finished_at",
            postgresql_where=text("finished_at IS NOT NULL"),
        ),
        Index(
            "ix_beanflow_workflow_runs_running",
            "id",
            postgresql_where=text("state = 'RUNNING'"),
        ),
        Index(
            "ix_beanflow_workflow_runs_unique_key",
            "unique_key",
            unique=True,
            postgresql_where=text("unique_key IS NOT NULL"),
        ),
    )


class WorkflowStep(Base):
    """One task of a step of a run (or how a step ended without one)."""

    __tablename__ = "beanflow_workflow_steps"

    run_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True),
        ForeignKey("beanflow_workflow_runs.id", ondelete="CASCADE"),
        primary_key=True,
    )
    step: Mapped[str] = mapped_column(String, primary_key=True)
    index: Mapped[int] = mapped_column(Integer, primary_key=True)  # the element; -1: no task
    task_id: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True), index=True)
    outcome: Mapped[StepOutcome | None] = mapped_column(
        Enum(StepOutcome, native_enum=False, length=16)
    )
    released_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.clock_timestamp()
    )


TALLY_SLOTS = 64  # tallies of a fan-out step: at most this many, element index % TALLY_SLOTS


class WorkflowTally(Base):
    """How many elements of a fan-out step, in one slot, have not ended DONE."""

    __tablename__ = "beanflow_workflow_tallies"

    run_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True),
        ForeignKey("beanflow_workflow_runs.id", ondelete="CASCADE"),
        primary_key=True,
    )
    step: Mapped[str] = mapped_column(String, primary_key=True)
    slot: Mapped[int] = mapped_column(Integer, primary_key=True)  # element index % TALLY_SLOTS
    open: Mapped[int] = mapped_column(Integer, nullable=False)

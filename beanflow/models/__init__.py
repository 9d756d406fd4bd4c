"""SQLAlchemy models and mixins of tasks, workers and events; the schedules' state."""

from .base import Base
from .cancellation import Cancellation
from .event import Event, EventModelMixin, EventModelRefTaskMixin, EventType
from .schedule import ScheduleState
from .task import (
    FINAL_STATES,
    Task,
    TaskModelMixin,
    TaskModelRefEventMixin,
    TaskModelRefParentMixin,
    TaskModelRefWorkerMixin,
    TaskModelRefWorkflowMixin,
    TaskState,
    listen_events,
)
from .waiter import DONE_CHANNEL, Waiter
from .worker import Worker, WorkerModelMixin, WorkerRefMixin, WorkerState
from .workflow import RunState, StepOutcome, WorkflowRun, WorkflowStep, WorkflowTally

__all__ = [
    "Base",
    "Cancellation",
    "DONE_CHANNEL",
    "Event",
    "EventModelMixin",
    "EventModelRefTaskMixin",
    "EventType",
    "FINAL_STATES",
    "ScheduleState",
    "Task",
    "TaskModelMixin",
    "TaskModelRefEventMixin",
    "TaskModelRefParentMixin",
    "TaskModelRefWorkerMixin",
    "TaskModelRefWorkflowMixin",
    "TaskState",
    "Waiter",
    "Worker",
    "WorkerModelMixin",
    "WorkerRefMixin",
    "WorkerState",
    "RunState",
    "StepOutcome",
    "WorkflowRun",
    "WorkflowStep",
    "WorkflowTally",
    "listen_events",
]

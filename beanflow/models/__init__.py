"""SQLAlchemy models and mixins of tasks, workers and events; the schedules' state."""

from .base import Base
from .event import Event, EventModelMixin, EventModelRefTaskMixin, EventType
from .schedule import ScheduleState
from .task import (
    Task,
    TaskModelMixin,
    TaskModelRefEventMixin,
    TaskModelRefParentMixin,
    TaskModelRefWorkerMixin,
    TaskState,
    listen_events,
)
from .worker import Worker, WorkerModelMixin, WorkerRefMixin, WorkerState

__all__ = [
    "Base",
    "Event",
    "EventModelMixin",
    "EventModelRefTaskMixin",
    "EventType",
    "ScheduleState",
    "Task",
    "TaskModelMixin",
    "TaskModelRefEventMixin",
    "TaskModelRefParentMixin",
    "TaskModelRefWorkerMixin",
    "TaskState",
    "Worker",
    "WorkerModelMixin",
    "WorkerRefMixin",
    "WorkerState",
    "listen_events",
]

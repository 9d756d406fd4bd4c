"""beanflow: a PostgreSQL-native task queue (BeanQueue-compatible) and workflow runner."""

from . import models
from .app import BeanQueue, enqueue, enqueue_many
from .config import Config, ConfigError
from .models import (
    Event,
    EventModelMixin,
    EventModelRefTaskMixin,
    EventType,
    Task,
    TaskModelMixin,
    TaskModelRefEventMixin,
    TaskModelRefParentMixin,
    TaskModelRefWorkerMixin,
    TaskState,
    Worker,
    WorkerModelMixin,
    WorkerRefMixin,
    WorkerState,
)
from .processors import (
    DelayRetry,
    ExponentialBackoffRetry,
    LimitAttempt,
    Processor,
    ProcessorRegistry,
    processor,
)
from .spec import SpecError, load

__all__ = [
    "BeanQueue",
    "Config",
    "ConfigError",
    "DelayRetry",
    "Event",
    "EventModelMixin",
    "EventModelRefTaskMixin",
    "EventType",
    "ExponentialBackoffRetry",
    "LimitAttempt",
    "Processor",
    "ProcessorRegistry",
    "SpecError",
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
    "enqueue",
    "enqueue_many",
    "load",
    "models",
    "processor",
]

"""beanflow: a PostgreSQL-native task queue (BeanQueue-compatible) and workflow runner."""

from . import models
from .app import BeanQueue
from .config import Config
from .deployment import Deployment, enqueue, enqueue_many, run_deployment
from .errors import (
    BeanflowError,
    Cancel,
    ConfigError,
    KwargsError,
    ProcessorNotFound,
    Retry,
    SpecError,
)
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
    complete,
    fail,
    processor,
)
from .spec import load

__all__ = [
    "BeanQueue",
    "BeanflowError",
    "Cancel",
    "Config",
    "ConfigError",
    "DelayRetry",
    "Deployment",
    "Event",
    "EventModelMixin",
    "EventModelRefTaskMixin",
    "EventType",
    "ExponentialBackoffRetry",
    "KwargsError",
    "LimitAttempt",
    "Processor",
    "ProcessorNotFound",
    "ProcessorRegistry",
    "Retry",
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
    "complete",
    "enqueue",
    "enqueue_many",
    "fail",
    "load",
    "models",
    "processor",
    "run_deployment",
]

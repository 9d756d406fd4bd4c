"""Processor: a registered function, how to call it, and whether a failure is retried."""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable
from typing import Any

from ..errors import KwargsError, NotCompleted, TaskFailed
from ..models.jsonb import Unreadable, jsonb_text
from ..models.task import Task, check_channel, current_task
from .retry import RetryPolicy

# Parameters beanflow fills in by name; every other parameter comes from the task's kwargs.
INJECTED = ("db", "task", "savepoint")

# a task row carries its arguments; bulk data belongs in the user's tables, referenced by id
MAX_KWARGS_CHARS = 1_000_000

ExceptionTypes = type[BaseException] | tuple[type[BaseException], ...]


def why_not_a_processor(func: Callable[..., Any]) -> str | None:
    """Why ``func`` cannot be a processor (None: it can). A worker calls it and stores what
    it returns: an ``async def`` or a generator function would return an object that never
    ran."""
    name = getattr(func, "__qualname__", repr(func))
    if inspect.iscoroutinefunction(func) or inspect.isasyncgenfunction(func):
        return (
            f"{name} is an async function: a worker calls processors synchronously, so its "
            "body would never run; define it with def (and call asyncio.run() inside it)"
        )
    if inspect.isgeneratorfunction(func):
        return (
            f"{name} is a generator function (it yields): a worker calls processors and "
            "stores what they return, so its body would never run; return a value instead"
        )
    try:
        parameters = inspect.signature(func).parameters.values()
    except (TypeError, ValueError):  # a callable whose signature cannot be read: let it be
        return None
    positional = [
        p.name
        for p in parameters
        if p.kind is p.POSITIONAL_ONLY and p.default is p.empty and p.name not in INJECTED
    ]
    if positional:
        return (
            f"{name} has required positional-only parameters ({', '.join(positional)}): a "
            "task passes its kwargs by name"
        )
    return None


class Processor:
    """A function registered to run tasks of one channel.

    Calling the processor calls the function; ``run(**kwargs)`` builds an unsaved task for it.
    """

    def __init__(
        self,
        func: Callable[..., Any],
        channel: str,
        *,
        retry_policy: RetryPolicy | None = None,
        retry_exceptions: ExceptionTypes | None = None,
        auto_complete: bool = True,
        timeout: float | None = None,
        task_model: type | None = None,
    ) -> None:
        check_channel(channel)
        why_not = why_not_a_processor(func)
        if why_not is not None:
            raise TypeError(why_not)
        self.func = func
        self.channel = channel
        self.module = func.__module__
        self.name = func.__name__
        self.retry_policy = retry_policy
        self.retry_exceptions = retry_exceptions
        self.auto_complete = auto_complete
        # seconds a task may run before it is interrupted and failed (enforced by a worker
        # running in its process's main thread, as `beanflow process` and `run` do)
        self.timeout = timeout
        # the Task model that run() builds; None means beanflow.Task (an app sets its own)
        self.task_model = task_model
        signature = inspect.signature(func)
        self._injected = [name for name in INJECTED if name in signature.parameters]
        # a function given neither the session nor the task cannot write in the task's
        # transaction: the worker then needs no savepoint around it
        self.uses_session = bool(self._injected)
        self._signature = signature.replace(
            parameters=[p for n, p in signature.parameters.items() if n not in INJECTED]
        )
        self._fitting_keys: set[frozenset[str]] = set()
        functools.update_wrapper(self, func)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.func(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<Processor {self.channel}:{self.module}.{self.name}>"

    def check_kwargs(self, kwargs: Any) -> str:
        """The JSON text of ``kwargs``; raises KwargsError naming what is wrong unless they can
        be stored as a task's arguments and fit the function's signature."""
        if not isinstance(kwargs, dict):
            raise KwargsError(f"kwargs must be a JSON object, got {type(kwargs).__name__}")
        try:
            text = jsonb_text(kwargs, "kwargs")
        except ValueError as error:
            raise KwargsError(f"kwargs cannot be stored as JSON: {error}") from None
        if len(text) > MAX_KWARGS_CHARS:
            raise KwargsError(
                f"kwargs are {len(text):,} characters of JSON; the limit is "
                f"{MAX_KWARGS_CHARS:,} (keep large data in your own tables)"
            )
        keys = frozenset(kwargs)
        if keys in self._fitting_keys:  # keyword arguments fit or not by their names alone
            return text
        try:
            self._signature.bind(**kwargs)
        except TypeError as error:
            parameters = ", ".join(
                str(p.replace(annotation=inspect.Parameter.empty))
                for p in self._signature.parameters.values()
            )
            raise KwargsError(f"kwargs do not fit {self.name}({parameters}): {error}") from None
        self._fitting_keys.add(keys)
        return text

    def run(self, **kwargs: Any) -> Any:
        """Return a new, unsaved task that calls this processor with ``kwargs``."""
        self.check_kwargs(kwargs)
        return self.task_class(
            channel=self.channel, module=self.module, name=self.name, kwargs=kwargs
        )

    @property
    def task_class(self) -> type:
        """The Task model of this processor's tasks (``task_model``, or beanflow.Task)."""
        return self.task_model or Task

    def call(self, db: Any, task: Any, savepoint: Any) -> Any:
        """Call the function for ``task`` and flush its changes to ``db`` (tasks it enqueued
        become its children); returns the result to store. The function may decide the outcome
        itself with ``complete(task, result)`` or ``fail(task, message)``; with
        ``auto_complete`` off it must."""
        if not isinstance(task.kwargs, dict):  # a row written in SQL
            if isinstance(task.kwargs, Unreadable):
                raise KwargsError(f"kwargs cannot be read: {task.kwargs.reason}")
            raise KwargsError(f"kwargs must be a JSON object, got {type(task.kwargs).__name__}")
        available = {"db": db, "task": task, "savepoint": savepoint}
        arguments = {name: available[name] for name in self._injected}
        token = current_task.set(task)
        try:
            result = self.func(**task.kwargs, **arguments)
            if self.uses_session:
                db.flush()  # while it is the current task, so new tasks become its children
        finally:
            current_task.reset(token)
        outcome = task.__dict__.pop(_OUTCOME, None)
        if isinstance(outcome, TaskFailed):
            raise outcome
        if outcome is not None:
            return outcome.result
        if not self.auto_complete:
            raise NotCompleted(
                f"{self.name} returned without completing its task: with auto_complete off, "
                "call beanflow.complete(task, result) or beanflow.fail(task, message) first"
            )
        return result

    def retry_at(self, task: Any, error: BaseException) -> Any:
        """When to retry ``task`` after ``error`` (a datetime or SQL expression), or None."""
        if self.why_not_retried(error) is not None:
            return None
        return self.retry_policy(task)  # type: ignore[misc]

    def why_not_retried(self, error: BaseException) -> str | None:
        """Why no attempt follows ``error`` whatever the task's attempts (None: the policy
        decides)."""
        if self.retry_policy is None:
            return "not retried: the processor has no retry policy"
        if self.retry_exceptions is not None and not isinstance(error, self.retry_exceptions):
            return f"not retried: {type(error).__name__} is not in the policy's exceptions"
        return None

    @property
    def max_attempts(self) -> int | None:
        """The most attempts its retry policy allows (None: no limit it states)."""
        return getattr(self.retry_policy, "maximum_attempt", None)


# where complete() and fail() leave a task's outcome for its worker
_OUTCOME = "_beanflow_outcome"


@dataclasses.dataclass
class _Completed:
    result: Any


def complete(task: Any, result: Any = None) -> None:
    """Decide that ``task`` is DONE with ``result`` once its processor returns (what its
    return value would say otherwise). Its completion commits, as always, with the task's own
    changes; for a processor with ``auto_complete`` off, this (or ``fail``) is how it ends."""
    task.__dict__[_OUTCOME] = _Completed(result)


def fail(task: Any, message: str) -> None:
    """Decide that ``task`` failed with ``message`` once its processor returns, as if it had
    raised: its changes are rolled back and its retry policy decides what comes next."""
    task.__dict__[_OUTCOME] = TaskFailed(message)

"""A task's outcome, recorded in its worker's open transaction: the JSON of the result it
returned, or its failure, with the retry its processor's policy decides."""

from __future__ import annotations

import contextlib
import logging
import traceback
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import exc, select
from sqlalchemy.orm import Session
from sqlalchemy.sql import ClauseElement

from ..errors import Cancel, Retry, first_line, refused_for_now
from ..models.jsonb import jsonb_text, storable_text
from ..models.task import LATEST_DUE, as_due_time
from ..processors.processor import Processor
from .deadlines import TaskCancelled
from .queries import Queries

logger = logging.getLogger(__name__)


# what is stored of a task's outcome: a result bigger than this fails the task (keep bulk data
# in your own tables); an error message and a traceback are cut to these lengths
MAX_RESULT_CHARS = 10_000_000
MAX_ERROR_CHARS = 10_000
MAX_TRACEBACK_CHARS = 100_000


class ResultNotStorable(ValueError):
    """A task returned a value that cannot be stored as its JSON result."""


def result_json(result: Any) -> str | None:
    """The result as JSON text (None stays NULL); raises ResultNotStorable saying why not."""
    if result is None:
        return None
    try:
        text = jsonb_text(result, "result")
    except ValueError as error:
        raise ResultNotStorable(f"the task's result cannot be stored as JSON: {error}") from None
    if len(text) > MAX_RESULT_CHARS:
        raise ResultNotStorable(
            f"the task's result is {len(text):,} characters of JSON; the limit is "
            f"{MAX_RESULT_CHARS:,} (keep large data in your own tables)"
        )
    return text


def describe(error: BaseException) -> str:
    """``Type: message`` of an exception, even one whose ``str()`` raises."""
    try:
        message = str(error)
    except Exception as failure:  # noqa: BLE001 - the user's __str__ is code too
        message = f"<its message could not be read: str() raised {type(failure).__name__}>"
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


_PACKAGE = str(Path(__file__).resolve().parent.parent)


def _traceback(error: BaseException) -> str:
    """The traceback from the task's own code on (beanflow's frames above it left out)."""
    try:
        frames = error.__traceback__
        while (
            frames is not None
            and frames.tb_next is not None
            and frames.tb_frame.f_code.co_filename.startswith(_PACKAGE)
        ):
            frames = frames.tb_next
        return "".join(traceback.format_exception(type(error), error, frames))
    except Exception as failure:  # noqa: BLE001
        return f"<the traceback could not be formatted: {type(failure).__name__}>"


def undo(savepoint: Any) -> None:
    """Roll a task's savepoint (if it has one) back, unless the task already did (or a failed
    flush did: the savepoint is then inactive but still to be rolled back)."""
    if savepoint is not None:
        with contextlib.suppress(exc.ResourceClosedError):
            savepoint.rollback()


def record_failure(
    session: Session,
    queries: Queries,
    worker_id: uuid.UUID,
    task: Any,
    processor: Processor | None,
    error: BaseException,
) -> str:
    """Record how ``task``'s attempt ended without completing, and return that outcome:
    "cancelled" (its processor raised Cancel, or an operator cancelled it), "snoozed" (it
    raised Retry: PENDING again later, the attempt not counted), "retried" (PENDING at the
    time its retry policy gives) or "failed"; with the error and its traceback."""
    retry_at, refund, why = None, 0, ""
    if isinstance(error, (Cancel, TaskCancelled)):
        outcome, state = "cancelled", "CANCELLED"
    elif isinstance(error, Retry):
        retry_at = _due_after(error.after)
        if retry_at is not None:
            outcome, state, refund = "snoozed", "PENDING", 1
        else:
            outcome, state = "failed", "FAILED"
            why = f" (not snoozed: later than a task can be due, {LATEST_DUE:%Y-%m-%d})"
    else:
        retry_at, why = _retry_at(session, task, processor, error)
        outcome, state = ("failed", "FAILED") if retry_at is None else ("retried", "PENDING")
    message = storable_text(describe(error) + why, MAX_ERROR_CHARS)
    kind = type(error)
    session.execute(
        queries.settle,
        {
            "task_id": task.id,
            "worker": worker_id,
            "state": state,
            "event": _EVENTS[outcome],
            "refund": refund,
            "retry_at": retry_at,
            "error": message,
            "exception_type": storable_text(f"{kind.__module__}.{kind.__qualname__}", 1000),
            "traceback": storable_text(_traceback(error), MAX_TRACEBACK_CHARS),
        },
    )
    _log(task, processor, outcome, retry_at, message, error)
    return outcome


def _log(
    task: Any,
    processor: Processor | None,
    outcome: str,
    retry_at: Any,
    message: str,
    error: BaseException,
) -> None:
    """One line saying how the attempt ended and what follows, with the task's fields (JSON
    logs) and, for a task that fails for good, its traceback."""
    limit = processor.max_attempts if processor is not None else None
    attempt = f"attempt {task.attempts}" + (f"/{limit}" if limit else "")
    fields = {
        "task_id": str(task.id),
        "processor": f"{task.module}.{task.name}",
        "channel": task.channel,
        "attempt": task.attempts,
        "state": outcome,
    }
    where = f"task {task.id} {task.module}.{task.name}"
    if outcome == "failed":
        why = processor.why_not_retried(error) if processor is not None else None
        if why is None:
            why = f"giving up after {attempt}" if limit else "its retry policy gives up"
        logger.error(
            "%s failed, %s; %s: %s", where, attempt, why, message, extra=fields, exc_info=error
        )
    elif outcome == "cancelled":
        logger.warning("%s %s", where, message, extra=fields)
    elif outcome == "snoozed":
        logger.info(
            "%s snoozed (%s not counted), again at %s", where, attempt, retry_at, extra=fields
        )
    else:
        logger.warning(
            "%s failed, %s, next at %s: %s", where, attempt, retry_at, message, extra=fields
        )


_EVENTS = {
    "cancelled": "CANCELLED",
    "snoozed": "SNOOZED",
    "retried": "FAILED_RETRY_SCHEDULED",
    "failed": "FAILED",
}


def _retry_at(
    session: Session, task: Any, processor: Processor | None, error: BaseException
) -> tuple[Any, str]:
    """When its processor's retry policy runs ``task`` again after ``error`` (None: never),
    and, when the policy itself failed, why it is not retried (to add to the error message)."""
    if processor is None:
        return None, ""
    try:
        retry_at = processor.retry_at(task, error)
        if isinstance(retry_at, ClauseElement):
            with session.begin_nested():  # an expression the server refuses spoils nothing
                retry_at = session.scalar(select(retry_at))
    except Exception as policy_error:  # noqa: BLE001 - a policy is the user's code
        if refused_for_now(policy_error):  # the server's refusal, not the policy's fault
            raise
        problem = f"raised {type(policy_error).__name__}: {first_line(policy_error)}"
    else:
        if retry_at is None:
            return None, ""
        if not isinstance(retry_at, datetime):
            problem = f"gave {_shown(retry_at)}, not a time (a datetime or a SQL expression)"
        elif as_due_time(retry_at) is None:
            problem = f"gave {retry_at}: no task can be due then"
        else:
            return retry_at, ""
    logger.error("retry policy of %s %s", processor, problem)
    return None, f" (not retried: its retry policy {problem})"


def _shown(value: Any) -> str:
    """A short ``repr`` of a value a policy gave (even one whose ``repr`` raises)."""
    try:
        text = repr(value)
    except Exception:  # noqa: BLE001 - the user's __repr__ is code too
        text = f"a {type(value).__name__}"
    return text if len(text) <= 100 else f"{text[:100]}…"


def _due_after(delay: timedelta) -> datetime | None:
    """Now plus ``delay``, or None when no task can be due then."""
    try:
        return as_due_time(datetime.now(timezone.utc) + delay)
    except OverflowError:
        return None

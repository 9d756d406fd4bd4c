"""A task's outcome, recorded in its worker's open transaction: the JSON of the result it
returned, or its failure, with the retry its processor's policy decides."""

from __future__ import annotations

import contextlib
import logging
import traceback
import uuid
from typing import Any

from sqlalchemy import exc, select
from sqlalchemy.orm import Session
from sqlalchemy.sql import ClauseElement

from ..models.jsonb import jsonb_text, storable_text
from ..processors.processor import Processor
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


def _traceback(error: BaseException) -> str:
    try:
        return "".join(traceback.format_exception(error))
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
) -> bool:
    """Record a failed attempt of ``task``: back to PENDING at the time its retry policy
    gives, or FAILED, with the error and its traceback. Returns True when it is retried."""
    retry_at = None
    if processor is not None:
        try:
            retry_at = processor.retry_at(task, error)
            if isinstance(retry_at, ClauseElement):
                retry_at = session.scalar(select(retry_at))
        except Exception as policy_error:  # noqa: BLE001
            logger.error("retry policy of %s failed: %s", processor, policy_error)
            retry_at = None
    message = storable_text(describe(error), MAX_ERROR_CHARS)
    kind = type(error)
    session.execute(
        queries.fail,
        {
            "task_id": task.id,
            "worker": worker_id,
            "retry_at": retry_at,
            "error": message,
            "exception_type": storable_text(f"{kind.__module__}.{kind.__qualname__}", 1000),
            "traceback": storable_text(_traceback(error), MAX_TRACEBACK_CHARS),
        },
    )
    where = f"task {task.id} {task.module}.{task.name}"
    if retry_at is None:
        logger.error("%s failed (attempt %d): %s", where, task.attempts, message)
    else:
        logger.warning(
            "%s failed (attempt %d), retry at %s: %s", where, task.attempts, retry_at, message
        )
    return retry_at is not None

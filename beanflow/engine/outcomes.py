"""A task's outcome, recorded in its worker's open transaction: the JSON of the result it
returned, or its failure, with the retry its processor's policy decides."""

from __future__ import annotations

import contextlib
import json
import logging
import traceback
import uuid
from typing import Any

from sqlalchemy import exc, select
from sqlalchemy.orm import Session
from sqlalchemy.sql import ClauseElement

from ..processors.processor import Processor
from .queries import Queries

logger = logging.getLogger(__name__)


def result_json(result: Any) -> str | None:
    """The result as JSON text (None stays NULL); raises TypeError if it is not JSON."""
    if result is None:
        return None
    try:
        return json.dumps(result)
    except (TypeError, ValueError) as error:
        raise TypeError(f"the task's result is not JSON-serialisable: {error}") from None


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
    message = f"{type(error).__name__}: {error}"
    session.execute(
        queries.fail,
        {
            "task_id": task.id,
            "worker": worker_id,
            "retry_at": retry_at,
            "error": message,
            "exception_type": f"{type(error).__module__}.{type(error).__qualname__}",
            "traceback": "".join(traceback.format_exception(error)),
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

"""The hot path's open transaction: the tasks run in it, and the recording of their outcomes.

Tasks finished in a batch are completed together, by one statement, when it commits. Nothing a
task returns or raises may stop that: an outcome the database refuses is isolated to its task
(failed, saying why), its neighbours are returned to the queue to run again, and the worker
goes on.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import uuid
from collections.abc import Callable
from typing import Any, NoReturn

from sqlalchemy import exc
from sqlalchemy.orm import Session

from ..errors import first_line
from ..processors.processor import Processor
from .connections import WorkerConnections
from .outcomes import record_failure
from .queries import Prepared, Queries

logger = logging.getLogger(__name__)


class ConnectionLost(Exception):
    """The hot-path connection died while a task ran or its outcome was being recorded."""


class BatchAborted(Exception):
    """The open transaction was rolled back because a task's outcome could not be recorded;
    the tasks of the batch have been dealt with (failed, or returned to the queue)."""


class OutcomeNotRecorded(Exception):
    """A task's completion could not be written (the database refused it)."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(f"its outcome could not be recorded: {first_line(error)}")


@dataclasses.dataclass
class Finished:
    """A task that returned in the open transaction, completed at its commit."""

    task: Any
    processor: Processor
    result: str | None  # JSON text


class Batch:
    """What ran in the open transaction, and how its outcomes are recorded."""

    def __init__(
        self,
        queries: Queries,
        complete: Prepared,
        worker_id: uuid.UUID,
        connections: WorkerConnections,
        release: Callable[[list[Any], list[Any]], None],
        counts: collections.Counter[str],
    ) -> None:
        self.queries, self.complete_statement, self.worker_id = queries, complete, worker_id
        self.connections, self.release, self.counts = connections, release, counts
        self.finished: list[Finished] = []  # completed at the commit
        self.started: list[Any] = []  # ids of the tasks run in it (charged if it dies)

    def reset(self) -> None:
        """The transaction ended (committed, or lost with its connection)."""
        self.finished, self.started = [], []

    def complete(self, session: Session) -> int:
        """Mark the finished tasks DONE with one statement (in a savepoint, which costs no
        round trip here); returns how many this worker still held. If the database refuses,
        find the tasks whose completion it refuses, roll the transaction back, fail those, and
        return the others to the queue (raises BatchAborted)."""
        finished, self.finished = self.finished, []
        try:
            with session.begin_nested():
                return self._complete(session, finished)
        except exc.DBAPIError as error:
            self._unless_lost(error)
        done, culprits = 0, []
        for entry in finished:
            try:
                with session.begin_nested():
                    done += self._complete(session, [entry])
            except exc.DBAPIError as error:
                self._unless_lost(error)
                culprits.append((entry, error))
        if not culprits:  # recorded one by one after all
            return done
        self.abort(
            session,
            [(entry.task, entry.processor, OutcomeNotRecorded(error)) for entry, error in culprits],
            [entry.task.id for entry in finished if all(entry is not c for c, _ in culprits)],
        )

    def _complete(self, session: Session, finished: list[Finished]) -> int:
        return session.execute(
            self.complete_statement.execute,
            {
                "task_ids": [entry.task.id for entry in finished],
                "task_results": [entry.result for entry in finished],
                "worker": self.worker_id,
            },
        ).scalar()

    def record_failure(
        self, session: Session, task: Any, processor: Processor | None, error: BaseException
    ) -> None:
        """Record a failed attempt in a savepoint; if even that is refused, abort the batch
        and charge the task a crash (MAX_WORKER_CRASHES ends it)."""
        try:
            with session.begin_nested():
                retried = record_failure(
                    session, self.queries, self.worker_id, task, processor, error
                )
        except exc.DBAPIError as refused:
            self._unless_lost(refused)
            logger.error(
                "task %s: its failure could not be recorded (%s); it is charged a crash",
                task.id,
                first_line(refused),
            )
            innocent = [entry.task.id for entry in self.finished]
            self.abort(session, [], innocent, charged=[task.id])
        self.counts["retried" if retried else "failed"] += 1

    def abort(
        self,
        session: Session,
        failures: list[tuple[Any, Processor | None, BaseException]],
        innocent: list[Any],
        charged: list[Any] = (),
    ) -> NoReturn:
        """Roll the open transaction (every task's changes in it) back, record ``failures``,
        and return the rest of what the worker holds to the queue: ``innocent`` task ids with
        their attempt given back (their run left no trace), ``charged`` ones charged a crash."""
        session.rollback()
        self.reset()
        for task, processor, error in failures:
            record_failure(session, self.queries, self.worker_id, task, processor, error)
            self.counts["failed"] += 1
        session.commit()
        session.expunge_all()
        self.release(list(charged), innocent)
        raise BatchAborted()

    def _unless_lost(self, error: BaseException) -> None:
        if self.connections.broken():
            raise ConnectionLost(first_line(error)) from None

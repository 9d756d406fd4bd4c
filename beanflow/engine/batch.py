"""The hot path's open transaction: the tasks run in it, and the recording of their outcomes.

Tasks finished in a batch are completed together, by one statement, when it commits. Nothing a
task returns or raises may stop that: an outcome the database refuses is isolated to its task
(failed, saying why), its neighbours are returned to the queue to run again, and the worker
goes on.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any, NoReturn, TypeVar

from sqlalchemy import exc, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from .. import db
from ..errors import first_line, refused_for_now
from ..models.jsonb import storable_text
from ..models.task import EARLIEST_DUE, LATEST_DUE
from ..processors.processor import Processor
from . import metrics
from .connections import ClaimStatement, WorkerConnections
from .outcomes import MAX_ERROR_CHARS, record_failure
from .queries import Prepared, Queries
from .queries.tasks import BEFORE_ANY_TASK

logger = logging.getLogger(__name__)

T = TypeVar("T")
_SAVEPOINT = "beanflow_outcome"


class ConnectionLost(Exception):
    """The hot-path connection died while a task ran or its outcome was being recorded."""


class BatchAborted(Exception):
    """The open transaction was rolled back because a task's outcome could not be recorded;
    the tasks of the batch have been dealt with (failed, or returned to the queue)."""


class OutcomeNotRecorded(Exception):
    """A task's completion could not be written (the database refused it)."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(f"its outcome could not be recorded: {first_line(error)}")


class TransactionEnded(Exception):
    """A task committed, rolled back or closed the session it shares with its batch."""


class TransactionAborted(Exception):
    """A task caught the error of a statement it ran and returned: PostgreSQL had aborted
    the transaction it shares with its batch."""


class TaskRowTaken(Exception):
    """A task's row was deleted, or given another worker, in the transaction it ran in."""


@dataclasses.dataclass
class Claim:
    """A claim a worker sends: its statement (a claim, or a completion and a claim), its
    claim's parameters, and up to how many tasks it claims."""

    statement: ClaimStatement
    parameters: dict[str, Any]
    size: int


@dataclasses.dataclass
class Finished:
    """A task that returned in the open transaction, completed at its commit."""

    task: Any
    processor: Processor
    result: str | None  # JSON text
    seconds: float  # how long it ran


class Pace:
    """How many tasks a worker claims at once, and when it commits early: learned from the
    durations of recent tasks, overall and of each processor.

    It claims as many as the recent tasks say will finish within the batch window, between 1
    and BATCH_SIZE: fast tasks make large batches (one commit for many), slow ones are claimed
    one at a time. Sizes are powers of two (or the maximum), so a worker prepares few claim
    statements. Before a task that its processor's durations (or their absence) say would
    end past the window, the worker commits what finished, so that a slow task does not hold
    its neighbours' results back."""

    SMOOTHING = 0.3  # weight of the newest duration in a moving average

    def __init__(self, window: float, maximum: int) -> None:
        self.window, self.maximum = window, maximum
        self.seconds: float | None = None  # moving average of recent task durations
        self.of: dict[Any, float] = {}  # the same, per processor

    def record(self, processor: Any, seconds: float) -> None:
        self.seconds = self._average(self.seconds, seconds)
        self.of[processor] = self._average(self.of.get(processor), seconds)

    def _average(self, previous: float | None, seconds: float) -> float:
        return seconds if previous is None else previous + self.SMOOTHING * (seconds - previous)

    def size(self) -> int:
        if self.seconds is None:
            # nothing known yet: the most; past the window, the watch gives the rest back
            return self.maximum
        fits = self.window / max(self.seconds, 1e-6)
        if fits >= self.maximum:
            return self.maximum
        return 1 << max(int(fits), 1).bit_length() - 1  # the power of two at or below

    def would_overrun(self, processor: Any, elapsed: float) -> bool:
        """Whether a task of ``processor``, started ``elapsed`` seconds into a batch, may end
        past its window (yes, when its processor has not been seen yet)."""
        expected = self.of.get(processor)
        return expected is None or elapsed + expected > self.window


class Frontier:
    """Where each channel's claim starts to read the pending-task index: at the oldest task
    the last claim took, rather than at the index's first entry.

    A claimed task's entry stays in that index, marked dead, until a VACUUM, and a claim that
    starts from the first entry walks all of them: after 180,000 claims with no VACUUM (a
    fresh deployment, autovacuum behind), ~770 index pages per claim. From the frontier it
    skips them. A task behind the frontier (committed late with an older ``scheduled_at``, or
    given back to the queue) is taken by a claim from the start, made every ``FULL_EVERY``
    claims and after any claim that found fewer tasks than it asked for."""

    FULL_EVERY = 16

    def __init__(self, channels: list[str]) -> None:
        self.channels = channels
        self.floors = dict.fromkeys(channels, BEFORE_ANY_TASK)
        self.claims = 0

    def parameters(self) -> dict[str, datetime.datetime]:
        """The next claim's ``floor_N`` parameters."""
        self.claims += 1
        full = self.claims % self.FULL_EVERY == 0
        return {
            f"floor_{i}": BEFORE_ANY_TASK if full else self.floors[channel]
            for i, channel in enumerate(self.channels)
        }

    def claimed(self, tasks: list[Any], asked: int) -> None:
        """Move each channel's frontier to the oldest task claimed from it (all back to the
        start when the claim found fewer than ``asked``)."""
        if len(tasks) < asked:
            self.floors = dict.fromkeys(self.channels, BEFORE_ANY_TASK)
            return
        oldest: dict[str, datetime.datetime] = {}
        for task in tasks:
            if task.channel not in oldest or task.scheduled_at < oldest[task.channel]:
                oldest[task.channel] = task.scheduled_at
        self.floors |= oldest


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
        self.failed: list[Any] = []  # tasks failed or cancelled for good in it
        self.ended: list[tuple[Any, str]] = []  # the other attempts that ended in it, and how

    def reset(self) -> None:
        """The transaction ended (committed, or lost with its connection)."""
        self.finished, self.started, self.failed, self.ended = [], [], [], []

    def count(self, done: list[Finished]) -> None:
        """The transaction committed with ``done``: count what ended in it (the worker's
        summary, metrics); what a rolled-back transaction ended is not counted."""
        self.counts["done"] += len(done)
        for _, outcome in self.ended:
            self.counts[outcome] += 1
        if metrics.enabled():
            for entry in done:
                metrics.task_ended(entry.task, "done", entry.seconds)
            for task, outcome in self.ended:
                metrics.task_ended(task, outcome)

    def complete(
        self, session: Session, claim: Claim | None = None
    ) -> tuple[int, list[Any], list[Any]]:
        """Mark the finished tasks DONE with one statement; with ``claim`` (a statement of
        ``WorkerConnections.complete_and_claim``) the same statement claims the next tasks.
        Returns how many this worker still held, the values of the statement's
        ``completion_columns`` (for the task-end hooks), and the tasks claimed. If the database
        refuses, roll back, find the tasks whose DONE it refuses, fail those, and return the
        others to the queue to run again (raises BatchAborted); if it is the claim that fails
        (a due row it cannot take), fail the rows at fault instead (``fail_unclaimable``)."""
        finished, self.finished = self.finished, []
        ids = [entry.task.id for entry in finished]
        results = [entry.result for entry in finished]
        try:
            if claim is None:
                row = self._execute(session, ids, results)
                return row[0], list(row[1 : 1 + len(self.queries.completion_columns)]), []
            parameters = claim.parameters | self._parameters(ids, results)
            (held, *computed), tasks = claim.statement.run(session, parameters)
            return held, computed, tasks
        except Exception as error:  # noqa: BLE001 - loading a claimed row may raise anything
            if claim is None and not isinstance(error, exc.DBAPIError):
                raise
            self._unless_lost(error)
            refused = error
        session.rollback()
        if refused_for_now(refused):  # no row's fault: they run again, after the loop's pause
            self.abort(session, [], list(self.started), raising=refused)
        alone = len(ids) == 1 and claim is None
        culprits = {ids[0]: refused} if alone else self._probe(session, ids, results)
        if not culprits and claim is not None and self.fail_unclaimable(session, claim):
            self.abort(session, [], list(self.started))  # none of theirs: they run again
        if not culprits:
            # refused only together with the tasks' own writes (their run is rolled back):
            # each is charged, so that it runs again alone, and the culprit ends by its crashes
            self.abort(session, [], [], charged=ids)
        failures = [
            (entry.task, entry.processor, OutcomeNotRecorded(culprits[task_id]))
            for entry, task_id in zip(finished, ids, strict=True)
            if task_id in culprits
        ]
        self.abort(session, failures, [task_id for task_id in ids if task_id not in culprits])

    def unless_taken_by_themselves(self, session: Session, finished: list[Finished]) -> None:
        """Some of the ``finished`` tasks were not this worker's to complete any more. If this
        worker was not found dead (its row still says RUNNING), it was their own doing, in
        this transaction (a processor deleted its task's row, or changed its worker): fail
        those, return the others to the queue to run again (raises BatchAborted). Otherwise,
        return: the caller rolls back and stops."""
        w, t = self.queries.worker, self.queries.task
        state = session.scalar(select(w.c.state).where(w.c.id == self.worker_id))
        if state != "RUNNING":
            return
        ids = [entry.task.id for entry in finished]
        held = select(t.c.id).where(t.c.id.in_(ids), t.c.worker_id == self.worker_id)
        still = set(session.scalars(held))
        error = TaskRowTaken(
            "its row was deleted, or given another worker, in the transaction it ran in "
            "(a processor must not delete or reassign its own task)"
        )
        failures = [(e.task, e.processor, error) for e in finished if e.task.id not in still]
        taken = {task.id for task, _, _ in failures}
        self.abort(session, failures, [i for i in self.started if i not in taken])

    def claim_refused(self, session: Session, claim: Claim, error: Exception) -> NoReturn:
        """``claim`` failed, and not for a lost connection: roll the open transaction back,
        fail the due rows at fault (``fail_unclaimable``) and return the tasks run in it to
        the queue with their attempt given back (raises BatchAborted). When no row is at
        fault, re-raise ``error``."""
        self._unless_lost(error)
        session.rollback()
        if refused_for_now(error):  # no row's fault: claim again after the loop's pause
            self.abort(session, [], list(self.started), raising=error)
        if not self.fail_unclaimable(session, claim):
            raise error
        self.abort(session, [], list(self.started))

    def fail_unclaimable(self, session: Session, claim: Claim) -> int:
        """After ``claim`` failed: claim alone each task it would choose from, in a savepoint
        rolled back at once, and fail each one whose claim fails (a count at the top of its
        range, a user's trigger or check, a column its type cannot read), saying why: a row
        that no claim can take must not stall its channel. Commits; returns how many failed."""
        refused = {}
        claim_one = select(self.connections.model).from_statement(self.queries.claim_one)
        candidates = self.queries.claimable_up_to(claim.size)
        for task_id in session.scalars(candidates, claim.parameters).all():
            savepoint = session.begin_nested()
            try:
                session.execute(claim_one, {"task_id": task_id, "worker": self.worker_id}).all()
            except Exception as error:  # noqa: BLE001 - whatever the row makes the claim raise
                self._unless_lost(error)
                if refused_for_now(error):
                    raise
                refused[task_id] = error
            savepoint.rollback()
        session.expunge_all()
        failed = 0
        for task_id, error in refused.items():
            message = storable_text(f"it cannot be claimed: {first_line(error)}", MAX_ERROR_CHARS)
            kind = type(error)
            parameters = {
                "task_id": task_id,
                "error": message,
                "exception_type": f"{kind.__module__}.{kind.__qualname__}",
                "earliest": EARLIEST_DUE,
                "latest": LATEST_DUE,
            }
            try:
                self._guarded(
                    session, partial(session.execute, self.queries.fail_unclaimable, parameters)
                )
            except exc.DBAPIError as refusal:  # a trigger or check of the user's, say
                logger.error(
                    "task %s: %s; nor can it be failed (%s): correct or delete its row",
                    task_id,
                    message,
                    first_line(refusal),
                )
                continue
            logger.error("task %s failed: %s", task_id, message)
            failed += 1
        session.commit()
        return failed

    def _probe(
        self, session: Session, ids: list[Any], results: list[str | None]
    ) -> dict[Any, BaseException]:
        """Which of the tasks ``ids`` the database refuses to mark DONE with their ``results``,
        each tried alone in a transaction that is rolled back."""
        refused = {}
        for task_id, result in zip(ids, results, strict=True):
            try:
                self._guarded(session, partial(self._execute, session, [task_id], [result]))
            except exc.DBAPIError as error:
                if refused_for_now(error):
                    raise
                refused[task_id] = error
        session.rollback()
        return refused

    def _execute(self, session: Session, ids: list[Any], results: list[str | None]) -> Any:
        """``complete``'s row: how many it marked DONE, then its ``completion_columns``."""
        parameters = self._parameters(ids, results)
        return session.execute(self.complete_statement.execute, parameters).one()

    def _parameters(self, ids: list[Any], results: list[str | None]) -> dict[str, Any]:
        return {"task_ids": ids, "task_results": results, "worker": self.worker_id}

    def record_failure(
        self, session: Session, task: Any, processor: Processor | None, error: BaseException
    ) -> None:
        """Record a failed attempt in a savepoint; if even that is refused, abort the batch
        and charge the task a crash (MAX_WORKER_CRASHES ends it)."""
        try:
            outcome = self._guarded(
                session,
                lambda: record_failure(
                    session, self.queries, self.worker_id, task, processor, error
                ),
            )
        except exc.DBAPIError as refused:
            innocent = [entry.task.id for entry in self.finished]
            if refused_for_now(refused):  # no fault of the task's: it runs again, later
                self.abort(session, [], [*innocent, task.id], raising=refused)
            logger.error(
                "task %s: its failure could not be recorded (%s); it is charged a crash",
                task.id,
                first_line(refused),
            )
            self.abort(session, [], innocent, charged=[task.id])
        self.ended.append((task, outcome))
        if outcome in ("failed", "cancelled"):
            self.failed.append(task)

    def abort_for(
        self, session: Session, task: Any, processor: Processor, error: BaseException
    ) -> NoReturn:
        """``task`` failed in a way its savepoint cannot undo: roll the open transaction back,
        fail it with ``error``, and return the tasks run before it to the queue, their attempt
        given back (raises BatchAborted)."""
        earlier = [task_id for task_id in self.started if task_id != task.id]
        self.abort(session, [(task, processor, error)], earlier)

    def abort(
        self,
        session: Session,
        failures: list[tuple[Any, Processor | None, BaseException]],
        innocent: list[Any],
        charged: list[Any] = (),
        raising: BaseException | None = None,
    ) -> NoReturn:
        """Roll the open transaction (every task's changes in it) back, record ``failures``,
        and return the rest of what the worker holds to the queue: ``innocent`` task ids with
        their attempt given back (their run left no trace), ``charged`` ones charged a crash.
        Raises BatchAborted, or ``raising`` (for the worker's loop to pause on)."""
        session.rollback()
        self.connections.reset_session()  # the rollback left the tasks' session-level locks
        self.reset()
        for task, processor, error in failures:
            outcome = record_failure(session, self.queries, self.worker_id, task, processor, error)
            self.ended.append((task, outcome))
        session.commit()
        self.count([])
        self.reset()
        session.expunge_all()
        self.release(list(charged), innocent)
        raise raising or BatchAborted()

    def _guarded(self, session: Session, write: Callable[[], T]) -> T:
        """``write()`` in a savepoint that costs no round trip (it travels with the write's
        first statement, and needs no release: the commit ends it). If the database refuses
        the write, roll back to the savepoint, which leaves the transaction usable, and re-raise;
        a lost connection becomes ConnectionLost."""
        connection = session.connection()
        db.send_with_next_statement(connection, f"SAVEPOINT {_SAVEPOINT}")
        try:
            return write()
        except exc.DBAPIError as error:
            self._unless_lost(error)
            connection.exec_driver_sql(f"ROLLBACK TO SAVEPOINT {_SAVEPOINT}")
            raise

    def _unless_lost(self, error: BaseException) -> None:
        if self.connections.broken():
            raise ConnectionLost(first_line(error)) from None


class Unstarted:
    """The ids of the tasks a worker claimed and has not started, shared with its batch watch,
    which gives them back to the queue when a batch runs past its window."""

    def __init__(self, queries: Queries, worker_id: uuid.UUID, engine: Engine) -> None:
        self.queries, self.worker_id, self.engine = queries, worker_id, engine
        self.ids: set[Any] = set()
        # given back in the worker's open transaction: still this worker's, unstarted, until
        # that transaction commits (a rollback leaves them PROCESSING with their attempt)
        self.returning: set[Any] = set()
        self.lock = threading.Lock()
        # monotonic end of the running batch's window (None between batches): the watch gives
        # back only the tasks of a batch that has started, whose claim is committed
        self.deadline: float | None = None

    def add(self, ids: Iterable[Any]) -> None:
        with self.lock:
            self.ids.update(ids)

    def take(self, task_id: Any) -> bool:
        """Take ``task_id`` to start it, unless it was given back meanwhile."""
        with self.lock:
            if task_id not in self.ids:
                return False
            self.ids.remove(task_id)
            return True

    def take_all(self) -> list[Any]:
        """Every unstarted task, those given back in a transaction that did not commit too
        (to be released with their attempt given back)."""
        with self.lock:
            ids, self.ids, self.returning = self.ids | self.returning, set(), set()
        return list(ids)

    def _take_unstarted(self, returning: bool) -> list[Any]:
        with self.lock:
            ids, self.ids = list(self.ids), set()
            if returning:
                self.returning.update(ids)
        return ids

    def give_back(self, session: Session) -> None:
        """Return the unstarted tasks to the queue, in the open transaction."""
        ids = self._take_unstarted(returning=True)
        if ids:
            session.execute(self.queries.give_back, {"task_ids": ids, "worker": self.worker_id})

    def committed(self) -> None:
        """The worker's open transaction committed: what it gave back is the queue's."""
        with self.lock:
            self.returning = set()

    def give_back_late(self) -> None:
        """(The watch, on its own thread.) A task of the running batch has gone past the
        window: return the tasks after it to the queue now, on a connection of its own."""
        deadline = self.deadline
        if deadline is None or time.monotonic() <= deadline:
            return
        ids = self._take_unstarted(returning=False)
        if ids:
            with self.engine.begin() as connection:
                connection.execute(
                    self.queries.give_back, {"task_ids": ids, "worker": self.worker_id}
                )
            logger.debug("worker %s gave %d unstarted task(s) back", self.worker_id, len(ids))

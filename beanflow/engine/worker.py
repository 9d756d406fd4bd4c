"""One worker: listen → claim → run → complete, and a graceful stop.

Its services run beside it: the deadlines of the running task (``deadlines.py``), the
heartbeat and the reaper (``liveness.py``), and a periodic summary line.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any

import psycopg2
from sqlalchemy import exc
from sqlalchemy.orm import Session

from .. import db
from ..errors import ProcessorNotFound, first_line, refused_for_now
from ..models.cancellation import Cancellation
from ..models.waiter import Waiter
from ..processors.processor import Processor
from .batch import (
    Batch,
    BatchAborted,
    Claim,
    ConnectionLost,
    Finished,
    Frontier,
    Pace,
    TransactionAborted,
    TransactionEnded,
    Unstarted,
)
from .connections import ClaimStatement, WorkerConnections
from .control import Control
from .deadlines import Deadlines, GraceExceeded, TaskCancelled
from .interface import QueueApp
from .liveness import Heartbeat, ParentWatch, Reaper, Summary, WorkerRecord
from .notify import drain_pipe
from .outcomes import result_json, undo
from .queries import Queries, channel_parameters
from .service import Every, PeriodicService

logger = logging.getLogger(__name__)


# Connection-level failures the worker survives by reconnecting (server restart, network).
CONNECTION_ERRORS = (
    ConnectionLost,
    exc.OperationalError,
    exc.InterfaceError,
    psycopg2.OperationalError,  # from the LISTEN connection, which SQLAlchemy does not wrap
    psycopg2.InterfaceError,
)


_UNKNOWN = object()


class TaskWorker:
    """Runs the tasks of some channels until told to stop.

    The hot path uses one dedicated connection; the LISTEN connection and the services have
    their own, so a long task never delays them.
    """

    def __init__(
        self,
        app: QueueApp,
        channels: Iterable[str],
        *,
        burst: bool = False,
        supervisor: int | None = None,
    ) -> None:
        self.app = app
        # the pid of the supervisor that started this worker: it stops when that one dies
        self.supervisor = supervisor
        self.config = app.config
        self.channels = list(channels)
        if not self.channels:
            raise ValueError("a worker needs at least one channel")
        self.burst = burst
        self.id = uuid.uuid4()
        self.hooks = list(app.task_end_hooks)  # those there are now: the statements carry theirs
        self.queries = Queries(
            app.task_model,
            app.worker_model,
            app.event_model,
            events=app.config.EVENTS,
            channel_count=len(self.channels),
            batch_size=app.config.BATCH_SIZE,
            cancellation_model=Cancellation,
            waiter_model=Waiter,
            completion_columns=[hook.completion_column for hook in self.hooks],
        )
        self.engine = app.engine
        self._channel_parameters = channel_parameters(self.channels)
        self.stopping = threading.Event()
        self.found_dead = False
        self.deadlines = Deadlines()
        self.counts: collections.Counter[str] = collections.Counter()
        # tasks whose cancellation arrived while they were not running: not started
        self.cancel_requests: dict[Any, str] = {}
        self.held = Unstarted(self.queries, self.id, self.engine)
        self.pace = Pace(self.config.BATCH_WINDOW, self.config.BATCH_SIZE)
        self.frontier = Frontier(self.channels)
        self._wake_read, self._wake_write = os.pipe()
        self.connections = WorkerConnections(
            app.engine, self.channels, self.queries, app.task_model
        )
        self.record = WorkerRecord(app, self.queries, self.id)
        self.batch = Batch(
            self.queries,
            self.connections.complete,
            self.id,
            self.connections,
            self._release,
            self.counts,
        )
        self._lost_connection = False
        self._due_in: Any = _UNKNOWN  # read by the last commit for the next sleep

    # ---- lifecycle -------------------------------------------------------------------------

    def run(self) -> int:
        """Process tasks until stopped; returns the process exit status (0 on a clean stop, 1
        when this worker was found dead by another one)."""
        self.deadlines.install(self._on_stop_signal)
        self._register()
        services = self.services()
        for service in services:
            service.start()
        try:
            self._loop()
        finally:
            self.stop()
            for service in services:
                service.join()
            self._shut_down()
            self.connections.dispose()
            self.deadlines.restore()
            os.close(self._wake_read)
            os.close(self._wake_write)
        return 1 if self.found_dead else 0

    def services(self) -> list[PeriodicService]:
        """The services that run beside this worker's loop, until it stops."""
        return [
            Heartbeat(self.app, self.queries, self.id, self.stopping, self._on_lost),
            Reaper(self.app, self.queries, self.stopping),
            Control(self.app, self.id, self.stopping, self._on_cancel),
            Summary(self.id, self._take_counts, self.stopping),
            *([self._batch_watch()] if self.config.BATCH_SIZE > 1 else []),
            *([ParentWatch(self.supervisor, self.stopping, self.stop)] if self.supervisor else []),
        ]

    def _batch_watch(self) -> PeriodicService:
        period = max(self.config.BATCH_WINDOW / 2, 0.01)
        return Every(period, self.stopping, self.held.give_back_late, "batch-watch")

    def _take_counts(self) -> collections.Counter[str]:
        counts = collections.Counter(self.counts)
        self.counts.clear()
        return counts

    def _on_cancel(self, task_id: Any, requested_by: str) -> None:
        """A cancellation of a task this worker holds (from the control thread): interrupt it
        if it is running, else it will not be started."""
        if not self.deadlines.cancel(task_id, requested_by):
            self.cancel_requests[task_id] = requested_by

    def _on_lost(self, state: str) -> None:
        logger.error("worker %s was marked %s by another worker; stopping", self.id, state)
        self.found_dead = True
        self.stop()

    def _register(self) -> None:
        self.record.register(self.channels)
        logger.info(
            "worker %s started on channels %s (batch %d)",
            self.id,
            ", ".join(self.channels),
            self.config.BATCH_SIZE,
        )

    def _loop(self) -> None:
        backoff = 0.0
        # the tasks to run next; [] when the last commit's follow-on claim found none (the
        # worker then sleeps at once, without a claim of its own), None when it must claim
        tasks: list[Any] | None = None
        while not self.stopping.is_set():
            try:
                self._connect()
                claimed_now = tasks is None
                if tasks is None:
                    tasks = self._claim()
                if tasks:
                    tasks = self._process(tasks)
                elif self.burst:
                    if claimed_now:  # a claim of its own found nothing due: the burst is over
                        return
                    tasks = None  # tasks added by the last batch became due after its start
                else:
                    self._sleep()  # its look at the next due time sees those too
                    tasks = None
                backoff = 0.0
            except Exception as error:  # noqa: BLE001 - nothing a task does may kill the worker
                tasks = None  # returned to the queue by _connect's release
                self._lost_connection = True
                backoff = min(max(backoff * 2, 0.1), 5.0)
                if refused_for_now(error) and not self.connections.broken():
                    logger.warning(
                        "worker %s: the database refused its statement for now (%s); trying "
                        "again in %.1fs",
                        self.id,
                        first_line(error),
                        backoff,
                    )
                elif isinstance(error, CONNECTION_ERRORS):
                    logger.warning(
                        "worker %s lost its database connection (%s); reconnecting in %.1fs",
                        self.id,
                        first_line(error),
                        backoff,
                    )
                else:
                    logger.exception(
                        "worker %s: unexpected error; it reconnects in %.1fs and returns its "
                        "tasks to the queue (the running one charged a crash)",
                        self.id,
                        backoff,
                    )
                self._disconnect()
                self.stopping.wait(backoff)

    def _connect(self) -> None:
        if self.connections.open():
            # whatever this worker held when its connection broke was rolled back with it;
            # the tasks that ran in the transaction that died are charged a crash
            self._release(charged=self.batch.started if self._lost_connection else [])
            self._lost_connection = False
            self.batch.reset()

    def _disconnect(self) -> None:
        self.batch.finished = []
        self._due_in = _UNKNOWN
        self.connections.close()

    def _shut_down(self) -> None:
        """Return held tasks, mark this worker's row SHUTDOWN, close connections."""
        try:
            if self.connections.session is not None:
                self.connections.session.rollback()
            self._release()
            self.record.shut_down()
            logger.info("worker %s stopped", self.id)
        except exc.DBAPIError as error:
            logger.warning(
                "worker %s could not record its shutdown: %s", self.id, first_line(error)
            )
        finally:
            self._disconnect()

    def _release(self, charged: list[Any] = (), innocent: list[Any] = ()) -> None:
        """Return what this worker holds: the unstarted tasks and the task ids ``innocent``
        with their attempt given back, the task ids ``charged`` charged a crash."""
        self.record.release([*self.held.take_all(), *innocent], charged)

    # ---- signals ---------------------------------------------------------------------------

    def _on_stop_signal(self, number: int) -> None:
        """SIGTERM or SIGINT: drain. Again, or SIGUSR1: stop now. A supervised worker drains
        once however many signals it gets (a Ctrl-C reaches the whole process group, and its
        supervisor forwards it too): only SIGUSR1, its supervisor's word, stops it now."""
        again = self.stopping.is_set() and self.supervisor is None
        if number == signal.SIGUSR1 or again:
            logger.warning("worker %s: %s, stopping now", self.id, _signal_name(number, again))
            self.stop()
            self.deadlines.end_grace()
            return
        if self.stopping.is_set():
            return
        logger.info(
            "worker %s: %s received, stopping (grace period %ss)",
            self.id,
            signal.Signals(number).name,
            self.config.SHUTDOWN_GRACE_PERIOD,
        )
        self.stop()
        self.deadlines.start_grace(self.config.SHUTDOWN_GRACE_PERIOD)

    def stop(self) -> None:
        """Ask the worker to stop: it claims nothing more and finishes its current task."""
        self.stopping.set()
        with contextlib.suppress(OSError):  # the worker may have finished already
            os.write(self._wake_write, b"\0")

    # ---- hot path --------------------------------------------------------------------------

    def _claim(self) -> list[Any]:
        """Claim due tasks in a transaction of their own (when nothing was running)."""
        session = self.connections.session
        assert session is not None
        # A lost claim only returns its tasks to PENDING, so its commit need not wait for the
        # disk; a task's completion commit (synchronous) flushes the claim's WAL before it.
        while True:
            db.send_with_next_statement(session.connection(), "SET LOCAL synchronous_commit TO OFF")
            try:
                tasks = self._claim_in(session)
            except BatchAborted:  # the rows no claim could take were failed: claim again
                continue
            session.commit()
            return tasks

    def _claim_in(self, session: Session) -> list[Any]:
        """Claim as many tasks as the pace of recent ones says fit in the batch window. A row
        that makes the claim fail is failed alone (``Batch.claim_refused``)."""
        claim = self._next_claim(self.connections.claim)
        try:
            _, tasks = claim.statement.run(session, claim.parameters)
        except Exception as error:  # noqa: BLE001 - loading a claimed row may raise anything
            self.batch.claim_refused(session, claim, error)
        return self._took(tasks, claim.size)

    def _next_claim(self, statement: Callable[[int], ClaimStatement]) -> Claim:
        """The next claim, sent with ``statement(size)``."""
        parameters = {"worker": self.id} | self._channel_parameters | self.frontier.parameters()
        size = self.pace.size()
        return Claim(statement(size), parameters, size)

    def _took(self, tasks: list[Any], size: int) -> list[Any]:
        """``tasks`` were claimed (up to ``size``): they are this worker's to start."""
        self.frontier.claimed(tasks, size)
        self.held.add(task.id for task in tasks)
        logger.debug("worker %s claimed %d task(s) (up to %d)", self.id, len(tasks), size)
        return tasks

    def _process(self, tasks: list[Any]) -> list[Any] | None:
        """Run claimed tasks; returns the next batch, claimed by the same commit as the last of
        these (none once stopping), or None when no such claim was made.

        A batch that runs past BATCH_WINDOW commits what finished and gives its unstarted
        tasks back to the queue (``Unstarted.give_back_late`` does so while a long task still
        runs), so that other workers need not wait for them.

        A task that a dead worker held before may be what killed it (the claim takes at most
        one): it runs last, in its own transaction, after the others have committed, so it
        cannot take them down with it."""
        innocent = [task for task in tasks if task.crash_count <= 0]
        groups = [innocent] + [[task] for task in tasks if task.crash_count > 0]
        session = self.connections.session
        assert session is not None
        claimed: list[Any] = []
        self.held.deadline = time.monotonic() + self.config.BATCH_WINDOW
        try:
            for index, group in enumerate(groups):
                opened = time.monotonic()
                for task in group:
                    if self.stopping.is_set() or not self.held.take(task.id):
                        continue  # stopping, or given back
                    elapsed = time.monotonic() - opened
                    if self.batch.finished and self.pace.would_overrun(_key(task), elapsed):
                        self._commit(session)  # what finished is not held back by this one
                        opened = time.monotonic()
                    self._run(session, task)
                    if time.monotonic() > self.held.deadline:
                        self.held.give_back(session)
                last = index == len(groups) - 1
                if last:
                    # the next batch, claimed by this commit, is not the watch's to give back
                    # before it starts: until the commit, its rows are not this worker's for
                    # any other connection
                    self.held.deadline = None
                claimed = self._commit(session, claim_next=last)
        except GraceExceeded:
            self._commit(session)  # the neighbours that finished keep their results
        except BatchAborted:
            return None
        finally:
            self.held.deadline = None
        if self.stopping.is_set():
            self._release()
            return []
        return claimed

    def _run(self, session: Session, task: Any) -> None:
        """Run one task inside a savepoint and record its outcome in the same transaction."""
        processor = self.app.registry.get(*_key(task))
        if processor is None:
            self.batch.record_failure(
                session,
                task,
                None,
                ProcessorNotFound(
                    f"no processor registered for {task.module}.{task.name} on channel "
                    f"{task.channel!r}; this worker runs only registered processors"
                ),
            )
            return
        requested_by = self.cancel_requests.pop(task.id, None)
        if requested_by is not None:
            cancelled = TaskCancelled(f"cancelled by {requested_by} before it started")
            self.batch.record_failure(session, task, processor, cancelled)
            return
        logger.debug(
            "task %s %s.%s started (attempt %d)", task.id, task.module, task.name, task.attempts
        )
        started = time.monotonic()
        self.batch.started.append(task.id)
        savepoint = session.begin_nested() if processor.uses_session else None
        commits = 0
        if savepoint is not None:
            commits = self.connections.commits()
            self.connections.watch_session()
        try:
            try:
                with self.deadlines.task(processor.timeout, task.id):
                    result = result_json(processor.call(session, task, savepoint))
            finally:
                duration = time.monotonic() - started
                self.pace.record(_key(task), duration)
        except GraceExceeded:
            undo(savepoint)
            logger.warning(
                "task %s interrupted: grace period exceeded, returned to the queue", task.id
            )
            raise
        except BaseException as error:  # noqa: BLE001 - a task's failure is data, not a crash
            if self.connections.broken():
                raise ConnectionLost(f"task {task.id} lost it: {first_line(error)}") from None
            if savepoint is not None and not savepoint.parent.is_active:
                self._transaction_ended(session, task, processor, commits)
                return
            self._fail(session, task, processor, savepoint, error)
            return
        if savepoint is not None:
            if not savepoint.parent.is_active:
                self._transaction_ended(session, task, processor, commits)
                return
            if self.connections.in_failed_transaction():
                unnoticed = TransactionAborted(
                    "a statement it ran failed, and it went on as if it had not (it caught the "
                    "error): PostgreSQL refuses the rest of such a transaction, so its changes "
                    "are rolled back; let the error propagate, or roll back a savepoint taken "
                    "before the statement"
                )
                self._fail(session, task, processor, savepoint, unnoticed)
                return
            if savepoint.is_active:
                savepoint.commit()
            self.connections.reset_session(if_changed=True)
        self.batch.finished.append(Finished(task, processor, result, duration))
        if logger.isEnabledFor(logging.DEBUG):  # at INFO: a fifth to a third of a fast drain
            fields = {
                "task_id": str(task.id),
                "processor": f"{task.module}.{task.name}",
                "channel": task.channel,
                "attempt": task.attempts,
                "state": "done",
                "duration_ms": round(duration * 1000, 3),
                "worker": str(self.id),
            }
            logger.debug(
                "task %s %s.%s done in %.3fs",
                task.id,
                task.module,
                task.name,
                duration,
                extra=fields,
            )

    def _fail(
        self,
        session: Session,
        task: Any,
        processor: Processor,
        savepoint: Any,
        error: BaseException,
    ) -> None:
        """Undo ``task``'s writes (its savepoint) and record its failure. If it released or
        rolled back its savepoint itself, what it wrote after that has no savepoint to undo
        it: the batch's transaction is rolled back instead (``Batch.abort_for``)."""
        if savepoint is not None and not savepoint.is_active:
            self.batch.abort_for(session, task, processor, error)
        undo(savepoint)
        if savepoint is not None:  # its settings went with its savepoint, its locks did not
            self.connections.reset_session(if_changed=True)
        self.batch.record_failure(session, task, processor, error)

    def _transaction_ended(
        self, session: Session, task: Any, processor: Processor, commits: int
    ) -> None:
        """``task`` committed, rolled back or closed ``db``, the session whose transaction also
        holds the writes of the tasks run before it in the batch. It fails (its policy decides
        what follows). If that transaction was committed, those tasks complete as usual; if it
        was rolled back, their writes are gone with it, and they return to the queue to run
        again, their attempt given back (with the batch's unstarted tasks)."""
        committed = self.connections.commits() != commits
        if session.get_transaction() is not None:  # it wrote on, in a transaction of its own
            session.rollback()  # (the tasks it expires are read again: _reload_expired)
        self.connections.reset_session()  # what it SET may have been committed
        if committed:
            what = "committed the transaction it shares with its batch (db.commit())"
        else:
            what = "rolled back or closed the session it shares with its batch"
        error = TransactionEnded(
            f"it {what}: a processor's changes commit or roll back with its completion "
            "(to undo its own, roll back its savepoint)"
        )
        if committed:
            self.batch.record_failure(session, task, processor, error)
            return
        self.batch.abort_for(session, task, processor, error)

    def _commit(self, session: Session, claim_next: bool = False) -> list[Any]:
        """Commit the open transaction, completing every task that finished in it with one
        statement, and with ``claim_next`` claiming the next batch in it too (one commit, one
        disk flush, for both); the app's task-end hooks run in it after that claim, and when it
        found nothing and they released tasks, a second claim takes them. If any task was
        taken from this worker meanwhile (it was found dead), roll the whole transaction back
        instead, and stop: no task is completed twice. Returns the tasks claimed."""
        committed = self.batch.finished  # complete() replaces the list, leaving this one
        finished = len(committed)
        self.connections.reset_after_batch()  # with the completion (or the next statement)
        self._reload_expired(session)
        session.expunge_all()  # the session keeps no task objects from batch to batch
        claiming = claim_next and not self.stopping.is_set()
        claimed: list[Any] = []
        computed: list[Any] = [None] * len(self.hooks)  # by the completion, for the hooks
        if finished:
            claim = None
            if claiming:  # made by the completion's statement: one round trip for both
                claim = self._next_claim(self.connections.complete_and_claim)
            done, computed, claimed = self.batch.complete(session, claim)
            if done != finished:
                self.batch.unless_taken_by_themselves(session, committed)
                session.rollback()
                logger.error(
                    "worker %s: %d task(s) were taken from it while it ran them (it was found "
                    "dead); the results and changes of this transaction were rolled back",
                    self.id,
                    finished - done,
                )
                self.found_dead = True
                self.stop()
                return []
            if claim is not None:
                claimed = self._took(claimed, claim.size)
        elif claiming:
            claimed = self._claim_in(session)
        if self.hooks and (committed or self.batch.failed):
            done, failed = [entry.task for entry in committed], self.batch.failed
            released = [
                hook.on_tasks_ended(session, done, failed, value)
                for hook, value in zip(self.hooks, computed, strict=True)
            ]
            if claiming and not claimed and any(released):  # a workflow's next steps, say
                claimed = self._claim_in(session)
        if claim_next and not claimed and not self.burst:
            # nothing more is due: the worker sleeps next, until the time this tells, read in
            # this transaction rather than in one more of its own
            self._due_in = self._next_due(session)
        session.commit()
        self.held.committed()
        if logger.isEnabledFor(logging.DEBUG):
            claimed_too = f" and a claim of {len(claimed)}" if claim_next else ""
            logger.debug("worker %s committed %d completion(s)%s", self.id, finished, claimed_too)
        self.batch.count(committed)
        self.batch.reset()
        return claimed

    def _reload_expired(self, session: Session) -> None:
        """Read again the tasks a processor expired (``db.expire_all()``, say), before the
        session lets them go: detached, they could not be read at all."""
        for state in session.identity_map.all_states():
            if state.expired_attributes and isinstance(state.obj(), self.app.task_model):
                session.refresh(state.obj())

    def _sleep(self) -> None:
        """Wait for a notify, the next scheduled task, a signal or POLL_TIMEOUT."""
        session, listener = self.connections.session, self.connections.listener
        assert session is not None and listener is not None
        due_in, self._due_in = self._due_in, _UNKNOWN
        if due_in is _UNKNOWN:
            due_in = self._next_due(session)
            session.commit()
        timeout = self.config.POLL_TIMEOUT
        if due_in is not None:
            timeout = min(timeout, max(float(due_in), 0.0))
        if self.stopping.is_set():
            return
        listener.wait(timeout, self._wake_read)
        drain_pipe(self._wake_read)

    def _next_due(self, session: Session) -> Any:
        """Seconds until the next task of this worker's channels is due (None: none)."""
        return session.scalar(self.queries.next_due, self._channel_parameters)


def _key(task: Any) -> tuple[str, str, str]:
    """The (channel, module, name) a task's processor is registered under."""
    return task.channel, task.module, task.name


def _signal_name(number: int, again: bool) -> str:
    name = signal.Signals(number).name
    return f"second {name}" if again else f"{name} from its supervisor"

"""One worker process: listen → claim → run → complete; heartbeat; graceful stop."""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import signal
import socket
import threading
import time
import traceback
import uuid
from collections.abc import Iterable
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import psycopg2
from sqlalchemy import Integer, column, exc, select
from sqlalchemy.orm import Session
from sqlalchemy.sql import ClauseElement

from .. import db
from ..models.worker import WorkerState
from .notify import Listener, drain_pipe
from .queries import Prepared, Queries, channel_parameters

if TYPE_CHECKING:
    from ..app import BeanQueue
    from ..processors.processor import Processor

logger = logging.getLogger(__name__)

# Connection-level failures the worker survives by reconnecting (server restart, network).
CONNECTION_ERRORS = (
    exc.OperationalError,
    exc.InterfaceError,
    psycopg2.OperationalError,  # from the LISTEN connection, which SQLAlchemy does not wrap
    psycopg2.InterfaceError,
)
# how often each worker logs a one-line summary of what it did
SUMMARY_SECONDS = 60


class GraceExceeded(BaseException):
    """Raised inside a running task when a stopping worker's grace period has run out."""


class TaskTimeout(BaseException):
    """Raised inside a running task that has run past its processor's ``timeout``.

    A BaseException, like SystemExit, so that a task's own ``except Exception`` cannot
    swallow it."""


class TaskWorker:
    """Runs the tasks of some channels until told to stop.

    The hot path uses one dedicated connection; the heartbeat thread and the LISTEN connection
    have their own, so a long task never delays either.
    """

    def __init__(self, app: BeanQueue, channels: Iterable[str], *, burst: bool = False) -> None:
        self.app = app
        self.config = app.config
        self.channels = list(channels)
        if not self.channels:
            raise ValueError("a worker needs at least one channel")
        self.burst = burst
        self.id = uuid.uuid4()
        self.queries = Queries(
            app.task_model,
            app.worker_model,
            app.event_model,
            events=app.config.EVENTS,
            channel_count=len(self.channels),
            batch_size=app.config.BATCH_SIZE,
        )
        self.engine = app.engine
        # the hot path's own connection, whose savepoints cost no round trip
        self._hot_engine = db.make_hot_path_engine(app.engine.url)
        self._channel_parameters = channel_parameters(self.channels)
        self._prepared = {
            "claim": Prepared("beanflow_claim", self.queries.claim, *self.queries.task.c),
            "complete": Prepared(
                "beanflow_complete", self.queries.complete, column("count", Integer)
            ),
        }
        self._claim_statement = select(app.task_model).from_statement(
            self._prepared["claim"].execute
        )
        self.stopping = threading.Event()
        self.found_dead = False
        self.running: Any = None  # the task whose function is running now
        self.running_timeout: float | None = None
        # monotonic deadlines enforced with SIGALRM while a task runs (main thread only)
        self._task_deadline: float | None = None
        self._grace_deadline: float | None = None
        self._signals = False
        self.counts: collections.Counter[str] = collections.Counter()
        self.unstarted: list[Any] = []  # claimed tasks not yet started
        # (id, JSON result) of tasks finished in the open transaction, completed at its commit
        self._finished: list[tuple[Any, str | None]] = []
        self._wake_read, self._wake_write = os.pipe()
        self._session: Session | None = None
        self._lost_connection = False
        self._listener: Listener | None = None

    # ---- lifecycle -------------------------------------------------------------------------

    def run(self) -> int:
        """Process tasks until stopped; returns the process exit status (0 on a clean stop, 1
        when this worker was found dead by another one)."""
        previous = self._install_signal_handlers()
        self._register()
        heartbeat = threading.Thread(
            target=self._heartbeat_loop, name="beanflow-heartbeat", daemon=True
        )
        heartbeat.start()
        try:
            self._loop()
        finally:
            self.stop()
            heartbeat.join()
            self._shut_down()
            self._hot_engine.dispose()
            self._restore_signal_handlers(previous)
            os.close(self._wake_read)
            os.close(self._wake_write)
        return 1 if self.found_dead else 0

    def _register(self) -> None:
        with self.engine.begin() as connection:
            connection.execute(
                self.queries.register,
                {
                    "id": self.id,
                    "name": socket.gethostname(),
                    "pid": os.getpid(),
                    "channels": self.channels,
                },
            )
        logger.info(
            "worker %s started on channels %s (batch %d)",
            self.id,
            ", ".join(self.channels),
            self.config.BATCH_SIZE,
        )

    def _loop(self) -> None:
        backoff = 0.0
        tasks: list[Any] = []
        while not self.stopping.is_set():
            try:
                self._connect()
                tasks = tasks or self._claim()
                if tasks:
                    tasks = self._process(tasks)
                elif self.burst:
                    return
                else:
                    self._sleep()
                backoff = 0.0
            except CONNECTION_ERRORS as error:
                tasks = []  # returned to the queue by _connect's release
                self._lost_connection = True
                backoff = min(max(backoff * 2, 0.1), 5.0)
                logger.warning(
                    "worker %s lost its database connection (%s); reconnecting in %.1fs",
                    self.id,
                    _first_line(error),
                    backoff,
                )
                self._disconnect()
                self.stopping.wait(backoff)

    def _connect(self) -> None:
        if self._session is not None:
            return
        connection = self._hot_engine.connect()
        # planned once for this connection: the statements' parameters never change the plan
        connection.exec_driver_sql("SET plan_cache_mode = force_generic_plan")
        for prepared in self._prepared.values():
            prepared.prepare(connection)
        connection.commit()
        self._session = Session(bind=connection, expire_on_commit=False, autoflush=True)
        self._listener = Listener(self.engine, self.channels)
        # whatever this worker held when its connection broke was rolled back with it
        self._release(lost=self._lost_connection)
        self._lost_connection = False

    def _disconnect(self) -> None:
        self._finished = []
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        if self._session is not None:
            connection = self._session.get_bind()
            try:
                self._session.close()
                connection.invalidate()
                connection.close()
            except Exception:  # noqa: BLE001 - the connection is already broken
                pass
            self._session = None

    def _shut_down(self) -> None:
        """Return held tasks, mark this worker's row SHUTDOWN, close connections."""
        try:
            if self._session is not None:
                self._session.rollback()
            self._release()
            with self.engine.begin() as connection:
                connection.execute(self.queries.shut_down, {"worker": self.id})
            logger.info("worker %s stopped", self.id)
        except exc.DBAPIError as error:
            logger.warning(
                "worker %s could not record its shutdown: %s", self.id, _first_line(error)
            )
        finally:
            self._disconnect()

    def _release(self, lost: bool = False) -> None:
        """Return what this worker holds to the queue; ``lost``: its connection died, and the
        started ones count a crash (see Queries.release)."""
        with self.engine.begin() as connection:
            connection.execute(
                self.queries.release,
                {
                    "worker": self.id,
                    "unstarted": [task.id for task in self.unstarted],
                    "lost": lost,
                    "max_crashes": self.config.MAX_WORKER_CRASHES,
                },
            )
        self.unstarted = []

    # ---- signals ---------------------------------------------------------------------------

    def _install_signal_handlers(self) -> dict[int, Any]:
        if threading.current_thread() is not threading.main_thread():
            return {}
        self._signals = True
        previous = {
            number: signal.getsignal(number)
            for number in (signal.SIGTERM, signal.SIGINT, signal.SIGALRM)
        }
        signal.signal(signal.SIGTERM, self._on_stop_signal)
        signal.signal(signal.SIGINT, self._on_stop_signal)
        signal.signal(signal.SIGALRM, self._on_alarm)
        return previous

    def _restore_signal_handlers(self, previous: dict[int, Any]) -> None:
        if self._signals:
            signal.setitimer(signal.ITIMER_REAL, 0)
        for number, handler in previous.items():
            signal.signal(number, handler)

    def _on_stop_signal(self, number: int, frame: Any) -> None:
        if self.stopping.is_set():
            logger.warning("worker %s: second signal, stopping now", self.id)
            self._grace_deadline = time.monotonic()
            self._on_alarm(number, frame)
            return
        logger.info(
            "worker %s: %s received, stopping (grace period %ss)",
            self.id,
            signal.Signals(number).name,
            self.config.SHUTDOWN_GRACE_PERIOD,
        )
        self.stop()
        if self.running is not None:
            self._grace_deadline = time.monotonic() + self.config.SHUTDOWN_GRACE_PERIOD
            self._arm_alarm()

    def _arm_alarm(self) -> None:
        """Schedule SIGALRM for the nearest deadline of the running task (or cancel it)."""
        if not self._signals:
            return
        deadlines = [d for d in (self._task_deadline, self._grace_deadline) if d is not None]
        delay = max(min(deadlines) - time.monotonic(), 0.001) if deadlines else 0
        signal.setitimer(signal.ITIMER_REAL, delay)

    def _on_alarm(self, number: int, frame: Any) -> None:
        if self.running is None:
            return
        now = time.monotonic()
        if self._grace_deadline is not None and now >= self._grace_deadline:
            raise GraceExceeded()
        if self._task_deadline is not None and now >= self._task_deadline:
            raise TaskTimeout(f"the task ran past its timeout of {self.running_timeout}s")
        self._arm_alarm()  # woken early: wait for the nearest deadline

    def stop(self) -> None:
        """Ask the worker to stop: it claims nothing more and finishes its current task."""
        self.stopping.set()
        with contextlib.suppress(OSError):  # the worker may have finished already
            os.write(self._wake_write, b"\0")

    # ---- hot path --------------------------------------------------------------------------

    def _claim(self) -> list[Any]:
        """Claim due tasks in a transaction of their own (when nothing was running)."""
        session = self._session
        assert session is not None
        # A lost claim only returns its tasks to PENDING, so its commit need not wait for the
        # disk; a task's completion commit (synchronous) flushes the claim's WAL before it.
        db.send_with_next_statement(session.connection(), "SET LOCAL synchronous_commit TO OFF")
        tasks = self._claim_in(session)
        session.commit()
        self.unstarted = tasks
        return tasks

    def _claim_in(self, session: Session) -> list[Any]:
        parameters = {"worker": self.id} | self._channel_parameters
        return list(session.scalars(self._claim_statement, parameters))

    def _process(self, tasks: list[Any]) -> list[Any]:
        """Run claimed tasks; returns the next batch, claimed by the same commit as the last of
        these (none once stopping).

        A task that a dead worker held before may be what killed it (the claim takes at most
        one): it runs last, in its own transaction, after the others have committed, so it
        cannot take them down with it."""
        self.unstarted = list(tasks)
        innocent = [task for task in tasks if task.crash_count == 0]
        groups = [innocent] + [[task] for task in tasks if task.crash_count > 0]
        session = self._session
        assert session is not None
        claimed: list[Any] = []
        try:
            for index, group in enumerate(groups):
                opened = time.monotonic()
                for task in group:
                    if self.stopping.is_set():
                        break
                    self.unstarted.remove(task)
                    self._run(session, task)
                    if time.monotonic() - opened > self.config.BATCH_WINDOW:
                        self._commit(session)
                        opened = time.monotonic()
                claimed = self._commit(session, claim_next=index == len(groups) - 1)
        except GraceExceeded:
            self._commit(session)  # the neighbours that finished keep their results
        if self.stopping.is_set():
            self._release()
            return []
        return claimed

    def _run(self, session: Session, task: Any) -> None:
        """Run one task inside a savepoint and record its outcome in the same transaction."""
        processor = self.app.registry.get(task.channel, task.module, task.name)
        if processor is None:
            self._record_failure(
                session,
                task,
                None,
                LookupError(
                    f"no processor registered for {task.module}.{task.name} on channel "
                    f"{task.channel!r}; this worker runs only registered processors"
                ),
            )
            return
        logger.info(
            "task %s %s.%s started (attempt %d)", task.id, task.module, task.name, task.attempts
        )
        started = time.monotonic()
        savepoint = session.begin_nested() if processor.uses_session else None
        try:
            self.running_timeout = processor.timeout
            if processor.timeout is not None and self._signals:
                self._task_deadline = started + processor.timeout
                self._arm_alarm()
            self.running = task
            try:
                result = processor.call(session, task, savepoint)
            finally:
                self.running = None
                if self._task_deadline is not None:
                    self._task_deadline = None
                    self._arm_alarm()
            if processor.auto_complete:
                result = _json_ready(result)
        except GraceExceeded:
            _undo(savepoint)
            logger.warning(
                "task %s interrupted: grace period exceeded, returned to the queue", task.id
            )
            raise
        except BaseException as error:  # noqa: BLE001 - a task's failure is data, not a crash
            _undo(savepoint)
            self._record_failure(session, task, processor, error)
            return
        duration = time.monotonic() - started
        if savepoint is not None and savepoint.is_active:
            savepoint.commit()
        if processor.auto_complete:
            self._finished.append((task.id, result))
        logger.info("task %s %s.%s done in %.3fs", task.id, task.module, task.name, duration)

    def _commit(self, session: Session, claim_next: bool = False) -> list[Any]:
        """Commit the open transaction, completing every task that finished in it with one
        statement, and with ``claim_next`` claiming the next batch in it too (one commit, one
        disk flush, for both). If any task was taken from this worker meanwhile (it was found
        dead), roll the whole transaction back instead, and stop: no task is completed twice.
        Returns the tasks claimed."""
        finished, self._finished = self._finished, []
        if finished:
            done = session.execute(
                self._prepared["complete"].execute,
                {
                    "task_ids": [task_id for task_id, _ in finished],
                    "task_results": [result for _, result in finished],
                    "worker": self.id,
                },
            ).scalar()
            if done != len(finished):
                session.rollback()
                logger.error(
                    "worker %s: %d task(s) were taken from it while it ran them (it was found "
                    "dead); the results and changes of this transaction were rolled back",
                    self.id,
                    len(finished) - done,
                )
                self.found_dead = True
                self.stop()
                return []
        session.expunge_all()  # the session keeps no task objects from batch to batch
        claimed = self._claim_in(session) if claim_next and not self.stopping.is_set() else []
        session.commit()
        self.counts["done"] += len(finished)
        self.unstarted.extend(claimed)
        return claimed

    def _record_failure(
        self, session: Session, task: Any, processor: Processor | None, error: BaseException
    ) -> None:
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
            self.queries.fail,
            {
                "task_id": task.id,
                "worker": self.id,
                "retry_at": retry_at,
                "error": message,
                "exception_type": f"{type(error).__module__}.{type(error).__qualname__}",
                "traceback": "".join(traceback.format_exception(error)),
            },
        )
        self.counts["failed" if retry_at is None else "retried"] += 1
        if retry_at is None:
            logger.error(
                "task %s %s.%s failed (attempt %d): %s",
                task.id,
                task.module,
                task.name,
                task.attempts,
                message,
            )
        else:
            logger.warning(
                "task %s %s.%s failed (attempt %d), retry at %s: %s",
                task.id,
                task.module,
                task.name,
                task.attempts,
                retry_at,
                message,
            )

    def _sleep(self) -> None:
        """Wait for a notify, the next scheduled task, a signal or POLL_TIMEOUT."""
        session, listener = self._session, self._listener
        assert session is not None and listener is not None
        due_in = session.scalar(self.queries.next_due, self._channel_parameters)
        session.commit()
        timeout = self.config.POLL_TIMEOUT
        if due_in is not None:
            timeout = min(timeout, max(float(due_in), 0.0))
        if self.stopping.is_set():
            return
        listener.wait(timeout, self._wake_read)
        drain_pipe(self._wake_read)

    # ---- liveness --------------------------------------------------------------------------

    def _heartbeat_loop(self) -> None:
        """Beat every WORKER_HEARTBEAT_PERIOD on a pool connection, and reap dead workers."""
        period = self.config.WORKER_HEARTBEAT_PERIOD
        summarised = time.monotonic()
        while not self.stopping.wait(period):
            if time.monotonic() - summarised >= SUMMARY_SECONDS:
                summarised = time.monotonic()
                counts, self.counts = self.counts, collections.Counter()
                logger.info(
                    "worker %s: in the last %ds %d done, %d retried, %d failed",
                    self.id,
                    SUMMARY_SECONDS,
                    counts["done"],
                    counts["retried"],
                    counts["failed"],
                )
            try:
                with self.engine.begin() as connection:
                    state = connection.execute(self.queries.heartbeat, {"worker": self.id}).scalar()
                if state != WorkerState.RUNNING:
                    logger.error(
                        "worker %s was marked %s by another worker; stopping",
                        self.id,
                        getattr(state, "value", state),
                    )
                    self.found_dead = True
                    self.stop()
                    return
                with self.engine.begin() as connection:
                    workers, tasks, _ = connection.execute(
                        self.queries.reap,
                        {
                            "timeout": timedelta(seconds=self.config.WORKER_HEARTBEAT_TIMEOUT),
                            "max_crashes": self.config.MAX_WORKER_CRASHES,
                        },
                    ).one()
                if workers:
                    logger.warning(
                        "found %d dead worker(s); %d task(s) re-queued or failed", workers, tasks
                    )
            except exc.DBAPIError as error:
                logger.warning("worker %s heartbeat failed: %s", self.id, _first_line(error))


def _undo(savepoint: Any) -> None:
    """Roll a task's savepoint (if it has one) back, unless the task already did (or a failed
    flush did: the savepoint is then inactive but still to be rolled back)."""
    if savepoint is not None:
        with contextlib.suppress(exc.ResourceClosedError):
            savepoint.rollback()


def _json_ready(result: Any) -> str | None:
    """The result as JSON text (None stays NULL); raises TypeError if it is not JSON."""
    if result is None:
        return None
    try:
        return json.dumps(result)
    except (TypeError, ValueError) as error:
        raise TypeError(f"the task's result is not JSON-serialisable: {error}") from None


def _first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__

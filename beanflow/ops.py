"""The operations API: see and steer the queue. The command line and the dashboard both use it.

Every reading is bounded in cost on a table of millions of rows: lists are keyset-paginated
through an index, counts read only the rows a partial index holds (pending, running, finished
in the last hour), a search in error text looks through a bounded number of rows. Every action
works in the caller's session (the caller commits) and records an event per task it changes.
"""

from __future__ import annotations

import dataclasses
import getpass
import logging
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import (
    column,
    delete,
    exists,
    func,
    insert,
    literal,
    select,
    table,
    text,
    tuple_,
    union_all,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import Session, aliased, defer

from .app import BeanQueue
from .config import DurationTooLong, parse_duration
from .engine.control import CONTROL_CHANNEL
from .engine.notify import Listener
from .engine.queries import notify
from .engine.schedules import Schedule
from .engine.service import PeriodicService
from .errors import BeanflowError
from .models import (
    DONE_CHANNEL,
    FINAL_STATES,
    Cancellation,
    RunState,
    ScheduleState,
    TaskState,
    Waiter,
    WorkflowRun,
)
from .models.task import notify_channels

logger = logging.getLogger(__name__)

# an error-text search looks through the newest this many rows that match the other filters
SEARCH_ROWS = 100_000
# the tasks a listing or a bulk action takes at once
PAGE = 50
CHUNK = 1000


def operator() -> str:
    """Who acts, for the events: ``user@host``."""
    try:
        user = getpass.getuser()
    except Exception:  # noqa: BLE001 - no user name in some containers
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


@dataclasses.dataclass
class TaskFilter:
    """Which tasks: every field that is set must match."""

    state: TaskState | None = None
    channel: str | None = None
    processor: str | None = None  # a name, or module:name
    since: datetime | None = None  # created at or after
    until: datetime | None = None  # created before
    parent: uuid.UUID | None = None
    error: str | None = None  # text in the error message (case-insensitive)

    def __post_init__(self) -> None:
        for name in ("channel", "processor", "error"):
            if "\x00" in (getattr(self, name) or ""):
                raise ValueError(f"{name}: text with the NUL character matches no task")


@dataclasses.dataclass
class Page:
    """A page of tasks, newest first, and the cursor of the next one (None: the last)."""

    tasks: list[Any]
    next: str | None


@dataclasses.dataclass
class TaskDetail:
    task: Any
    events: list[Any]
    parent: Any | None
    children: list[Any]
    child_count: int
    cancel_requested: Any | None  # the Cancellation of a running task, if any


@dataclasses.dataclass
class ChannelCounts:
    """One channel's queue: pending (due now, or scheduled later), running, finished in the
    last hour per state, and the age of its oldest due task."""

    channel: str
    due: int = 0
    scheduled: int = 0
    running: int = 0
    done_last_hour: int = 0
    failed_last_hour: int = 0
    cancelled_last_hour: int = 0
    oldest_due_age: timedelta | None = None


@dataclasses.dataclass
class WorkerInfo:
    worker: Any
    heartbeat_age: timedelta
    alive: bool
    running: list[Any]  # the tasks it holds now


@dataclasses.dataclass
class ScheduleInfo:
    schedule: Schedule
    next_tick: datetime
    last_tick: datetime | None
    last_task: Any | None


@dataclasses.dataclass
class Throughput:
    """Tasks that ended in each ``step`` of time, from ``start`` (the oldest) to now."""

    start: datetime
    step: timedelta
    done: list[int]
    failed: list[int]


@dataclasses.dataclass
class CancelResult:
    cancelled: list[uuid.UUID]  # pending tasks, CANCELLED now
    requested: list[uuid.UUID]  # running tasks, their workers told to stop them


@dataclasses.dataclass(frozen=True)
class Retention:
    """How long rows are kept after they end (None: for ever)."""

    done: timedelta | None = timedelta(days=7)
    failed: timedelta | None = timedelta(days=30)
    cancelled: timedelta | None = timedelta(days=7)
    events: timedelta | None = timedelta(days=30)
    workers: timedelta | None = timedelta(days=7)
    every: timedelta = timedelta(minutes=10)  # how often a running deployment purges

    def of(self, state: TaskState) -> timedelta | None:
        return getattr(self, state.value.lower())

    def shortest_for_tasks(self) -> timedelta | None:
        kept = [self.of(state) for state in FINAL_STATES if self.of(state) is not None]
        return min(kept, default=None)

    def older_than(self, age: timedelta, states: Iterable[TaskState]) -> Retention:
        """This retention, but keeping tasks of ``states`` and events only ``age`` (a purge
        on demand)."""
        return dataclasses.replace(
            self, **{TaskState(state).value.lower(): age for state in states}, events=age
        )


class Operations:
    """What a person on call does, over one app's tables (and a deployment's schedules)."""

    def __init__(self, app: BeanQueue, schedules: Sequence[Schedule] = ()) -> None:
        self.app = app
        self.task_model, self.worker_model = app.task_model, app.worker_model
        self.event_model = app.event_model
        self.schedule_list = list(schedules)

    # ---- reading ---------------------------------------------------------------------------

    def tasks(
        self,
        session: Session,
        where: TaskFilter | None = None,
        after: str | None = None,
        limit: int = PAGE,
    ) -> Page:
        """A page of tasks matching ``where``, newest first; ``after`` is the previous page's
        ``next`` cursor."""
        query, found = self._matching(where or TaskFilter(), after)
        rows = list(
            session.scalars(
                query.options(defer(found.result))
                .order_by(found.created_at.desc(), found.id.desc())
                .limit(limit + 1)
            )
        )
        last = rows[limit - 1] if len(rows) > limit else None
        cursor = None if last is None else f"{last.created_at.isoformat()}|{last.id}"
        return Page(rows[:limit], cursor)

    def _matching(self, where: TaskFilter, after: str | None = None) -> tuple[Any, Any]:
        """``SELECT`` of the tasks matching ``where`` (older than the cursor ``after``), and
        the entity to order it by."""
        t = self.task_model
        conditions = []
        if where.state is not None:
            conditions.append(t.state == TaskState(where.state))
        if where.channel is not None:
            conditions.append(t.channel == where.channel)
        if where.processor is not None:
            module, _, name = where.processor.rpartition(":")
            conditions.append(t.name == name)
            if module:
                conditions.append(t.module == module)
        if where.since is not None:
            conditions.append(t.created_at >= where.since)
        if where.until is not None:
            conditions.append(t.created_at < where.until)
        if where.parent is not None:
            conditions.append(t.parent_id == where.parent)
        if after is not None:
            created, task_id = _cursor(after)
            conditions.append(tuple_(t.created_at, t.id) < tuple_(created, task_id))
        if not where.error:
            return select(t).where(*conditions), t
        # the text is looked for in the newest SEARCH_ROWS rows that match the rest
        recent = aliased(
            t,
            select(t)
            .where(*conditions)
            .order_by(t.created_at.desc(), t.id.desc())
            .limit(SEARCH_ROWS)
            .subquery("recent"),
        )
        pattern = "%" + _escape_like(where.error) + "%"
        return select(recent).where(recent.error_message.ilike(pattern, escape="\\")), recent

    def task(self, session: Session, task_id: uuid.UUID) -> TaskDetail | None:
        """One task with its events (oldest first), its parent, its first 100 children."""
        t, e = self.task_model, self.event_model
        found = session.get(t, task_id)
        if found is None:
            return None
        events = list(session.scalars(select(e).where(e.task_id == task_id).order_by(e.id)))
        parent = children = None
        child_count = 0
        if hasattr(t, "parent_id"):
            parent = session.get(t, found.parent_id) if found.parent_id else None
            children = list(
                session.scalars(
                    select(t)
                    .where(t.parent_id == task_id)
                    .options(defer(t.result))
                    .order_by(t.created_at, t.id)
                    .limit(100)
                )
            )
            child_count = session.scalar(
                select(func.count()).select_from(t).where(t.parent_id == task_id)
            )
        requested = session.get(Cancellation, task_id)
        return TaskDetail(found, events, parent, children or [], child_count, requested)

    def counts(self, session: Session) -> list[ChannelCounts]:
        """Each channel's queue (channels with nothing pending, running or finished in the
        last hour are left out)."""
        t = self.task_model
        now = func.now()
        by_channel: dict[str, ChannelCounts] = {}

        def of(channel: str) -> ChannelCounts:
            return by_channel.setdefault(channel, ChannelCounts(channel))

        due = t.scheduled_at <= now
        pending = session.execute(
            select(
                t.channel,
                func.count().filter(due),
                func.count().filter(~due),
                (now - func.min(t.scheduled_at).filter(due)),
            )
            .where(t.state == TaskState.PENDING)
            .group_by(t.channel)
        )
        for channel, due_count, later, age in pending:
            counts = of(channel)
            counts.due, counts.scheduled, counts.oldest_due_age = due_count, later, age
        running = session.execute(
            select(t.channel, func.count())
            .where(t.state == TaskState.PROCESSING)
            .group_by(t.channel)
        )
        for channel, count in running:
            of(channel).running = count
        finished = session.execute(
            union_all(
                *(  # one per state: each is served by its state's index
                    select(t.channel, t.state, func.count())
                    .where(t.state == state, t.finished_at >= now - timedelta(hours=1))
                    .group_by(t.channel, t.state)
                    for state in FINAL_STATES
                )
            )
        )
        for channel, state, count in finished:
            setattr(of(channel), f"{TaskState(state).value.lower()}_last_hour", count)
        return sorted(by_channel.values(), key=lambda counts: counts.channel)

    def throughput(
        self, session: Session, window: timedelta = timedelta(hours=1), buckets: int = 60
    ) -> Throughput:
        """How many tasks ended DONE and FAILED in each of ``buckets`` slices of the last
        ``window`` (read from each state's index of finished rows)."""
        t = self.task_model
        step = window / buckets
        now = session.scalar(select(func.now()))
        start = now - step * buckets
        bucket = func.floor(func.extract("epoch", t.finished_at - start) / step.total_seconds())
        rows = session.execute(
            union_all(
                *(
                    select(literal(state.value), bucket, func.count())
                    .where(t.state == state, t.finished_at >= start)
                    .group_by(bucket)
                    for state in (TaskState.DONE, TaskState.FAILED)
                )
            )
        )
        found = Throughput(start, step, [0] * buckets, [0] * buckets)
        for state, index, count in rows:
            if 0 <= index < buckets:
                getattr(found, state.lower())[int(index)] += count
        return found

    def run_summary(
        self, session: Session, channels: Sequence[str], since: datetime
    ) -> dict[str, int]:
        """What became of the tasks of ``channels`` since ``since`` (a burst run's start):
        done, failed, cancelled, retried (waiting for their retry), and still pending."""
        t = self.task_model
        summary = {"done": 0, "failed": 0, "cancelled": 0}
        ended = union_all(
            *(
                select(literal(state.value), func.count()).where(
                    t.state == state, t.finished_at >= since, t.channel.in_(channels)
                )
                for state in FINAL_STATES
            )
        )
        for state, count in session.execute(ended):
            summary[TaskState(state).value.lower()] += count
        retried, pending = session.execute(
            select(func.count().filter(t.finished_at >= since), func.count()).where(
                t.state == TaskState.PENDING, t.channel.in_(channels)
            )
        ).one()
        return summary | {"retried": retried, "pending": pending}

    def workers(self, session: Session, gone: int = 20) -> list[WorkerInfo]:
        """Running workers, and the ``gone`` most recently seen of the others."""
        w, t = self.worker_model, self.task_model
        timeout = timedelta(seconds=self.app.config.WORKER_HEARTBEAT_TIMEOUT)
        now = session.scalar(select(func.now()))
        running = list(session.scalars(select(w).where(w.state == "RUNNING")))
        others = list(
            session.scalars(
                select(w).where(w.state != "RUNNING").order_by(w.last_heartbeat.desc()).limit(gone)
            )
        )
        held: dict[Any, list[Any]] = {}
        if running:
            rows = session.scalars(
                select(t)
                .where(t.state == TaskState.PROCESSING, t.worker_id.in_([x.id for x in running]))
                .options(defer(t.result))
            )
            for task in rows:
                held.setdefault(task.worker_id, []).append(task)
        return [
            WorkerInfo(
                worker,
                now - worker.last_heartbeat,
                worker.state == "RUNNING" and now - worker.last_heartbeat < timeout,
                held.get(worker.id, []),
            )
            for worker in running + others
        ]

    def schedules(self, session: Session) -> list[ScheduleInfo]:
        """The deployment's schedules: the next tick, the last one enqueued and its task."""
        now = datetime.now(timezone.utc)
        states = {
            state.name: state
            for state in session.scalars(
                select(ScheduleState).where(
                    ScheduleState.name.in_([s.name for s in self.schedule_list])
                )
            )
        }
        found = []
        for schedule in self.schedule_list:
            state = states.get(schedule.name)
            last_task = (
                session.get(self.task_model, state.last_task_id)
                if state is not None and state.last_task_id
                else None
            )
            found.append(
                ScheduleInfo(
                    schedule,
                    schedule.next_tick(now),
                    state.last_tick if state is not None else None,
                    last_task,
                )
            )
        return found

    # ---- acting ----------------------------------------------------------------------------

    def retry(self, session: Session, ids: Iterable[uuid.UUID], by: str | None = None) -> int:
        """Take failed or cancelled tasks back to PENDING, due now, with a fresh count of
        attempts (their retry policy applies in full again; their history stays in their
        events). Other tasks in ``ids`` are left alone. Returns how many were retried."""
        t = self.task_model
        retried = session.execute(
            update(t)
            .where(
                t.id.in_(list(ids)),
                t.state.in_([TaskState.FAILED, TaskState.CANCELLED]),
            )
            .values(
                state=TaskState.PENDING,
                attempts=0,
                crash_count=0,
                scheduled_at=func.clock_timestamp(),
                worker_id=None,
                started_at=None,
                finished_at=None,
                result=None,
            )
            .returning(t.id, t.channel)
            .execution_options(synchronize_session=False)
        ).all()
        by = by or operator()
        self._record(session, [row.id for row in retried], "RETRIED", f"retried by {by}")
        notify_channels(session, {row.channel for row in retried})
        return len(retried)

    def retry_matching(self, session: Session, where: TaskFilter, by: str | None = None) -> int:
        """``retry`` up to CHUNK of the failed (or, with ``where.state``, cancelled) tasks
        matching ``where``; call again (after a commit) until it returns 0."""
        state = where.state or TaskState.FAILED
        if state not in (TaskState.FAILED, TaskState.CANCELLED):
            raise BeanflowError(f"only FAILED or CANCELLED tasks can be retried, not {state}")
        chosen = dataclasses.replace(where, state=state)
        query, found = self._matching(chosen)
        ids = session.scalars(query.with_only_columns(found.id).limit(CHUNK)).all()
        return self.retry(session, ids, by) if ids else 0

    def retry_all(self, where: TaskFilter, by: str | None = None) -> int:
        """``retry_matching`` chunk after chunk, each in its own transaction, until none is
        left; returns how many were retried."""
        total = 0
        while True:
            with self.app.session_factory() as session:
                count = self.retry_matching(session, where, by)
                session.commit()
            if not count:
                return total
            total += count

    def cancel(
        self,
        session: Session,
        ids: Iterable[uuid.UUID],
        descendants: bool = False,
        by: str | None = None,
    ) -> CancelResult:
        """Cancel tasks (and, with ``descendants``, every task below them): a pending one is
        CANCELLED now and never runs; a running one's worker is notified on commit and
        interrupts it the way a timeout does (its changes rolled back, then CANCELLED); a
        finished one is left alone."""
        by = by or operator()
        t = self.task_model
        chosen = list(ids)
        if descendants and hasattr(t, "parent_id"):
            chosen = self._with_descendants(session, chosen)
        pending = (
            session.execute(
                update(t)
                .where(t.id.in_(chosen), t.state == TaskState.PENDING)
                .values(
                    state=TaskState.CANCELLED,
                    finished_at=func.clock_timestamp(),
                    error_message=f"cancelled by {by}",
                )
                .returning(t.id)
                .execution_options(synchronize_session=False)
            )
            .scalars()
            .all()
        )
        self._record(session, pending, "CANCELLED", f"cancelled by {by}")
        requested = (
            session.execute(
                pg_insert(Cancellation)
                .from_select(
                    ["task_id", "requested_by"],
                    select(t.id, literal(by)).where(
                        t.id.in_(chosen), t.state == TaskState.PROCESSING
                    ),
                )
                .on_conflict_do_nothing()
                .returning(Cancellation.task_id)
            )
            .scalars()
            .all()
        )
        if requested:
            session.execute(notify(CONTROL_CHANNEL))
        return CancelResult(list(pending), list(requested))

    def _with_descendants(self, session: Session, ids: list[uuid.UUID]) -> list[uuid.UUID]:
        t = self.task_model
        tree = select(t.id).where(t.id.in_(ids)).cte("tree", recursive=True)
        tree = tree.union(select(t.id).where(t.parent_id == tree.c.id))
        return list(session.scalars(select(tree.c.id)))

    def _record(self, session: Session, ids: list[uuid.UUID], kind: str, message: str) -> None:
        if ids and self.app.config.EVENTS:
            session.execute(
                insert(self.event_model),
                [{"task_id": i, "type": kind, "error_message": message} for i in ids],
            )

    def watch(self, session: Session, task_id: uuid.UUID) -> None:
        """Have the end of ``task_id`` announced to ``wait`` (in the caller's transaction,
        best the one that enqueues the task)."""
        session.execute(pg_insert(Waiter).values(task_id=task_id).on_conflict_do_nothing())

    def wait(self, task_id: uuid.UUID, timeout: float | None = None) -> Any | None:
        """Sleep on LISTEN until the watched task ``task_id`` ends; returns it (detached), or
        None after ``timeout`` seconds. The statement that ends a task announces it; a look
        every 30 s also catches an end that does not (a dead worker's task failed by the
        reaper). Removes the task's Waiter row."""
        t = self.task_model

        def ended(session: Session) -> tuple[bool, Any]:
            task = session.get(t, task_id)
            if task is not None and task.state not in FINAL_STATES:
                return False, None
            session.execute(delete(Waiter).where(Waiter.task_id == task_id))
            session.commit()
            return True, task

        return listen_until(self.app, DONE_CHANNEL, ended, timeout)

    # ---- retention -------------------------------------------------------------------------

    def purge(
        self,
        session: Session,
        retention: Retention,
        states: Iterable[TaskState] = FINAL_STATES,
        chunk: int = CHUNK,
    ) -> dict[str, int]:
        """Delete one chunk of what ``retention`` no longer keeps: finished tasks of
        ``states`` (a task only once it has no children left: a tree goes leaves first, and
        with each task its events; a task that a row of another table still references,
        through a foreign key that forbids its deletion, stays), old events, long-gone
        workers' rows and settled cancellations. Returns the rows deleted per kind; call again
        (after a commit) until every count is 0. Each chunk locks only its own rows (SKIP
        LOCKED). Foreign keys are not relied on to delete or unlink anything: custom models
        may declare them without ON DELETE actions."""
        t, e, w = self.task_model, self.event_model, self.worker_model
        deleted = {}
        referenced = self._referenced(session)
        for state in states:
            kept = retention.of(TaskState(state))
            if kept is None:
                continue
            chosen = (
                select(t.id)
                .where(t.state == state, t.finished_at < func.now() - kept, self._leaf())
                .where(self._not_in_a_running_run(), *referenced)
                .order_by(t.finished_at)
                .limit(chunk)
                .with_for_update(skip_locked=True)
                .cte("chosen")
            )
            its_events = delete(e).where(e.task_id.in_(select(chosen.c.id))).cte("its_events")
            deleted[f"tasks {TaskState(state).value.lower()}"] = session.execute(
                delete(t)
                .where(t.id.in_(select(chosen.c.id)))
                .add_cte(its_events)
                .execution_options(synchronize_session=False)
            ).rowcount
        for state in states:  # runs ended that long ago, with their steps' rows
            kept = retention.of(TaskState(state))
            if kept is not None:
                ended = (
                    select(WorkflowRun.id)
                    .where(
                        WorkflowRun.state == RunState(TaskState(state).value),
                        WorkflowRun.finished_at < func.now() - kept,
                    )
                    .limit(chunk)
                    .with_for_update(skip_locked=True)
                )
                deleted[f"runs {TaskState(state).value.lower()}"] = session.execute(
                    delete(WorkflowRun)
                    .where(WorkflowRun.id.in_(ended))
                    .execution_options(synchronize_session=False)
                ).rowcount
        if retention.events is not None:
            oldest = select(e.id).order_by(e.id).limit(chunk)
            deleted["events"] = session.execute(
                delete(e)
                .where(e.id.in_(oldest), e.created_at < func.now() - retention.events)
                .execution_options(synchronize_session=False)
            ).rowcount
        if retention.workers is not None:
            gone = (
                select(w.id)
                .where(
                    w.state != "RUNNING",
                    w.last_heartbeat < func.now() - retention.workers,
                    # a task it still holds is the reaper's to take back, by this row
                    ~exists().where(t.worker_id == w.id, t.state == TaskState.PROCESSING),
                )
                .limit(10)
            )
            gone_ids = session.scalars(gone.with_for_update(skip_locked=True)).all()
            if gone_ids:  # unlinked from their tasks first (a table scan: ten at a time)
                session.execute(
                    update(t)
                    .where(t.worker_id.in_(gone_ids))
                    .values(worker_id=None)
                    .execution_options(synchronize_session=False)
                )
            deleted["workers"] = session.execute(
                delete(w).where(w.id.in_(gone_ids)).execution_options(synchronize_session=False)
            ).rowcount
        deleted["cancellations"] = session.execute(
            delete(Cancellation)
            .where(~exists().where(t.id == Cancellation.task_id, t.state == TaskState.PROCESSING))
            .execution_options(synchronize_session=False)
        ).rowcount
        deleted["waiters"] = session.execute(  # of tasks ended, or gone, a day ago
            delete(Waiter)
            .where(
                Waiter.since < func.now() - timedelta(days=1),
                ~exists().where(t.id == Waiter.task_id, t.state.not_in(FINAL_STATES)),
            )
            .execution_options(synchronize_session=False)
        ).rowcount
        return deleted

    def _not_in_a_running_run(self) -> Any:
        """True for a task that is no step of a running workflow run (whose later steps may
        still read its result)."""
        t = self.task_model
        if not hasattr(t, "workflow_run_id"):
            return literal(True)
        running = exists().where(
            WorkflowRun.id == t.workflow_run_id, WorkflowRun.state == RunState.RUNNING
        )
        return t.workflow_run_id.is_(None) | ~running

    def _referenced(self, session: Session) -> list[Any]:
        """A condition per foreign key of another table (the events' and the tasks' own
        aside) that references the task table and forbids deleting a task it points at (ON
        DELETE NO ACTION or RESTRICT): no row of that table points at the task. Read from the
        catalog, so that the user's own tables count."""
        t, e = self.task_model, self.event_model
        quoted = session.get_bind().dialect.identifier_preparer.format_table
        keys = session.execute(
            text(
                "SELECT n.nspname, c.relname, a.attname FROM pg_constraint k "
                "JOIN pg_class c ON c.oid = k.conrelid "
                "JOIN pg_namespace n ON n.oid = c.relnamespace "
                "JOIN pg_attribute a ON a.attrelid = k.conrelid AND a.attnum = k.conkey[1] "
                "WHERE k.contype = 'f' AND k.confrelid = to_regclass(:tasks) "
                "AND cardinality(k.conkey) = 1 AND k.confdeltype IN ('a', 'r') "
                "AND k.conrelid NOT IN (to_regclass(:tasks), to_regclass(:events)) "
                "ORDER BY 1, 2, 3"
            ),
            {"tasks": quoted(t.__table__), "events": quoted(e.__table__)},
        ).all()
        return [
            ~exists().where(table(name, column(key), schema=schema).c[key] == t.id)
            for schema, name, key in keys
        ]

    def _leaf(self) -> Any:
        """True for a task that has no children (any task, when the model has no parents)."""
        t = self.task_model
        if not hasattr(t, "parent_id"):
            return literal(True)
        child = t.__table__.alias("child")
        return ~exists().where(child.c.parent_id == t.id)

    def purge_all(
        self,
        retention: Retention,
        states: Iterable[TaskState] = FINAL_STATES,
        progress: Callable[[dict[str, int]], None] | None = None,
        stopping: threading.Event | None = None,
        pause: float = 0.0,
    ) -> dict[str, int]:
        """``purge`` chunk after chunk, each in its own transaction, until nothing is left to
        delete (or ``stopping`` is set); ``progress`` is told each chunk's counts. After each
        chunk it rests ``pause`` times as long as the chunk took (a background purge leaves
        the server to the workers). Returns the totals."""
        totals: dict[str, int] = {}
        states = list(states)
        stopping = stopping or threading.Event()
        while not stopping.is_set():
            started = time.monotonic()
            with self.app.session_factory() as session:
                deleted = self.purge(session, retention, states)
                session.commit()
            for kind, count in deleted.items():
                totals[kind] = totals.get(kind, 0) + count
            if progress is not None:
                progress(deleted)
            if not any(n for kind, n in deleted.items() if kind not in _SIDE_TABLES):
                break
            if pause:
                stopping.wait((time.monotonic() - started) * pause)
        return totals


def listen_until(
    app: BeanQueue,
    channel: str,
    look: Callable[[Session], tuple[bool, Any]],
    timeout: float | None = None,
) -> Any | None:
    """Sleep on LISTEN ``channel`` until ``look`` (called in a session of its own, at first,
    on each notification and every 30 s) says ``(True, value)``; returns that value (detached),
    or None after ``timeout`` seconds."""
    deadline = None if timeout is None else time.monotonic() + timeout
    listener = Listener(app.engine, [channel])  # before the first look
    try:
        while True:
            with app.session_factory(expire_on_commit=False) as session:
                done, value = look(session)
                if done:
                    return value
            left = 30.0 if deadline is None else deadline - time.monotonic()
            if left <= 0:
                return None
            listener.wait(min(left, 30.0))
    finally:
        listener.close()


# exit statuses of a burst run (``beanflow run --burst``, ``process --burst``)
TASKS_FAILED = 3
TASKS_PENDING = 4


def database_now(app: BeanQueue) -> datetime:
    """The database server's clock (what the tasks' timestamps are read against)."""
    with app.engine.connect() as connection:
        return connection.scalar(select(func.now()))


def report_burst(
    app: BeanQueue, channels: Sequence[str], since: datetime, fail_on_pending: bool = False
) -> int:
    """Log one line saying what a burst run did, and return its exit status: TASKS_FAILED
    when a task failed for good, TASKS_PENDING when tasks are still pending and
    ``fail_on_pending``, else 0."""
    with app.session_factory() as session:
        summary = Operations(app).run_summary(session, channels, since)
    logger.info(
        "burst over: %s",
        ", ".join(f"{count} {kind}" for kind, count in summary.items()),
        extra={"summary": summary},
    )
    if summary["failed"]:
        return TASKS_FAILED
    if fail_on_pending and summary["pending"]:
        return TASKS_PENDING
    return 0


# what a purge also clears, without its counts deciding whether another chunk is needed
_SIDE_TABLES = ("cancellations", "waiters")


class RetentionService(PeriodicService):
    """Purges what a deployment's retention no longer keeps, every ``retention.every``, in
    chunks; one instance at a time across every host (a session-level advisory lock, taken
    outside any open transaction)."""

    name = "retention"
    LOCK_KEY = 0x6265616E666C6F77  # "beanflow"
    PAUSE = 3.0  # rest three times as long as each chunk took: a quarter of one connection

    def __init__(self, ops: Operations, retention: Retention) -> None:
        super().__init__(retention.every.total_seconds(), threading.Event())
        self.ops, self.retention = ops, retention

    def run_once(self) -> None:
        with self.ops.app.engine.connect() as lock:
            held = lock.execute(select(func.pg_try_advisory_lock(self.LOCK_KEY))).scalar()
            lock.commit()
            if not held:
                return  # another deployment's retention is at work
            try:
                totals = self.ops.purge_all(
                    self.retention, stopping=self.stopping, pause=self.PAUSE
                )
            finally:
                lock.execute(select(func.pg_advisory_unlock(self.LOCK_KEY)))
                lock.commit()
        if any(totals.values()):
            logger.info(
                "retention: deleted %s",
                ", ".join(f"{count:,} {kind}" for kind, count in totals.items() if count),
            )


def parse_moment(text: str) -> datetime:
    """A moment given as an ISO 8601 time (local time when it names no zone) or as a
    duration back from now (``30m``, ``1h``, ``7d``); ValueError says what is wrong."""
    try:
        moment = datetime.fromisoformat(text)
        return moment if moment.tzinfo else moment.astimezone()
    except ValueError:
        pass
    try:
        return datetime.now(timezone.utc) - timedelta(seconds=parse_duration(text))
    except DurationTooLong:
        raise
    except ValueError:
        raise ValueError(
            f"{text!r} is neither a duration (30m, 1h, 7d) nor an ISO 8601 time"
        ) from None


def format_age(delta: timedelta | None) -> str:
    """``4.2s``, ``3.0m``, ``1.5h``, ``2.0d``; ``-`` for None."""
    if delta is None:
        return "-"
    seconds = max(delta.total_seconds(), 0)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.1f}s"


def _cursor(text: str) -> tuple[datetime, uuid.UUID]:
    try:
        created, task_id = text.split("|")
        return datetime.fromisoformat(created), uuid.UUID(task_id)
    except ValueError:
        raise BeanflowError(f"not a page cursor: {text!r}") from None


def _escape_like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


__all__ = [
    "CancelResult",
    "ChannelCounts",
    "Operations",
    "Page",
    "Retention",
    "RetentionService",
    "ScheduleInfo",
    "TaskDetail",
    "TaskFilter",
    "Throughput",
    "WorkerInfo",
    "format_age",
    "operator",
    "parse_moment",
]

"""Every SQL statement of the hot path, named, in one place.

Statements are built once per set of models (custom models change the table names) with
SQLAlchemy Core and executed with bind parameters. Each one is a single round trip; where a
transition also writes its Event row, the insert rides in the same statement as a
data-modifying CTE. Literal state names (not bind parameters) keep each predicate identical to
the partial index's ``state = 'PENDING'``, so the planner can prove the index applies.
"""

from __future__ import annotations

import functools
from typing import Any

from sqlalchemy import (
    ARRAY,
    Boolean,
    DateTime,
    Integer,
    Interval,
    String,
    Text,
    and_,
    any_,
    bindparam,
    case,
    cast,
    func,
    insert,
    literal_column,
    not_,
    or_,
    select,
    text,
    union_all,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.postgresql.psycopg2 import PGDialect_psycopg2
from sqlalchemy.engine import Connection
from sqlalchemy.sql import Executable

PENDING = literal_column("'PENDING'")
PROCESSING = literal_column("'PROCESSING'")
DONE = literal_column("'DONE'")
FAILED = literal_column("'FAILED'")


def channel_parameters(channels: list[str]) -> dict[str, str]:
    """Bind parameters of the per-channel statements (``claim``, ``next_due``)."""
    return {f"channel_{i}": channel for i, channel in enumerate(channels)}


class Queries:
    """The hot-path statements for one (task, worker, event) model set."""

    def __init__(
        self,
        task_model: type,
        worker_model: type,
        event_model: type,
        events: bool = True,
        channel_count: int = 1,
        batch_size: int = 1,
    ) -> None:
        self.task = task_model.__table__
        self.worker = worker_model.__table__
        self.event = event_model.__table__
        self.events = events
        self.channel_count = channel_count
        self.batch_size = int(batch_size)

    def _pending_of_each_channel(self, *columns: Any) -> list[Any]:
        """One ``SELECT columns … ORDER BY scheduled_at`` of pending rows per channel.

        One equality per statement, not ``channel = ANY(…)``: only an equality lets the
        (channel, scheduled_at) index deliver rows in order, so the cost stays that of the rows
        taken, not of every pending row to be sorted.
        """
        t = self.task
        return [
            select(*columns)
            .where(t.c.state == PENDING, t.c.channel == bindparam(f"channel_{i}", type_=String))
            .order_by(t.c.scheduled_at)
            for i in range(self.channel_count)
        ]

    def _with_events(self, statement: Any, source: Any, columns: dict[str, Any]) -> Any:
        """Add ``INSERT INTO event SELECT … FROM source`` to ``statement`` when events are on."""
        if not self.events:
            return statement
        written = insert(self.event).from_select(
            list(columns),
            select(*[value.label(name) for name, value in columns.items()]).select_from(source),
        )
        return statement.add_cte(written.cte(f"{source.name}_events"))

    @functools.cached_property
    def claim(self) -> Executable:
        """Claim up to batch_size due PENDING tasks of :channel_N for :worker; returns them.

        The row selection is a MATERIALIZED CTE so it runs exactly once: inlined into the
        UPDATE, the planner may re-run a SKIP LOCKED subquery and claim more rows than asked.
        """
        t = self.task
        # The batch size is written into the statement, not bound: a prepared statement's
        # generic plan guesses a bound LIMIT at a tenth of the table, and PostgreSQL 18 then
        # joins the UPDATE with a sequential scan of every task.
        limit = literal_column(str(self.batch_size))
        due_now = t.c.scheduled_at <= func.now()
        each = [
            branch.where(due_now).limit(limit).with_for_update(skip_locked=True)
            for branch in self._pending_of_each_channel(t.c.id, t.c.scheduled_at, t.c.crash_count)
        ]
        if len(each) == 1:
            candidates = each[0].cte("candidates").prefix_with("MATERIALIZED")
        else:
            # several channels: the oldest :limit of each channel's oldest :limit (the extra
            # rows locked here are unlocked when the claim commits)
            branches = [
                b.cte(f"channel_{i}").prefix_with("MATERIALIZED") for i, b in enumerate(each)
            ]
            union = union_all(*[select(b) for b in branches]).subquery("each_channel")
            candidates = (
                select(union)
                .order_by(union.c.scheduled_at)
                .limit(limit)
                .cte("candidates")
                .prefix_with("MATERIALIZED")
            )
        # A task whose worker died under it may be what killed it: at most one such task per
        # claim, so that if it kills this worker too, no neighbour is taken down with it.
        first_suspect = (
            select(candidates.c.id)
            .where(candidates.c.crash_count > 0)
            .order_by(candidates.c.scheduled_at)
            .limit(1)
            .scalar_subquery()
        )
        due = (
            select(candidates.c.id)
            .where(or_(candidates.c.crash_count == 0, candidates.c.id == first_suspect))
            .cte("due")
        )
        claimed = (
            update(t)
            .where(t.c.id == due.c.id)
            .values(
                state=PROCESSING,
                worker_id=bindparam("worker"),
                attempts=t.c.attempts + 1,
                started_at=func.clock_timestamp(),
            )
            .returning(*t.c)
            .cte("claimed")
        )
        statement = select(claimed).order_by(claimed.c.scheduled_at)
        return self._with_events(
            statement, claimed, {"task_id": claimed.c.id, "type": literal_column("'CLAIMED'")}
        )

    @functools.cached_property
    def complete(self) -> Executable:
        """Mark the tasks :task_ids DONE with their :task_results (JSON texts, in the same
        order), only those :worker still holds; returns how many it marked. Fewer than given
        means some were taken away (re-queued after a missed heartbeat): the caller rolls back.
        One statement for a whole batch, so its completions cost one round trip."""
        t = self.task
        finished = select(
            func.unnest(bindparam("task_ids", type_=ARRAY(t.c.id.type))).label("id"),
            func.unnest(bindparam("task_results", type_=ARRAY(Text))).label("result"),
        ).subquery("finished")
        done = (
            update(t)
            .where(
                t.c.id == finished.c.id,
                t.c.worker_id == bindparam("worker"),
                t.c.state == PROCESSING,
            )
            .values(
                state=DONE,
                result=cast(finished.c.result, t.c.result.type),
                finished_at=func.clock_timestamp(),
                error_message=None,
            )
            .returning(t.c.id)
            .cte("done")
        )
        return self._with_events(
            select(func.count()).select_from(done),
            done,
            {"task_id": done.c.id, "type": literal_column("'COMPLETE'")},
        )

    @functools.cached_property
    def fail(self) -> Executable:
        """Record a failed attempt of :task_id held by :worker: FAILED, or back to PENDING at
        :retry_at when :retry_at is not null; returns its id, or nothing when not held."""
        t = self.task
        retry_at = bindparam("retry_at", type_=DateTime(timezone=True))
        retrying = retry_at.is_not(None)
        failed = (
            update(t)
            .where(
                t.c.id == bindparam("task_id"),
                t.c.worker_id == bindparam("worker"),
                t.c.state == PROCESSING,
            )
            .values(
                state=case((retrying, PENDING), else_=FAILED),
                scheduled_at=func.coalesce(retry_at, t.c.scheduled_at),
                worker_id=case((retrying, None), else_=t.c.worker_id),
                error_message=bindparam("error", type_=Text),
                finished_at=func.clock_timestamp(),
            )
            .returning(t.c.id, t.c.state)
            .cte("failed")
        )
        return self._with_events(
            select(failed.c.id),
            failed,
            {
                "task_id": failed.c.id,
                "type": case(
                    (failed.c.state == PENDING, literal_column("'FAILED_RETRY_SCHEDULED'")),
                    else_=literal_column("'FAILED'"),
                ),
                "error_message": bindparam("error", type_=Text),
                "exception_type": bindparam("exception_type", type_=String),
                "traceback": bindparam("traceback", type_=Text),
                "scheduled_at": retry_at,
            },
        )

    @functools.cached_property
    def release(self) -> Executable:
        """Return every task :worker still holds to PENDING (on shutdown, or after it lost its
        connection); tasks in :unstarted get their attempt back. When :lost, the others were
        running when the connection died: like a dead worker's, each counts a crash, and one
        at :max_crashes is FAILED (a task that keeps breaking its connection, say by staying
        idle in its transaction past the server's limit, cannot stall the queue). Notifies the
        channels of the tasks returned to PENDING."""
        t = self.task
        unstarted = t.c.id == any_(bindparam("unstarted", type_=ARRAY(t.c.id.type)))
        interrupted = and_(bindparam("lost", type_=Boolean), not_(unstarted))
        gives_up = and_(interrupted, t.c.crash_count + 1 >= bindparam("max_crashes", Integer))
        released = (
            update(t)
            .where(t.c.worker_id == bindparam("worker"), t.c.state == PROCESSING)
            .values(
                state=case((gives_up, FAILED), else_=PENDING),
                worker_id=None,
                started_at=None,
                finished_at=case((gives_up, func.clock_timestamp()), else_=None),
                attempts=t.c.attempts - case((unstarted, 1), else_=0),
                crash_count=t.c.crash_count + case((interrupted, 1), else_=0),
                error_message=case(
                    (
                        gives_up,
                        func.concat(
                            "its worker died or lost its database connection ",
                            t.c.crash_count + 1,
                            " times while running it",
                        ),
                    ),
                    else_=t.c.error_message,
                ),
            )
            .returning(t.c.id, t.c.channel, t.c.state, t.c.error_message)
            .cte("released")
        )
        statement = self._notify_channels(released, released.c.channel, released.c.state == PENDING)
        return self._with_events(
            statement,
            released,
            {
                "task_id": released.c.id,
                "type": case(
                    (released.c.state == FAILED, literal_column("'FAILED'")),
                    else_=literal_column("'REQUEUED'"),
                ),
                "error_message": case(
                    (released.c.state == FAILED, released.c.error_message),
                    else_=literal_column("'its worker stopped before finishing it'"),
                ),
            },
        )

    @functools.cached_property
    def next_due(self) -> Executable:
        """Seconds until the earliest PENDING task of :channel_N is due (negative when due,
        NULL when none). Rows locked by a claim in progress are skipped, not waited for."""
        t = self.task
        earliest = [
            branch.limit(1)
            .with_for_update(read=True, key_share=True, skip_locked=True)
            .scalar_subquery()
            for branch in self._pending_of_each_channel(t.c.scheduled_at)
        ]
        soonest = earliest[0] if len(earliest) == 1 else func.least(*earliest)
        return select(func.extract("epoch", soonest - func.clock_timestamp()))

    @functools.cached_property
    def due_channels(self) -> Executable:
        """Which of :channels have a PENDING task due now (a burst run's "anything left?")."""
        t = self.task
        return (
            select(t.c.channel)
            .where(
                t.c.state == PENDING,
                t.c.channel == any_(bindparam("channels", type_=ARRAY(String))),
                t.c.scheduled_at <= func.now(),
            )
            .distinct()
        )

    @functools.cached_property
    def heartbeat(self) -> Executable:
        """Record that :worker is alive; returns its state (not RUNNING once it was reaped)."""
        w = self.worker
        return (
            update(w)
            .where(w.c.id == bindparam("worker"))
            .values(last_heartbeat=func.now())
            .returning(w.c.state)
        )

    @functools.cached_property
    def reap(self) -> Executable:
        """Mark RUNNING workers silent for :timeout seconds NO_HEARTBEAT and, in the same
        statement, return their PROCESSING tasks to PENDING, or FAIL those whose workers have
        now died :max_crashes times under them. Returns (workers, tasks) counts."""
        w, t = self.worker, self.task
        dead = (
            update(w)
            .where(
                w.c.state == literal_column("'RUNNING'"),
                w.c.last_heartbeat < func.now() - bindparam("timeout", type_=Interval),
            )
            .values(state=literal_column("'NO_HEARTBEAT'"))
            .returning(w.c.id)
            .cte("dead")
        )
        gives_up = t.c.crash_count + 1 >= bindparam("max_crashes", type_=Integer)
        message = func.concat("its worker ", dead.c.id, " stopped heartbeating")
        requeued = (
            update(t)
            .where(t.c.worker_id == dead.c.id, t.c.state == PROCESSING)
            .values(
                state=case((gives_up, FAILED), else_=PENDING),
                crash_count=t.c.crash_count + 1,
                worker_id=None,
                finished_at=case((gives_up, func.clock_timestamp()), else_=None),
                error_message=case(
                    (
                        gives_up,
                        func.concat(
                            "its worker died ", t.c.crash_count + 1, " times while running it"
                        ),
                    ),
                    else_=message,
                ),
            )
            .returning(t.c.id, t.c.channel, t.c.state, t.c.error_message)
            .cte("requeued")
        )
        notified = self._notify_channels(requeued, requeued.c.channel, requeued.c.state == PENDING)
        counts = select(
            select(func.count()).select_from(dead).scalar_subquery().label("workers"),
            select(func.count()).select_from(requeued).scalar_subquery().label("tasks"),
            select(func.count())
            .select_from(notified.subquery())
            .scalar_subquery()
            .label("channels"),
        )
        return self._with_events(
            counts,
            requeued,
            {
                "task_id": requeued.c.id,
                "type": case(
                    (requeued.c.state == FAILED, literal_column("'FAILED'")),
                    else_=literal_column("'REQUEUED'"),
                ),
                "error_message": requeued.c.error_message,
            },
        )

    @staticmethod
    def _notify_channels(source: Any, channel: Any, *where: Any) -> Any:
        """``SELECT pg_notify(channel, '')`` once per distinct channel of ``source``."""
        channels = select(channel.label("channel")).where(*where).distinct().subquery()
        return select(func.pg_notify(channels.c.channel, ""))

    @functools.cached_property
    def enqueue_unique(self) -> Executable:
        """Insert a task unless one with the same :unique_key exists (any state); returns its
        id only when inserted, and then notifies its channel. Concurrent inserters of one key:
        exactly one wins, by the partial unique index."""
        t = self.task
        inserted = (
            pg_insert(t)
            .values(
                id=bindparam("task_id"),
                channel=bindparam("task_channel", type_=String),
                module=bindparam("task_module", type_=String),
                name=bindparam("task_name", type_=String),
                kwargs=bindparam("task_kwargs", type_=t.c.kwargs.type),
                scheduled_at=bindparam("task_scheduled_at", type_=DateTime(timezone=True)),
                unique_key=bindparam("task_unique_key", type_=String),
            )
            .on_conflict_do_nothing(
                index_elements=[t.c.unique_key], index_where=t.c.unique_key.is_not(None)
            )
            .returning(t.c.id, t.c.channel)
            .cte("inserted")
        )
        return select(inserted.c.id, func.pg_notify(inserted.c.channel, ""))

    @functools.cached_property
    def register(self) -> Executable:
        """Insert the row of a starting worker."""
        return insert(self.worker)

    @functools.cached_property
    def shut_down(self) -> Executable:
        """Mark :worker SHUTDOWN (a clean stop), unless it was already found dead."""
        w = self.worker
        return (
            update(w)
            .where(w.c.id == bindparam("worker"), w.c.state == literal_column("'RUNNING'"))
            .values(state=literal_column("'SHUTDOWN'"))
        )


# renders $1, $2 … as PREPARE needs, and lists the parameters in that order
_POSITIONAL = PGDialect_psycopg2(paramstyle="numeric_dollar")


class Prepared:
    """A statement PREPAREd on a connection: parsed and planned once, then EXECUTEd.

    psycopg2 sends every statement as text, to be parsed and planned again each time; for the
    claim, planning costs more than running it (0.55 ms against 0.3 ms here). A worker prepares
    its hot statements on its own connection, once.
    """

    def __init__(self, name: str, statement: Any, *columns: Any) -> None:
        compiled = statement.compile(dialect=_POSITIONAL)
        self.definition = f"PREPARE {name} AS {compiled}"
        by_name = {rendered: bind for bind, rendered in compiled.bind_names.items()}
        names = list(compiled.positiontup or [])
        # the caller's parameters keep their names; the statement's constants their values
        self.execute = (
            text(f"EXECUTE {name}({', '.join(':' + n for n in names)})")
            .bindparams(
                *[
                    bindparam(n, type_=by_name[n].type)
                    if by_name[n].required
                    else bindparam(n, value=by_name[n].value, type_=by_name[n].type)
                    for n in names
                ]
            )
            .columns(*columns)
        )

    def prepare(self, connection: Connection) -> None:
        connection.exec_driver_sql(self.definition)

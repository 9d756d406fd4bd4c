"""A task's statements: insert, claim, complete, fail, and the due-time look-ups."""

from __future__ import annotations

import datetime
import functools
from collections.abc import Callable
from typing import Any

from sqlalchemy import (
    ARRAY,
    DateTime,
    Integer,
    String,
    Table,
    Text,
    any_,
    bindparam,
    case,
    cast,
    func,
    insert,
    literal_column,
    or_,
    select,
    union_all,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.sql import Executable

from .common import DONE, FAILED, PENDING, PROCESSING, Statements, counted_up

TIMESTAMPTZ = DateTime(timezone=True)
BEFORE_ANY_TASK = datetime.datetime(1, 1, 1, tzinfo=datetime.timezone.utc)


@functools.cache
def enqueue_many(table: Table) -> Executable:
    """Insert one task of :task_channel/:task_module/:task_name per element of :arguments
    (JSON texts), children of :parent_id (null for none). One array parameter for all rows:
    the statement's size does not grow with them."""
    columns = {
        "channel": bindparam("task_channel", type_=String),
        "module": bindparam("task_module", type_=String),
        "name": bindparam("task_name", type_=String),
        "kwargs": cast(func.unnest(bindparam("arguments", type_=ARRAY(Text))), table.c.kwargs.type),
    }
    if "parent_id" in table.c:
        columns["parent_id"] = bindparam("parent_id", type_=table.c.parent_id.type)
    rows = select(*[value.label(name) for name, value in columns.items()])
    return insert(table).from_select(list(columns), rows, include_defaults=False)


@functools.cache
def enqueue_one(table: Table, columns: tuple[str, ...], notify: bool) -> Executable:
    """Insert one task whose ``columns`` are bind parameters of their own names (the others
    take their defaults); with ``notify``, ``RETURNING pg_notify(:notify_channel, '')``: one
    round trip where a flush and a separate NOTIFY take two."""
    statement = insert(table).values(
        {name: bindparam(name, type_=table.c[name].type) for name in columns}
    )
    if notify:
        statement = statement.returning(
            func.pg_notify(bindparam("notify_channel", type_=String), "")
        )
    return statement


@functools.cache
def enqueue_unique(table: Table) -> Executable:
    """Insert a task unless one with the same :task_unique_key exists (any state); returns its
    id only when inserted, and then notifies its channel. Concurrent inserters of one key:
    exactly one wins, by the partial unique index."""
    inserted = (
        pg_insert(table)
        .values(
            id=bindparam("task_id"),
            channel=bindparam("task_channel", type_=String),
            module=bindparam("task_module", type_=String),
            name=bindparam("task_name", type_=String),
            kwargs=bindparam("task_kwargs", type_=table.c.kwargs.type),
            scheduled_at=bindparam("task_scheduled_at", type_=TIMESTAMPTZ),
            unique_key=bindparam("task_unique_key", type_=String),
        )
        .on_conflict_do_nothing(
            index_elements=[table.c.unique_key], index_where=table.c.unique_key.is_not(None)
        )
        .returning(table.c.id, table.c.channel)
        .cte("inserted")
    )
    return select(inserted.c.id, func.pg_notify(inserted.c.channel, ""))


# the column of ``complete_and_claim``'s rows that says how many tasks it completed
COMPLETED = "beanflow_completed"
# and of the columns computed for the app's task-end hooks (COMPUTED_0, COMPUTED_1 …)
COMPUTED = "beanflow_computed"


class TaskStatements(Statements):
    @property
    def claim(self) -> Executable:
        """The claim of up to batch_size tasks (see ``claim_up_to``)."""
        return self.claim_up_to(self.batch_size)

    def claim_up_to(self, size: int) -> Executable:
        """The claim of up to ``size`` tasks, built once per size."""
        return self._built("_claims", size, self._claim)

    def complete_and_claim_up_to(self, size: int) -> Executable:
        """``complete`` and ``claim_up_to(size)`` in one statement, built once per size."""
        return self._built("_completions_and_claims", size, self._complete_and_claim)

    def _built(self, cache: str, size: int, build: Callable[[int], Executable]) -> Executable:
        statements = self.__dict__.setdefault(cache, {})
        if size not in statements:
            statements[size] = build(size)
        return statements[size]

    def _claim(self, size: int) -> Executable:
        """Claim up to :size due PENDING tasks of :channel_N, from :floor_N on, for :worker;
        returns them (see ``_claimed``)."""
        claimed = self._claimed(size)
        return self._with_claim_events(select(claimed).order_by(claimed.c.scheduled_at), claimed)

    def _complete_and_claim(self, size: int) -> Executable:
        """``claim_up_to(size)`` and ``complete``, in one statement (one round trip where the
        two take two): a row per claimed task, its columns and beanflow_completed (how many
        of :task_ids it marked DONE) and the ``completion_columns``; one row of NULLs but for
        those when it claimed none. The two touch different rows (this worker's PROCESSING
        tasks, PENDING ones).

        The claim is made first, the completion once it is made (``_done(after=claimed)``).
        Every sub-statement sees the snapshot of the statement's start; a task another worker
        claimed and committed since is still PENDING in it, and the claim, finding its row
        updated, locks the newer version to recheck it, a lock it keeps to its commit even
        though the recheck fails. That worker's completion of the task then waits for this
        commit. Claiming before completing takes the claim's reading as close to the snapshot
        as it can be: in a four-worker drain at batch 10, statements waiting on another
        worker's transaction fell from about as many samples as running ones to an eighth.

        The ``completion_columns`` are computed over the batch, once it is complete and
        claimed (each is a subquery of the outer select, which PostgreSQL evaluates on its
        first row): the rows they lock (a fan-out's tallies) are held for less of the
        transaction, so that workers ending neighbouring elements wait less for each other."""
        claimed = self._claimed(size)
        done = self._done(after=claimed)
        completion = (
            select(func.count().label(COMPLETED), *self._wake_completed_waiters())
            .select_from(done)
            .subquery("completion")
        )
        statement = (
            select(completion.c[COMPLETED], claimed)
            .select_from(completion.outerjoin(claimed, literal_column("true")))
            .order_by(claimed.c.scheduled_at)
        )
        if self.completion_columns:
            batch = statement.subquery("batch")
            statement = select(
                batch.c[COMPLETED],
                *self._computed_for_hooks(),
                *(batch.c[c.name] for c in claimed.c),
            ).order_by(batch.c.scheduled_at)
        return self._with_claim_events(self._with_complete_events(statement, done), claimed)

    def _claimed(self, size: int) -> Any:
        """The CTE that claims up to :size due PENDING tasks of :channel_N, from :floor_N on,
        for :worker, returning them.

        The row selection is a MATERIALIZED CTE so it runs exactly once: inlined into the
        UPDATE, the planner may re-run a SKIP LOCKED subquery and claim more rows than asked.
        """
        t = self.task
        limit = literal_column(str(int(size)))
        each = self._due_of_each_channel(size, t.c.id, t.c.scheduled_at, t.c.crash_count)
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
            .where(or_(candidates.c.crash_count <= 0, candidates.c.id == first_suspect))
            .cte("due")
        )
        return self._claiming(t.c.id == due.c.id).cte("claimed")

    def _due_of_each_channel(self, size: int, *columns: Any) -> list[Any]:
        """Per channel, ``columns`` of its first ``size`` due PENDING tasks from :floor_N on,
        locked (``FOR UPDATE SKIP LOCKED``)."""
        t = self.task
        # The batch size is written into the statement, not bound: a prepared statement's
        # generic plan guesses a bound LIMIT at a tenth of the table, and PostgreSQL 18 then
        # joins the UPDATE with a sequential scan of every task.
        limit = literal_column(str(int(size)))
        due_now = t.c.scheduled_at <= func.now()
        # :floor_N, where the claim starts to read channel N's pending tasks (batch.Frontier;
        # by default, before any task)
        return [
            branch.where(due_now)
            .where(t.c.scheduled_at >= bindparam(f"floor_{i}", BEFORE_ANY_TASK, type_=TIMESTAMPTZ))
            .limit(limit)
            .with_for_update(skip_locked=True)
            for i, branch in enumerate(self._pending_of_each_channel(*columns))
        ]

    def _claiming(self, which: Any) -> Any:
        """The UPDATE that makes the tasks ``which`` selects :worker's, returning them."""
        t = self.task
        return (
            update(t)
            .where(which)
            .values(
                state=PROCESSING,
                worker_id=bindparam("worker"),
                attempts=counted_up(t.c.attempts),
                started_at=func.clock_timestamp(),
            )
            .returning(*t.c)
        )

    def claimable_up_to(self, size: int) -> Executable:
        """The ids of the tasks a claim of up to ``size`` (with the same parameters) would
        choose from, locked: where a claim that failed for a row's sake looks for that row
        (a rare path, not PREPAREd)."""
        t = self.task
        each = self._due_of_each_channel(size, t.c.id)
        return each[0] if len(each) == 1 else union_all(*each)

    @functools.cached_property
    def claim_one(self) -> Executable:
        """The claim of the task :task_id alone (as ``claim_up_to`` claims each task)."""
        return self._claiming(self.task.c.id == bindparam("task_id"))

    @functools.cached_property
    def fail_unclaimable(self) -> Executable:
        """Fail the PENDING task :task_id, which no claim can take, with :error (and an
        event of :exception_type); returns its id. A creation time that cannot be read back
        (a row from before the table's checks) is brought within the readable years, so that
        the checks, which apply to the updated row, do not refuse its failure."""
        t = self.task
        failed = (
            update(t)
            .where(t.c.id == bindparam("task_id"), t.c.state == PENDING)
            .values(
                state=FAILED,
                error_message=bindparam("error"),
                created_at=func.least(
                    func.greatest(t.c.created_at, bindparam("earliest", type_=TIMESTAMPTZ)),
                    bindparam("latest", type_=TIMESTAMPTZ),
                ),
                started_at=None,
                finished_at=func.clock_timestamp(),
            )
            .returning(t.c.id)
            .cte("failed")
        )
        return self._with_events(
            select(failed.c.id),
            failed,
            {
                "task_id": failed.c.id,
                "type": FAILED,
                "error_message": bindparam("error", type_=Text),
                "exception_type": bindparam("exception_type", type_=String),
            },
        )

    def _with_claim_events(self, statement: Any, claimed: Any) -> Any:
        return self._with_events(
            statement, claimed, {"task_id": claimed.c.id, "type": literal_column("'CLAIMED'")}
        )

    @functools.cached_property
    def complete(self) -> Executable:
        """Mark the tasks :task_ids DONE with their :task_results (JSON texts, in the same
        order), only those :worker still holds; returns how many it marked. Fewer than given
        means some were taken away (re-queued after a missed heartbeat): the caller rolls back.
        One statement for a whole batch, so its completions cost one round trip. The
        ``completion_columns`` follow the count."""
        done = self._done()
        columns = [func.count(), *self._computed_for_hooks(), *self._wake_completed_waiters()]
        return self._with_complete_events(select(*columns).select_from(done), done)

    def _completed_ids(self) -> Any:
        return bindparam("task_ids", type_=ARRAY(self.task.c.id.type))

    def _computed_for_hooks(self) -> list[Any]:
        """The ``completion_columns``, labelled in order."""
        return [
            make(self._completed_ids()).label(f"{COMPUTED}_{i}")
            for i, make in enumerate(self.completion_columns)
        ]

    def _wake_completed_waiters(self) -> list[Any]:
        ids = self._completed_ids()
        return self._wake_waiters(lambda task_id: task_id == any_(ids))

    def _with_complete_events(self, statement: Any, done: Any) -> Any:
        return self._with_events(
            statement, done, {"task_id": done.c.id, "type": literal_column("'COMPLETE'")}
        )

    def _done(self, after: Any = None) -> Any:
        """The CTE of ``complete``'s UPDATE, returning the ids it marked; with ``after`` (a
        CTE of the same statement), made once that CTE has run: a one-time filter on its
        count, which PostgreSQL evaluates before the UPDATE reads a row."""
        t = self.task
        sequenced: list[Any] = []
        if after is not None:
            sequenced = [select(func.count()).select_from(after).scalar_subquery().is_not(None)]
        finished = select(
            func.unnest(bindparam("task_ids", type_=ARRAY(t.c.id.type))).label("id"),
            func.unnest(bindparam("task_results", type_=ARRAY(Text))).label("result"),
        ).subquery("finished")
        # Found by primary key, never through the partial index of PROCESSING rows: that
        # index keeps the entries of every task completed since the last VACUUM, and a bitmap
        # scan of it (what a generic plan without statistics picks) reads them all, so each
        # completion would cost more than the last. Without ``state = 'PROCESSING'`` here the
        # planner cannot use that index. The fence needs no state: a task this worker still
        # holds has its worker_id, and one taken from it (re-queued, or claimed by another)
        # has not; a task this worker completed or failed is never in its batches again.
        return (
            update(t)
            .where(t.c.id == finished.c.id, t.c.worker_id == bindparam("worker"), *sequenced)
            .values(
                state=DONE,
                result=cast(finished.c.result, t.c.result.type),
                finished_at=func.clock_timestamp(),
                error_message=None,
            )
            .returning(t.c.id)
            .cte("done")
        )

    @functools.cached_property
    def settle(self) -> Executable:
        """End the attempt of :task_id held by :worker other than by completing it: :state
        FAILED or CANCELLED, or PENDING again at :retry_at (a retry, or a snooze that gives
        its attempt back with :refund 1), with an :event row carrying the error; returns its
        id, or nothing when the worker no longer holds it."""
        t = self.task
        retry_at = bindparam("retry_at", type_=TIMESTAMPTZ)
        state = bindparam("state", type_=String)
        settled = (
            update(t)
            # by primary key, as ``complete`` (see there)
            .where(t.c.id == bindparam("task_id"), t.c.worker_id == bindparam("worker"))
            .values(
                state=state,
                scheduled_at=func.coalesce(retry_at, t.c.scheduled_at),
                worker_id=case((state == PENDING, None), else_=t.c.worker_id),
                attempts=t.c.attempts - bindparam("refund", type_=Integer),
                error_message=bindparam("error", type_=Text),
                finished_at=func.clock_timestamp(),
            )
            .returning(t.c.id)
            .cte("settled")
        )
        task_id = bindparam("task_id", type_=t.c.id.type)
        return self._with_events(
            select(settled.c.id, *self._wake_waiters(lambda waited: waited == task_id)),
            settled,
            {
                "task_id": settled.c.id,
                "type": bindparam("event", type_=String),
                "error_message": bindparam("error", type_=Text),
                "exception_type": bindparam("exception_type", type_=String),
                "traceback": bindparam("traceback", type_=Text),
                "scheduled_at": retry_at,
            },
        )

    @functools.cached_property
    def give_back(self) -> Executable:
        """Return the tasks :task_ids that :worker claimed and has not started to PENDING,
        their attempt given back, and notify their channels: a batch that ran past its window
        lets other workers have the rest of it. By primary key, as ``complete``."""
        t = self.task
        returned = (
            update(t)
            .where(
                t.c.id == any_(bindparam("task_ids", type_=ARRAY(t.c.id.type))),
                t.c.worker_id == bindparam("worker"),
            )
            .values(state=PENDING, worker_id=None, started_at=None, attempts=t.c.attempts - 1)
            .returning(t.c.id, t.c.channel)
            .cte("returned")
        )
        return self._with_events(
            self._notify_channels(returned, returned.c.channel),
            returned,
            {
                "task_id": returned.c.id,
                "type": literal_column("'REQUEUED'"),
                "error_message": literal_column(
                    "'returned unstarted: its batch ran past its window'"
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

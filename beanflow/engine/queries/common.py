"""What the statements share: state literals, the per-channel selection, event rows, NOTIFY,
and the crash accounting of a task taken from its worker."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import (
    Integer,
    String,
    Text,
    and_,
    bindparam,
    case,
    cast,
    exists,
    func,
    insert,
    literal_column,
    select,
)
from sqlalchemy.sql import Executable

# Literal state names, not bind parameters: each predicate is then identical to a partial
# index's ``state = 'PENDING'``, so the planner can prove the index applies.
PENDING = literal_column("'PENDING'")
PROCESSING = literal_column("'PROCESSING'")
DONE = literal_column("'DONE'")
FAILED = literal_column("'FAILED'")
CANCELLED = literal_column("'CANCELLED'")


# A count written in SQL at the top of the INTEGER range must not make the engine's "+ 1"
# overflow: the statement would fail for every task it touches (a claim, a reap), and stall them.
_LARGEST_COUNT = literal_column(str(2**31 - 2))
_ONE = literal_column("1")


def counted_up(count: Any, by: Any = _ONE) -> Any:
    """``count + by``, short of the INTEGER column's overflow (``by`` is 0 or 1)."""
    return func.least(count, _LARGEST_COUNT) + by


def channel_parameters(channels: list[str]) -> dict[str, str]:
    """Bind parameters of the per-channel statements (``claim``, ``next_due``)."""
    return {f"channel_{i}": channel for i, channel in enumerate(channels)}


def notify(channel: str) -> Executable:
    """``SELECT pg_notify(:channel, '')``: wakes the workers LISTENing on ``channel`` when the
    transaction commits (never for a rolled-back transaction or savepoint)."""
    return select(func.pg_notify(bindparam("channel", channel, type_=String), ""))


class Statements:
    """Base of the statement sets: the tables of one (task, worker, event) model set."""

    def __init__(
        self,
        task_model: type,
        worker_model: type,
        event_model: type,
        events: bool = True,
        channel_count: int = 1,
        batch_size: int = 1,
        cancellation_model: type | None = None,
        waiter_model: type | None = None,
        completion_columns: Sequence[Callable[[Any], Any]] = (),
    ) -> None:
        self.task = task_model.__table__
        # columns the statement that completes a batch computes for the app's task-end hooks,
        # each made from that statement's :task_ids parameter (what they write rides in it)
        self.completion_columns = tuple(completion_columns)
        # requests to cancel running tasks: honoured when a task is taken from its worker
        self.cancellation = None if cancellation_model is None else cancellation_model.__table__
        # clients waiting for tasks to end: woken by the statement that ends them
        self.waiter = None if waiter_model is None else waiter_model.__table__
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

    def _wake_waiters(self, ended: Any) -> list[Any]:
        """The column that notifies ``beanflow_done`` (payload: the task id) for each task
        ``ended`` matches that a client waits for (none when waiters are not configured):
        a probe of a table that is nearly always empty."""
        if self.waiter is None:
            return []
        w = self.waiter
        notified = func.pg_notify(literal_column("'beanflow_done'"), cast(w.c.task_id, Text))
        return [select(func.count(notified)).where(ended(w.c.task_id)).scalar_subquery()]

    @staticmethod
    def _ended_event(source: Any, otherwise: str) -> dict[str, Any]:
        """The event columns of a task taken from its worker (``_crash``): FAILED or
        CANCELLED with its message, else REQUEUED saying ``otherwise`` (SQL text)."""
        ended = source.c.state.in_([FAILED, CANCELLED])
        return {
            "task_id": source.c.id,
            "type": case((ended, source.c.state), else_=literal_column("'REQUEUED'")),
            "error_message": case((ended, source.c.error_message), else_=otherwise),
        }

    @staticmethod
    def _notify_channels(source: Any, channel: Any, *where: Any) -> Any:
        """``SELECT pg_notify(channel, '')`` once per distinct channel of ``source``."""
        channels = select(channel.label("channel")).where(*where).distinct().subquery()
        return select(func.pg_notify(channels.c.channel, ""))

    def _crash(self, charged: Any | None, reason: str, otherwise: Any) -> dict[str, Any]:
        """The values that take a PROCESSING task from its worker and return it to PENDING
        (CANCELLED instead, when a cancellation of it was requested).

        When ``charged`` (SQL; None: always), the worker's death is charged to the task: its
        crash count goes up, and at :max_crashes it is FAILED with the message "<reason> N
        times while running it", so a task that kills its workers cannot stall the queue.
        Otherwise ``otherwise`` becomes its error message.
        """
        t = self.task
        if charged is None:
            crashes = counted_up(t.c.crash_count)
            gives_up = crashes >= bindparam("max_crashes", type_=Integer)
        else:
            crashes = counted_up(t.c.crash_count, case((charged, 1), else_=0))
            gives_up = and_(charged, crashes >= bindparam("max_crashes", type_=Integer))
        ends = [(gives_up, FAILED)]
        messages = [(gives_up, func.concat(f"{reason} ", crashes, " times while running it"))]
        if self.cancellation is not None:
            c = self.cancellation
            cancelled = exists().where(c.c.task_id == t.c.id)
            ends.insert(0, (cancelled, CANCELLED))
            messages.insert(
                0,
                (
                    cancelled,
                    select(func.concat("cancelled by ", c.c.requested_by))
                    .where(c.c.task_id == t.c.id)
                    .scalar_subquery(),
                ),
            )
        return {
            "state": case(*ends, else_=PENDING),
            "worker_id": None,
            "crash_count": crashes,
            "finished_at": case(*[(end, func.clock_timestamp()) for end, _ in ends], else_=None),
            "error_message": case(*messages, else_=otherwise),
        }

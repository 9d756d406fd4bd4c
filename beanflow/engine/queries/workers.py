"""A worker's statements: register, heartbeat, stop, and taking tasks back from it."""

from __future__ import annotations

import functools

from sqlalchemy import (
    ARRAY,
    Interval,
    any_,
    bindparam,
    case,
    func,
    insert,
    literal_column,
    select,
    union_all,
    update,
)
from sqlalchemy.sql import Executable

from .common import PENDING, PROCESSING, Statements


class WorkerStatements(Statements):
    @functools.cached_property
    def register(self) -> Executable:
        """Insert the row of a starting worker."""
        return insert(self.worker)

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
    def shut_down(self) -> Executable:
        """Mark :worker SHUTDOWN (a clean stop), unless it was already found dead."""
        w = self.worker
        return (
            update(w)
            .where(w.c.id == bindparam("worker"), w.c.state == literal_column("'RUNNING'"))
            .values(state=literal_column("'SHUTDOWN'"))
        )

    @functools.cached_property
    def release(self) -> Executable:
        """Return every task :worker still holds to PENDING: on shutdown, after it lost its
        connection, or after a batch it could not record. Tasks in :innocent get their attempt
        back (they did not run, or their run left no trace). Tasks in :charged ran in a
        transaction that died with the connection: like a dead worker's tasks, each is charged
        a crash (a task that keeps breaking its connection, say by staying idle in its
        transaction past the server's limit, cannot stall the queue). Notifies the channels of
        the tasks returned to PENDING."""
        t = self.task
        innocent = t.c.id == any_(bindparam("innocent", type_=ARRAY(t.c.id.type)))
        charged = t.c.id == any_(bindparam("charged", type_=ARRAY(t.c.id.type)))
        released = (
            update(t)
            .where(t.c.worker_id == bindparam("worker"), t.c.state == PROCESSING)
            .values(
                started_at=None,
                attempts=t.c.attempts - case((innocent, 1), else_=0),
                **self._crash(
                    charged,
                    "its worker died or lost its database connection",
                    t.c.error_message,
                ),
            )
            .returning(t.c.id, t.c.channel, t.c.state, t.c.error_message)
            .cte("released")
        )
        statement = self._notify_channels(released, released.c.channel, released.c.state == PENDING)
        return self._with_events(
            statement,
            released,
            self._ended_event(released, literal_column("'its worker stopped before finishing it'")),
        )

    @functools.cached_property
    def reap(self) -> Executable:
        """Mark RUNNING workers silent for :timeout NO_HEARTBEAT and, in the same statement,
        return their PROCESSING tasks to PENDING, each charged a crash (FAILED at
        :max_crashes). Returns (workers, tasks, channels notified) counts.

        Also the tasks of a worker already found dead and silent since: a claim it committed
        just after it was found dead (its statement had begun before) leaves it tasks that
        its next heartbeat would have given back, had it lived to send one."""
        w, t = self.worker, self.task
        silent = w.c.last_heartbeat < func.now() - bindparam("timeout", type_=Interval)
        dead = (
            update(w)
            .where(w.c.state == literal_column("'RUNNING'"), silent)
            .values(state=literal_column("'NO_HEARTBEAT'"))
            .returning(w.c.id)
            .cte("dead")
        )
        found_before = select(w.c.id).where(w.c.state == literal_column("'NO_HEARTBEAT'"), silent)
        lost = union_all(select(dead.c.id), found_before).cte("lost")
        requeued = (
            update(t)
            .where(t.c.worker_id == lost.c.id, t.c.state == PROCESSING)
            .values(
                **self._crash(
                    None,
                    "its worker died",
                    func.concat("its worker ", lost.c.id, " stopped heartbeating"),
                )
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
            counts, requeued, self._ended_event(requeued, requeued.c.error_message)
        )

"""The schedulers' statements on the schedules' state table."""

from __future__ import annotations

import functools

from sqlalchemy import DateTime, String, Table, bindparam, or_, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.sql import Executable


@functools.cache
def schedule_seen(table: Table) -> Executable:
    """Record that the schedule :schedule exists, once; returns when it was first seen, by any
    scheduler, and its latest tick enqueued (its catch-up never reaches back past either: a
    tick's task may be gone by retention, its unique key with it)."""
    seen = insert(table).values(name=bindparam("schedule", type_=String))
    return seen.on_conflict_do_update(
        index_elements=[table.c.name], set_={"name": seen.excluded.name}
    ).returning(table.c.first_seen, table.c.last_tick)


@functools.cache
def schedule_ticked(table: Table) -> Executable:
    """Record :tick (and its task :task) as the latest tick of :schedule, unless a later
    one is recorded already."""
    tick = bindparam("tick", type_=DateTime(timezone=True))
    return (
        update(table)
        .where(
            table.c.name == bindparam("schedule", type_=String),
            or_(table.c.last_tick.is_(None), table.c.last_tick < tick),
        )
        .values(last_tick=tick, last_task_id=bindparam("task", type_=table.c.last_task_id.type))
    )

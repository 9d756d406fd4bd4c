"""Cron schedules: every tick enqueues its task exactly once.

Any number of schedulers (several ``beanflow run`` on one or more machines) may run the same
schedules: each inserts every tick with the unique key ``schedule:<name>:<tick>``, and the
partial unique index lets exactly one insert win. No leader is elected, so none can be lost.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import uuid
from datetime import datetime, timedelta, timezone
from typing import Any
from zoneinfo import ZoneInfo

from croniter import croniter
from sqlalchemy import exc

from ..errors import first_line, refused_for_now
from ..models.schedule import ScheduleState
from ..processors.processor import Processor
from . import metrics
from .interface import QueueApp
from .queries import enqueue_unique, schedule_seen, schedule_ticked
from .service import PeriodicService

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Schedule:
    """A processor run on a cron expression (croniter syntax; 6 fields = seconds last)."""

    name: str
    processor: Processor
    cron: str
    timezone: str = "UTC"
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    # after downtime, enqueue at most this many of the most recent missed ticks (never one
    # from before the schedule was first seen)
    catch_up: int = 1

    def next_tick(self, after: datetime) -> datetime:
        """The first tick strictly after ``after``."""
        local = after.astimezone(ZoneInfo(self.timezone))
        return croniter(self.cron, local).get_next(datetime)

    def recent_ticks(self, now: datetime, count: int) -> list[datetime]:
        """The ``count`` most recent ticks at or before ``now``, oldest first."""
        # croniter's get_prev is strictly before its start: start just after ``now`` so that
        # a tick falling exactly on ``now`` counts
        local = (now + timedelta(microseconds=1)).astimezone(ZoneInfo(self.timezone))
        iterator = croniter(self.cron, local)
        return sorted(iterator.get_prev(datetime) for _ in range(count))

    def unique_key(self, tick: datetime) -> str:
        return f"schedule:{self.name}:{tick.astimezone(timezone.utc).isoformat()}"


class Scheduler(PeriodicService):
    """Enqueues the ticks of some schedules until stopped: first the missed ticks that
    ``catch_up`` allows, then each tick as it comes."""

    name = "scheduler"
    # ticks are inserted this long before they are due, so that workers (which wake at a
    # task's scheduled_at) start them on time whatever the scheduler's own delays
    LEAD_SECONDS = 1.0

    def __init__(self, app: QueueApp, schedules: list[Schedule]) -> None:
        super().__init__(0.0, threading.Event())
        self.app = app
        self.schedules = {schedule.name: schedule for schedule in schedules}
        self.statement = enqueue_unique(app.task_model.__table__)
        self.seen = schedule_seen(ScheduleState.__table__)
        self.ticked = schedule_ticked(ScheduleState.__table__)
        self.upcoming: dict[str, datetime] | None = None  # None until it has caught up
        self.pause = 0.0  # grows while the database refuses, or cannot be reached

    def next_wait(self) -> float:
        if self.upcoming is None:
            return self.pause
        soonest = min(self.upcoming.values(), default=None)
        if soonest is None:
            return 3600.0
        wait = (soonest - datetime.now(timezone.utc)).total_seconds() - self.LEAD_SECONDS
        return max(wait, 0.0)

    def run_once(self) -> None:
        """Enqueue what is due. If the database refuses for now (or cannot be reached), catch
        up once it answers, after a pause, as after any downtime: no tick is lost for it."""
        try:
            self._enqueue_due()
        except exc.DBAPIError:
            self.upcoming = None
            self.pause = min(max(self.pause * 2, 0.5), 10.0)
            raise
        self.pause = 0.0

    def _enqueue_due(self) -> None:
        now = datetime.now(timezone.utc)
        if self.upcoming is None:
            for schedule in self.schedules.values():
                first_seen, last_tick = self.seen_and_ticked(schedule)
                for tick in schedule.recent_ticks(now, schedule.catch_up):
                    # a new schedule does not fire for its past, nor one for a tick enqueued
                    if tick >= first_seen and (last_tick is None or tick > last_tick):
                        self.enqueue(schedule, tick)
            self.upcoming = {s.name: s.next_tick(now) for s in self.schedules.values()}
            return
        horizon = now.timestamp() + self.LEAD_SECONDS
        for name, tick in list(self.upcoming.items()):
            if tick.timestamp() <= horizon:
                self.enqueue(self.schedules[name], tick)
                self.upcoming[name] = self.schedules[name].next_tick(tick)

    def seen_and_ticked(self, schedule: Schedule) -> tuple[datetime, datetime | None]:
        """When any scheduler first saw ``schedule`` (now, for a new one), and the latest
        tick of it that one enqueued."""
        with self.app.engine.begin() as connection:
            row = connection.execute(self.seen, {"schedule": schedule.name}).one()
            return row.first_seen, row.last_tick

    def enqueue(self, schedule: Schedule, tick: datetime) -> bool:
        """Insert the task of ``tick`` unless some scheduler already did; True if this one
        did. A database error that is the tick's own (a trigger of yours refuses its row, say)
        is logged and the tick skipped; one that passes is raised (``run_once``)."""
        processor = schedule.processor
        try:
            with self.app.engine.begin() as connection:
                inserted = connection.execute(
                    self.statement,
                    {
                        "task_id": uuid.uuid4(),
                        "task_channel": processor.channel,
                        "task_module": processor.module,
                        "task_name": processor.name,
                        "task_kwargs": schedule.kwargs,
                        "task_scheduled_at": tick,
                        "task_unique_key": schedule.unique_key(tick),
                    },
                ).first()
                if inserted is not None:
                    connection.execute(
                        self.ticked, {"schedule": schedule.name, "tick": tick, "task": inserted.id}
                    )
        except exc.DBAPIError as error:
            if refused_for_now(error):
                raise
            logger.error(
                "schedule %s: could not enqueue the tick of %s: %s",
                schedule.name,
                tick.isoformat(),
                first_line(error.orig or error),
            )
            return False
        if inserted is not None:
            logger.info(
                "schedule %s: enqueued task %s for %s", schedule.name, inserted.id, tick.isoformat()
            )
            metrics.schedule_ticked(schedule.name)
        return inserted is not None

"""Workflows declared in beanflow.yaml: steps, dependencies, fan-out and fan-in, conditions,
an ``on_failure`` step, the run's result — and their progression.

Each step is a task of its processor. When a step's task ends, the worker that ends it calls
``Workflows.on_tasks_ended`` in the same transaction: it locks the run's row, reads its steps,
and inserts the tasks of the steps now released (or fails the run, or finishes it). So a
step's database writes, its completion and the release of what depends on it commit together,
and a step with several upstreams is released once (the run's lock orders the transactions
that end its upstreams; the key (run, step, index) refuses a second release). A fan-out's
element only counts down its slot's tally; the last of a slot locks the run, and the one that
finds every slot at zero advances it. A step that ends by another path (its worker died and
the reaper failed it; an operator cancelled it) is taken up by ``WorkflowService``, which
advances runs with no task pending or running.

How a step's kwargs are built (documented in the README):
- ``kwargs:`` declared on the step, whose string values ``$input.…``, ``$STEP.…`` and
  ``$item.…`` are references (``$$`` writes a literal ``$``); without it, a first step (no
  ``after``, no ``for_each``) gets the run's input as its kwargs, the others none;
- then, for parameters the function declares and the kwargs do not set: ``input`` (the run's
  input), ``results`` (each upstream step's result by name; a fan-out's is the list of its
  elements' results in order; a skipped step's is None), ``item`` (the element, in a fan-out).
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import functools
import inspect
import json
import logging
import threading
import uuid
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import jsonschema
from sqlalchemy import (
    Boolean,
    Integer,
    String,
    and_,
    any_,
    bindparam,
    case,
    cast,
    column,
    delete,
    func,
    insert,
    literal,
    literal_column,
    select,
    true,
    tuple_,
    union,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, aggregate_order_by
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import Session

from . import db
from .app import BeanQueue
from .engine.connections import execute, prepare_once
from .engine.queries import Prepared
from .engine.service import PeriodicService
from .errors import BeanflowError, KwargsError, first_line, refused_for_now
from .models import (
    FINAL_STATES,
    RunState,
    StepOutcome,
    TaskState,
    WorkflowRun,
    WorkflowStep,
    WorkflowTally,
)
from .models.task import to_notify
from .models.workflow import TALLY_SLOTS
from .ops import Operations, listen_until, operator
from .processors.processor import Processor

logger = logging.getLogger(__name__)

RUNS_CHANNEL = "beanflow_runs"  # notified when a run ends (``wait``)
NO_TASK = -1  # the index of a step row that has no task (skipped, or an empty fan-out)
_TRUTHY = object()  # a condition that asks only whether a value is truthy
_PENDING = object()  # a step released now, whose result is not known yet
_NO_ITEM = object()  # a step that is not a fan-out
_UNREAD = object()  # a run's input, not read yet
SMALL_INPUT = 2048  # bytes of a run's input read with its lock
# A batch of at most this many tasks counts its steps down in the statement that completes
# it (no round trip of its own); a larger one, in a statement after it: there its tallies
# (every one, past 64 neighbours) are locked for less of the transaction, so that workers
# ending a fan-out's elements in large batches wait less for each other.
COUNTED_WITH_COMPLETION = 16


class WorkflowError(BeanflowError):
    """A run cannot go on: a reference that does not resolve, kwargs that do not fit."""


# ---- what a file declares ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Ref:
    """``source.path…``: the run's ``input``, a fan-out's ``item``, or a step's result."""

    source: str
    path: tuple[str | int, ...]

    @classmethod
    def parse(cls, text: str) -> Ref:
        parts = text.split(".")
        if not all(parts):
            raise ValueError(f"{text!r} is not a reference (STEP.key.0, input.key, item)")
        return cls(parts[0], tuple(int(p) if p.isdigit() else p for p in parts[1:]))

    def __str__(self) -> str:
        return ".".join([self.source, *map(str, self.path)])

    def resolve(self, context: dict[str, Any]) -> Any:
        value = context[self.source]
        for depth, key in enumerate(self.path):
            where = ".".join([self.source, *map(str, self.path[:depth])])
            if isinstance(key, int) and isinstance(value, list):
                if key >= len(value):
                    raise WorkflowError(f"{self}: {where} has {len(value)} element(s)")
                value = value[key]
            elif isinstance(value, dict) and str(key) in value:
                value = value[str(key)]
            else:
                kind = type(value).__name__ if value is not None else "null"
                raise WorkflowError(f"{self}: {where} ({kind}) has no {key!r}")
        return value


@dataclasses.dataclass(frozen=True)
class Condition:
    """``if:`` a reference (true when its value is truthy), or ``{reference: value}`` pairs
    (true when each equals its value)."""

    tests: tuple[tuple[Ref, Any], ...]

    @classmethod
    def truthy(cls, ref: Ref) -> Condition:
        return cls(((ref, _TRUTHY),))

    def holds(self, context: dict[str, Any]) -> bool:
        for ref, expected in self.tests:
            value = ref.resolve(context)
            if not (bool(value) if expected is _TRUTHY else value == expected):
                return False
        return True

    def __str__(self) -> str:
        return " and ".join(
            str(ref) if expected is _TRUTHY else f"{ref} = {json.dumps(expected)}"
            for ref, expected in self.tests
        )


@dataclasses.dataclass
class Step:
    name: str
    processor: Processor
    after: tuple[str, ...] = ()
    for_each: Ref | None = None
    condition: Condition | None = None
    kwargs: dict[str, Any] | None = None  # values may be Refs

    @functools.cached_property
    def parameters(self) -> frozenset[str]:
        """The names of the function's parameters."""
        return frozenset(inspect.signature(self.processor.func).parameters)


@dataclasses.dataclass
class Workflow:
    name: str
    steps: dict[str, Step]  # in an order where each step comes after its upstreams
    result: str  # the step whose result is the run's
    on_failure: Step | None = None
    input_schema: dict[str, Any] | None = None

    def levels(self) -> dict[str, int]:
        """Each step's depth: 0 for first steps, 1 + the deepest upstream otherwise."""
        depth: dict[str, int] = {}
        for name, step in self.steps.items():
            depth[name] = 1 + max((depth[a] for a in step.after), default=-1)
        return depth


def resolve_values(value: Any, context: dict[str, Any]) -> Any:
    """``value`` with each Ref in it (in lists and mappings too) replaced by what it names."""
    if isinstance(value, Ref):
        return value.resolve(context)
    if isinstance(value, dict):
        return {k: resolve_values(v, context) for k, v in value.items()}
    if isinstance(value, list):
        return [resolve_values(v, context) for v in value]
    return value


# ---- runs ----------------------------------------------------------------------------------


@dataclasses.dataclass
class StepView:
    """One row of a run's step: its index (-1: no task), how it ended without a task, its
    task (None when it has none, or when the task was purged)."""

    step: str
    index: int
    outcome: StepOutcome | None
    task: Any | None


@dataclasses.dataclass
class RunDetail:
    run: WorkflowRun
    steps: list[StepView]

    def of(self, step: str) -> list[StepView]:
        return [view for view in self.steps if view.step == step]


class _StepRow(NamedTuple):
    """A step row of a run and the state of its task (None: no task, or the task is gone)."""

    step: str
    index: int
    outcome: str | None
    state: str | None
    result: Any
    error_message: str | None


@dataclasses.dataclass
class _Run:
    """A run locked for progression: what is read of it, and what will be written."""

    id: uuid.UUID
    workflow: str
    input: Any
    steps: list[_StepRow] = dataclasses.field(default_factory=list)
    state: RunState = RunState.RUNNING
    result: Any = None
    error: str | None = None
    failed_step: str | None = None

    @property
    def dirty(self) -> bool:
        """Whether its row must be written: it ended."""
        return self.state != RunState.RUNNING


@dataclasses.dataclass
class _Writes:
    """What one progression writes, in as few statements as there are kinds of rows."""

    steps: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    tallies: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    tasks: dict[uuid.UUID, dict[str, Any]] = dataclasses.field(default_factory=dict)
    channels: set[str] = dataclasses.field(default_factory=set)
    failed: list[uuid.UUID] = dataclasses.field(default_factory=list)  # runs: cancel pending

    def drop(self, run_id: uuid.UUID) -> None:
        """Forget what was planned for ``run_id`` (it failed in the same pass)."""
        self.steps = [row for row in self.steps if row["run_id"] != run_id]
        self.tallies = [row for row in self.tallies if row["run_id"] != run_id]
        self.tasks = {k: v for k, v in self.tasks.items() if v["workflow_run_id"] != run_id}


class Workflows:
    """A deployment's workflows: start runs, advance them, cancel, retry, read."""

    def __init__(self, app: BeanQueue, workflows: dict[str, Workflow]) -> None:
        self.app, self.definitions = app, workflows
        self.ops = Operations(app)
        self.sql = _Statements(app.task_model.__table__)

    # ---- starting --------------------------------------------------------------------------

    def start(
        self, session: Session, name: str, input: Any = None, key: str | None = None
    ) -> WorkflowRun:
        """Add a run of workflow ``name`` and the tasks of its first steps to ``session``'s
        transaction (nothing exists until the caller commits). With ``key``, a second start
        with the same key returns the first run instead."""
        workflow = self.definitions.get(name)
        if workflow is None:
            known = ", ".join(sorted(self.definitions)) or "none is declared"
            raise WorkflowError(f"no workflow {name!r} ({known})")
        input = {} if input is None else input
        if workflow.input_schema is not None:
            validator = jsonschema.Draft202012Validator(workflow.input_schema)
            errors = sorted(validator.iter_errors(input), key=lambda e: list(e.absolute_path))
            if errors:
                wrong = "; ".join(
                    f"{'/'.join(map(str, e.absolute_path)) or 'the input'}: {e.message}"
                    for e in errors
                )
                raise KwargsError(f"input of {name}: {wrong}")
        run_id = session.scalar(
            pg_insert(WorkflowRun)
            .values(id=uuid.uuid4(), workflow=name, state=RunState.RUNNING, input=input)
            .values(unique_key=key)
            .on_conflict_do_nothing(
                index_elements=["unique_key"], index_where=WorkflowRun.unique_key.is_not(None)
            )
            .returning(WorkflowRun.id)
        )
        if run_id is None:  # a run with this key exists
            return session.scalars(select(WorkflowRun).where(WorkflowRun.unique_key == key)).one()
        run, writes = _Run(run_id, name, input), _Writes()
        self._advance_one(run, workflow, writes)
        self._write(session, [run], writes)
        return session.get(WorkflowRun, run_id)

    # ---- progression -----------------------------------------------------------------------

    def completion_column(self, task_ids: Any) -> Any:
        """The engine's hook, in the statement that completes a batch of tasks: count the
        step tasks among them down (``counted_down``) when they are at most
        ``COUNTED_WITH_COMPLETION``; how many runs may advance comes to ``on_tasks_ended``."""
        return counted_down(task_ids, COUNTED_WITH_COMPLETION)

    def on_tasks_ended(
        self, session: Session, done: Sequence[Any], failed: Sequence[Any], counted: int | None
    ) -> bool:
        """The engine's hook, in the transaction that ends ``done`` (DONE) and ``failed``
        (FAILED or CANCELLED for good) tasks: take their runs further. Their step tasks
        count down their slots' tallies (fan-out elements), and the runs of which one ended a
        slot or a step without tallies are locked: by the statement that completed them
        (``counted`` runs locked), or here (``counted`` None: a larger batch). A step that
        ended (every tally at zero), or a failure, advances its run; a batch counted by its
        completion that locked no run costs nothing more. A failure here is logged and left
        to WorkflowService (the tasks' own outcomes commit regardless). Returns whether it
        released tasks."""
        steps = [t for t in done if getattr(t, "workflow_run_id", None)] if counted != 0 else []
        failed_runs = {t.workflow_run_id for t in failed if getattr(t, "workflow_run_id", None)}
        if not steps and not failed_runs:
            return False
        done_ids = [t.id for t in steps]
        run_ids = failed_runs | {t.workflow_run_id for t in steps}
        savepoint = session.begin_nested()
        try:
            released = self._progress(session, run_ids, done_ids, failed_runs, counted is None)
            savepoint.commit()
            return released
        except Exception:  # noqa: BLE001 - the service retries the run, and charges it
            savepoint.rollback()
            logger.exception("workflow steps %s: not advanced (the service will)", done_ids)
            return False

    def _progress(
        self,
        session: Session,
        run_ids: set[uuid.UUID],
        done_ids: list[uuid.UUID],
        failed_runs: set[uuid.UUID],
        count_here: bool,
    ) -> bool:
        runs = self._read(session, run_ids, done_ids, failed_runs, count_here=count_here)
        writes = _Writes()
        self._advance_all(session, runs, writes)
        self._write(session, runs, writes)
        return bool(writes.tasks)

    def _read(
        self,
        session: Session,
        run_ids: set[uuid.UUID],
        done_ids: Sequence[uuid.UUID] = (),
        failed_runs: set[uuid.UUID] | frozenset[uuid.UUID] = frozenset(),
        wait: bool = True,
        whole: bool = False,
        count_here: bool = False,
    ) -> list[_Run]:
        """Lock the running runs among ``run_ids`` that may advance, in id order, and read those
        that do, with the rows of their steps. With ``whole``, all of them advance (without
        ``wait``, those locked elsewhere are left out). Else the ``done_ids`` tasks were
        counted down, which locked the runs of which one ended a slot or a step without
        tallies: by their completion, or here with ``count_here`` (``counted_down``, the
        ``failed_runs`` locked with them, in one id order); otherwise the ``failed_runs`` are
        locked here. A run advances when it failed or one of its steps ended (every slot at
        zero). The read sees what the transactions that held the locks committed. A run's
        input comes along when small; a large one (a fan-out's list, say) is read by
        ``_advance_all`` when needed.

        On a worker's connection the count-down and the lock travel with the read: each
        statement with its own snapshot, in one round trip."""
        if not run_ids:
            return []
        connection, ids = session.connection(), sorted(run_ids)
        done, failed = list(done_ids), sorted(failed_runs)
        if not wait:
            ids = list(execute(connection, self.sql.lock_unless_locked, {"runs": ids}).scalars())
        elif whole:
            execute(connection, self.sql.lock, {"runs": ids})
        if count_here or failed:
            prepared, given = self.sql.lock, {"runs": failed}
            if count_here:
                prepared, given = self.sql.count_down, {"done": done, "failed": failed}
            if db.on_hot_path(connection):
                prepare_once(connection, prepared)
                db.send_with_next_statement(connection, prepared.execute_text(given))
            else:
                execute(connection, prepared, given)
        rows = execute(
            connection,
            self.sql.read,
            {"runs": ids, "done": done, "failed": failed, "whole": whole},
        )
        return [
            _Run(
                row.id,
                row.workflow,
                row.input if row.small else _UNREAD,
                [_StepRow(*step) for step in row.steps],
            )
            for row in rows
        ]

    def advance(self, session: Session, run_ids: Iterable[uuid.UUID], wait: bool = True) -> int:
        """Lock the runs (in id order) and take each as far as its steps allow: release what
        its ended steps allow, fail it, or finish it. Without ``wait``, runs locked elsewhere
        are left. Returns how many runs were advanced."""
        runs, writes = self._read(session, set(run_ids), wait=wait, whole=True), _Writes()
        self._advance_all(session, runs, writes)
        self._write(session, runs, writes)
        return len(runs)

    def _advance_all(self, session: Session, runs: list[_Run], writes: _Writes) -> None:
        """Plan what each of ``runs`` (read with their steps) releases."""
        unread = {run.id: run for run in runs if run.input is _UNREAD}
        if unread:
            r = WorkflowRun.__table__.c
            found = session.connection().execute(
                select(r.id, r.input).where(r.id.in_(list(unread)))
            )
            for run_id, given in found:
                unread[run_id].input = given
        for run in runs:
            workflow = self.definitions.get(run.workflow)
            if workflow is None:
                logger.warning("run %s: workflow %r is not declared here", run.id, run.workflow)
                continue
            self._advance_one(run, workflow, writes)

    def _advance_one(self, run: _Run, workflow: Workflow, writes: _Writes) -> None:
        """Plan what ``run`` does next from the rows of its steps: fail, release, or finish."""
        released: dict[str, list[Any]] = {}
        for row in run.steps:
            released.setdefault(row.step, []).append(row)
        handler = workflow.on_failure.name if workflow.on_failure else None
        for step, its in released.items():
            bad = [r for r in its if r.outcome is None and r.state in (None, *FINAL_STATES[1:])]
            if step != handler and bad:
                why = "its task is gone" if bad[0].state is None else bad[0].error_message
                return self._fail(run, workflow, step, why or "failed", writes)
        context: dict[str, Any] = {"input": run.input}
        for name, its in released.items():
            if all(r.outcome is not None or r.state == TaskState.DONE for r in its):
                context[name] = _result_of(workflow.steps.get(name), its)
        name = ""
        try:
            for name, step in workflow.steps.items():
                if name in released or not all(a in context for a in step.after):
                    continue
                decided = self._release(run, step, context, writes)
                if decided is not _PENDING:
                    context[name] = decided
        except (WorkflowError, KwargsError) as error:
            return self._fail(run, workflow, name, str(error), writes)
        if all(name in context for name in workflow.steps):
            run.state, run.result = RunState.DONE, context[workflow.result]

    def _release(self, run: _Run, step: Step, context: dict[str, Any], writes: _Writes) -> Any:
        """Plan the tasks of ``step`` (a row without a task when it is skipped or fans out
        over nothing); returns its result when that is decided at once, else _PENDING."""
        if step.condition is not None and not step.condition.holds(context):
            self._plan(run, step, [], writes, StepOutcome.SKIPPED)
            return None
        if step.for_each is None:
            self._plan(run, step, [self._kwargs(step, context, run)], writes)
            return _PENDING
        items = step.for_each.resolve(context)
        if not isinstance(items, list):
            kind = type(items).__name__ if items is not None else "null"
            raise WorkflowError(f"for_each {step.for_each} is {kind}, not a list")
        if not items:
            self._plan(run, step, [], writes, StepOutcome.EMPTY)
            return []
        kwargs_list = [self._kwargs(step, context, run, item) for item in items]
        self._plan(run, step, kwargs_list, writes)
        return _PENDING

    def _kwargs(
        self, step: Step, context: dict[str, Any], run: _Run, item: Any = _NO_ITEM
    ) -> dict[str, Any]:
        scope = context if item is _NO_ITEM else context | {"item": item}
        if step.kwargs is not None:
            kwargs = resolve_values(step.kwargs, scope)
        elif not step.after and step.for_each is None and isinstance(run.input, dict):
            kwargs = dict(run.input)
        else:
            kwargs = {}
        offered = {"input": run.input}
        if step.after:
            offered["results"] = {name: context[name] for name in step.after}
        if item is not _NO_ITEM:
            offered["item"] = item
        wanted = step.parameters
        kwargs |= {k: v for k, v in offered.items() if k in wanted and k not in kwargs}
        step.processor.check_kwargs(kwargs)
        return kwargs

    def _plan(
        self,
        run: _Run,
        step: Step,
        kwargs_list: list[dict[str, Any]],
        writes: _Writes,
        outcome: StepOutcome | None = None,
    ) -> None:
        """The step's rows and tasks, to be written by ``_write``."""
        if outcome is not None:
            writes.steps.append(
                {"run_id": run.id, "step": step.name, "index": NO_TASK, "outcome": outcome}
                | {"task_id": None}
            )
            return
        processor = step.processor
        for index, kwargs in enumerate(kwargs_list):
            task_id = uuid.uuid4()
            writes.steps.append(
                {"run_id": run.id, "step": step.name, "index": index, "task_id": task_id}
                | {"outcome": None}
            )
            writes.tasks[task_id] = {
                "id": task_id,
                "channel": processor.channel,
                "module": processor.module,
                "name": processor.name,
                "kwargs": kwargs,
                "workflow_run_id": run.id,
            }
        writes.channels.add(processor.channel)
        if len(kwargs_list) > 1:  # its elements count down in tallies
            writes.tallies.extend(
                {"run_id": run.id, "step": step.name, "slot": slot}
                | {"open": len(range(slot, len(kwargs_list), TALLY_SLOTS))}
                for slot in range(min(len(kwargs_list), TALLY_SLOTS))
            )

    def _fail(self, run: _Run, workflow: Workflow, step: str, error: str, writes: _Writes) -> None:
        """The run fails at ``step``: its pending steps are cancelled, ``on_failure`` runs."""
        writes.drop(run.id)
        writes.failed.append(run.id)
        run.state, run.failed_step = RunState.FAILED, step
        run.error = f"step {step}: {error}"
        handler = workflow.on_failure
        if handler is None:
            return
        context = {"input": run.input, "error": run.error, "step": step, "run_id": str(run.id)}
        try:
            kwargs = resolve_values(handler.kwargs or {}, context)
            wanted = handler.parameters
            kwargs |= {k: v for k, v in context.items() if k in wanted and k not in kwargs}
            handler.processor.check_kwargs(kwargs)
        except (WorkflowError, KwargsError) as refused:
            logger.error("run %s: on_failure not run: %s", run.id, refused)
            return
        self._plan(run, handler, [kwargs], writes)

    def _write(self, session: Session, runs: list[_Run], writes: _Writes) -> None:
        """Write a progression: the cancellation of failed runs' pending tasks, then in one
        statement the step rows (a row already there, from a release made twice, keeps its
        task out), their tallies, their tasks (the first of a channel in the transaction
        notifying it) and the runs that ended (notifying RUNS_CHANNEL)."""
        connection = session.connection()
        if writes.failed:
            t = self.app.task_model.__table__
            connection.execute(
                update(t)
                .where(t.c.workflow_run_id.in_(writes.failed))
                .where(t.c.state == TaskState.PENDING.value)
                .values(
                    state=TaskState.CANCELLED.value,
                    finished_at=func.clock_timestamp(),
                    error_message="cancelled: its run failed",
                )
            )
        changed = {
            str(run.id): {
                "state": run.state.value,
                "result": run.result,
                "error": run.error,
                "failed_step": run.failed_step,
            }
            for run in runs
            if run.dirty
        }
        if not writes.steps and not changed:
            return
        execute(
            connection,
            self.sql.write,
            {
                "steps": _json_rows(writes.steps),
                "tallies": _json_rows(writes.tallies),
                "tasks": _json_rows(list(writes.tasks.values())),
                "notify": to_notify(session, writes.channels),
                "moved": changed,
                "moved_ids": list(changed),
            },
        )

    # ---- steering --------------------------------------------------------------------------

    def cancel(self, session: Session, run_id: uuid.UUID, by: str | None = None) -> bool:
        """Cancel a running run: it becomes CANCELLED, its pending steps are cancelled and its
        running ones interrupted. Returns False when the run was not running."""
        runs = self._read(session, {run_id}, whole=True)
        if not runs:
            return False
        by = by or operator()
        t = self.app.task_model
        ids = session.scalars(
            select(t.id).where(
                t.workflow_run_id == run_id,
                t.state.in_([TaskState.PENDING, TaskState.PROCESSING]),
            )
        ).all()
        self.ops.cancel(session, ids, by=by)
        runs[0].state, runs[0].error = RunState.CANCELLED, f"cancelled by {by}"
        self._write(session, runs, _Writes())
        return True

    def fail(self, session: Session, run_id: uuid.UUID, error: str) -> None:
        """Fail a running run, saying why (its steps are left as they are)."""
        runs = self._read(session, {run_id}, whole=True)
        for run in runs:
            run.state, run.error = RunState.FAILED, error
        self._write(session, runs, _Writes())

    def retry(self, session: Session, run_id: uuid.UUID, by: str | None = None) -> int:
        """Resume a failed or cancelled run from where it stopped: its failed and cancelled
        steps run again (with fresh attempts), what succeeded is not run again. Returns how
        many step tasks were retried."""
        found = session.execute(
            select(WorkflowRun.workflow, WorkflowRun.state)
            .where(WorkflowRun.id == run_id)
            .with_for_update()
        ).first()
        if found is None or found.state not in (RunState.FAILED, RunState.CANCELLED):
            raise WorkflowError(f"run {run_id} is not failed or cancelled")
        workflow = self.definitions.get(found.workflow)
        if workflow is None:
            raise WorkflowError(f"workflow {found.workflow!r} is not declared here")
        t = self.app.task_model
        handler = workflow.on_failure.name if workflow.on_failure else None
        ids = session.scalars(
            select(t.id)
            .join(WorkflowStep, WorkflowStep.task_id == t.id)
            .where(WorkflowStep.run_id == run_id, WorkflowStep.step != handler)
            .where(t.state.in_([TaskState.FAILED, TaskState.CANCELLED]))
        ).all()
        retried = self.ops.retry(session, ids, by)
        if handler is not None:  # a later failure runs it again
            session.execute(
                delete(WorkflowStep).where(
                    WorkflowStep.run_id == run_id, WorkflowStep.step == handler
                )
            )
        session.execute(
            update(WorkflowRun)
            .where(WorkflowRun.id == run_id)
            .values(state=RunState.RUNNING, error=None, failed_step=None, finished_at=None)
            .execution_options(synchronize_session=False)
        )
        self.advance(session, [run_id])
        return retried

    # ---- reading ---------------------------------------------------------------------------

    def runs(
        self,
        session: Session,
        workflow: str | None = None,
        state: RunState | None = None,
        limit: int = 50,
    ) -> list[WorkflowRun]:
        """The newest runs (of ``workflow``, in ``state``)."""
        query = select(WorkflowRun).order_by(WorkflowRun.created_at.desc(), WorkflowRun.id)
        if workflow is not None:
            query = query.where(WorkflowRun.workflow == workflow)
        if state is not None:
            query = query.where(WorkflowRun.state == RunState(state))
        return list(session.scalars(query.limit(limit)))

    def run(self, session: Session, run_id: uuid.UUID) -> RunDetail | None:
        """A run and each row of its steps, with their tasks."""
        run = session.get(WorkflowRun, run_id)
        if run is None:
            return None
        t = self.app.task_model
        rows = session.execute(
            select(WorkflowStep, t)
            .outerjoin(t, t.id == WorkflowStep.task_id)
            .where(WorkflowStep.run_id == run_id)
            .order_by(WorkflowStep.released_at, WorkflowStep.index)
        ).all()
        return RunDetail(run, [StepView(s.step, s.index, s.outcome, task) for s, task in rows])

    def wait(self, run_id: uuid.UUID, timeout: float | None = None) -> WorkflowRun | None:
        """Sleep on LISTEN until run ``run_id`` ends; returns it (detached), or None after
        ``timeout`` seconds."""

        def ended(session: Session) -> tuple[bool, Any]:
            run = session.get(WorkflowRun, run_id)
            return run is None or run.state != RunState.RUNNING, run

        return listen_until(self.app, RUNS_CHANNEL, ended, timeout)

    def draw(self, detail: RunDetail | None, workflow: Workflow) -> list[str]:
        """The workflow as text, a line per step by depth (its upstreams after ←) and, given a
        run, each step's state in a column."""
        depth = workflow.levels()
        steps = list(workflow.steps.values())
        if workflow.on_failure is not None:
            steps.append(workflow.on_failure)
        left = []
        for step in steps:
            level = depth.get(step.name)
            marker = f"{level + 1}." if level is not None else "!"
            upstream = f" ← {', '.join(step.after)}" if step.after else ""
            if step is workflow.on_failure:
                upstream = " ← any step failing for good"
            fan = f" (for each {step.for_each})" if step.for_each else ""
            when = f" (if {step.condition})" if step.condition is not None else ""
            indent = "  " * (level or 0)
            left.append(f"{marker:>3} {indent}{step.name}{upstream}{fan}{when}")
        if detail is None:
            return left
        width = max(map(len, left))
        return [
            f"{line:<{width}}  {step_state(detail, step.name, step is workflow.on_failure)}"
            for line, step in zip(left, steps, strict=True)
        ]


def step_state(detail: RunDetail, step: str, handler: bool = False) -> str:
    """A step's state in a run (``describe``). A step not released yet is "waiting" while the
    run runs and "not run" once it has ended (failed or cancelled before it); the on_failure
    step, "if it fails" and "not needed"."""
    views = detail.of(step)
    if views:
        return describe(views)
    running = detail.run.state == RunState.RUNNING
    if handler:
        return "if it fails" if running else "not needed"
    return "waiting" if running else "not run"


def describe(views: list[StepView]) -> str:
    """A released step's state in a run: skipped, empty, or its tasks' states counted."""
    if views[0].outcome is not None:
        return views[0].outcome.value.lower()
    counts: dict[str, int] = {}
    for view in views:
        state = "GONE" if view.task is None else TaskState(view.task.state).value
        counts[state] = counts.get(state, 0) + 1
    if len(views) == 1:
        return next(iter(counts)).lower()
    return f"×{len(views)}: " + ", ".join(f"{n} {s.lower()}" for s, n in sorted(counts.items()))


def _result_of(step: Step | None, rows: list[Any]) -> Any:
    """A completed step's result: its task's, the list of its elements' (a fan-out), None
    when it was skipped, [] when it fanned out over nothing."""
    if rows[0].outcome == StepOutcome.SKIPPED:
        return None
    if rows[0].outcome == StepOutcome.EMPTY:
        return []
    if step is not None and step.for_each is not None:
        return [row.result for row in rows]
    return rows[0].result


class WorkflowService(PeriodicService):
    """Advances runs that nothing else will: a running run with no step task pending or
    running (a step ended outside a worker's completion, or its release failed). A run whose
    progression fails again is failed, saying why."""

    name = "workflows"
    PERIOD = 5.0
    BATCH = 100

    def __init__(self, workflows: Workflows, period: float = PERIOD) -> None:
        super().__init__(period, threading.Event())
        self.workflows = workflows

    def run_once(self) -> None:
        t = self.workflows.app.task_model
        active = (
            select(t.id)
            .where(t.workflow_run_id == WorkflowRun.id)
            .where(t.state.in_([TaskState.PENDING, TaskState.PROCESSING]))
            .exists()
        )
        with self.workflows.app.session_factory() as session:
            stalled = session.scalars(
                select(WorkflowRun.id)
                .where(WorkflowRun.state == RunState.RUNNING, ~active)
                .limit(self.BATCH)
            ).all()
        for run_id in stalled:
            with self.workflows.app.session_factory() as session:
                try:
                    self.workflows.advance(session, [run_id], wait=False)
                    session.commit()
                except Exception as error:  # noqa: BLE001 - charged to the run
                    session.rollback()
                    if refused_for_now(error):  # no fault of the run's: the next round
                        logger.warning("run %s: not advanced now: %s", run_id, first_line(error))
                        continue
                    logger.exception("run %s cannot advance; it fails", run_id)
                    message = f"its progression failed: {type(error).__name__}: {first_line(error)}"
                    self.workflows.fail(session, run_id, message)
                    session.commit()


class _Statements:
    """The progression's statements, PREPAREd on the worker connections that run them for
    every batch (``engine.connections.execute``). Each finds its rows through an index
    whatever the planner knows of the tables: a plan made once, while the tables are small,
    holds as they grow."""

    def __init__(self, tasks: Any) -> None:
        r, s, t = WorkflowRun.__table__, WorkflowStep.__table__, tasks
        c = WorkflowTally.__table__
        ids = ARRAY(r.c.id.type)
        wanted = r.c.id == any_(bindparam("runs", type_=ids))
        failed_ids = bindparam("failed", type_=ids)
        failed = r.c.id == any_(failed_ids)
        ended_tasks = s.c.task_id == any_(bindparam("done", type_=ids))
        lock = select(r.c.id).where(wanted).order_by(r.c.id)
        self.lock = Prepared("beanflow_workflow_lock", lock.with_for_update())
        self.lock_unless_locked = Prepared(
            "beanflow_workflow_lock_skip", lock.with_for_update(skip_locked=True)
        )
        # a larger batch's count-down, in the hook rather than in its completion, locking
        # the runs of the batch's failed tasks with those it counted to zero
        self.count_down = Prepared(
            "beanflow_workflow_count_down",
            select(counted_down(bindparam("done", type_=ids), failed=failed_ids)),
        )
        # the steps of a run that ended a step: one without tallies, or with all at zero
        # materialized: inlined, it would find a run's ended steps among all its steps
        ended = (
            select(s.c.run_id, s.c.step)
            .where(ended_tasks)
            .distinct()
            .cte("ended")
            .prefix_with("MATERIALIZED")
        )
        still_open = (
            select(c.c.slot)
            .where(c.c.run_id == ended.c.run_id, c.c.step == ended.c.step, c.c.open > 0)
            .exists()
        )
        ended_a_step = select(ended.c.step).where(ended.c.run_id == r.c.id, ~still_open).exists()
        steps = (
            select(
                func.coalesce(
                    func.jsonb_agg(
                        aggregate_order_by(
                            func.jsonb_build_array(
                                s.c.step,
                                s.c.index,
                                s.c.outcome,
                                t.c.state,
                                t.c.result,
                                t.c.error_message,
                            ),
                            s.c.step,
                            s.c.index,
                        )
                    ),
                    cast(literal("[]", String), JSONB),
                )
            )
            .select_from(s.outerjoin(t, t.c.id == s.c.task_id))
            .where(s.c.run_id == r.c.id)
            .scalar_subquery()
        )
        small = func.pg_column_size(r.c.input) <= SMALL_INPUT
        self.read = Prepared(
            "beanflow_workflow_read",
            select(
                r.c.id,
                r.c.workflow,
                case((small, r.c.input)).label("input"),
                small.label("small"),
                steps.label("steps"),
            )
            .where(wanted, r.c.state == RunState.RUNNING.value)
            .where(bindparam("whole", type_=Boolean) | failed | ended_a_step)
            .order_by(r.c.id),
        )
        self.write = Prepared("beanflow_workflow_write", self._write_statement(r, s, c, t))

    @staticmethod
    def _write_statement(r: Any, s: Any, c: Any, t: Any) -> Any:
        """Insert step rows, their tallies and the tasks of those that are new, and move runs:
        ``moved`` maps a run's id to its new state, result, error and failed step."""
        given = func.jsonb_to_recordset(bindparam("steps", type_=JSONB)).table_valued(
            *_records(s, "run_id", "step", "index", "task_id"), column("outcome", String)
        )
        fresh = (
            pg_insert(s)
            .from_select(
                ["run_id", "step", "index", "task_id", "outcome"],
                select(*(given.render_derived(with_types=True).c)),
            )
            .on_conflict_do_nothing()
            .returning(s.c.task_id)
            .cte("fresh")
        )
        counts = func.jsonb_to_recordset(bindparam("tallies", type_=JSONB)).table_valued(
            *_records(c, "run_id", "step", "slot", "open")
        )
        tallied = (
            pg_insert(c)
            .from_select(
                ["run_id", "step", "slot", "open"],
                select(*(counts.render_derived(with_types=True).c)),
            )
            .on_conflict_do_nothing()
            .cte("tallied")
        )
        names = ("id", "channel", "module", "name", "kwargs", "workflow_run_id")
        tasks = (
            func.jsonb_to_recordset(bindparam("tasks", type_=JSONB))
            .table_valued(*_records(t, *names))
            .render_derived(with_types=True)
        )
        woken = bindparam("notify", type_=ARRAY(String))
        added = (
            insert(t)
            .from_select(
                [*names, "scheduled_at"],
                # due from the start of the transaction that releases them (not the moment
                # of the insert), so that its own claim, a worker's, can take them
                select(tasks, func.now()).where(tasks.c.id.in_(select(fresh.c.task_id))),
                include_defaults=False,  # the columns' server defaults
            )
            # PostgreSQL delivers one of identical notifications per transaction
            .returning(case((t.c.channel == any_(woken), func.pg_notify(t.c.channel, ""))))
            .cte("added")
        )
        # a run's new values, found by its id in the parameter: no join to plan
        new = bindparam("moved", type_=JSONB).op("->", return_type=JSONB)(cast(r.c.id, String))

        def text_of(key: str) -> Any:
            return new.op("->>", return_type=String)(key)

        moved = (
            update(r)
            # their ids apart, as an array: taken from the JSON keys, the generic plan joins
            # them to the whole primary key index instead of looking each up
            .where(r.c.id == any_(bindparam("moved_ids", type_=ARRAY(r.c.id.type))))
            .values(
                state=text_of("state"),
                result=func.nullif(
                    new.op("->", return_type=JSONB)("result"), cast(literal("null", String), JSONB)
                ),
                error=text_of("error"),
                failed_step=text_of("failed_step"),
                finished_at=case(
                    (text_of("state") != RunState.RUNNING.value, func.clock_timestamp())
                ),
            )
            .returning(
                case((r.c.state != RunState.RUNNING.value, func.pg_notify(RUNS_CHANNEL, "")))
            )
            .cte("moved")
        )
        return select(
            select(func.count()).select_from(added).scalar_subquery().label("tasks"),
            select(func.count()).select_from(moved).scalar_subquery().label("runs"),
        ).add_cte(fresh, tallied)


def counted_down(task_ids: Any, up_to: int | None = None, failed: Any = None) -> Any:
    """Count the step tasks among ``task_ids`` (an array) out of their slots' tallies (the
    tallies locked in key order), and lock, in id order, each run of which one ended a slot
    (its tally at zero) or a step that has no tallies, and the runs ``failed`` (an array of
    run ids) with them; the column: how many runs it locked. With ``up_to``, only when there
    are at most that many tasks (else NULL: not counted). Plain tasks, and fan-out elements
    that leave their slots open, cost an index probe of the steps."""
    r, s, c = WorkflowRun.__table__, WorkflowStep.__table__, WorkflowTally.__table__
    zero = literal_column("0")  # constants written out: its parameters are all ids
    slot = func.mod(s.c.index, literal_column(str(TALLY_SLOTS), Integer)).label("slot")
    counting = true()
    if up_to is not None:
        counting = func.cardinality(task_ids) <= literal_column(str(up_to), Integer)
    ended = (
        select(s.c.run_id, s.c.step, slot, func.count().label("n"))
        .where(s.c.task_id == any_(task_ids), counting)
        .group_by(s.c.run_id, s.c.step, slot)
        .cte("workflow_ended")
    )
    key = (c.c.run_id, c.c.step, c.c.slot)

    def same(rows: Any) -> Any:
        return and_(*(rows.c[column.name] == ended.c[column.name] for column in key))

    locked = select(*key).join_from(c, ended, same(c)).order_by(*key).with_for_update(of=c)
    counted = (
        update(c)
        .where(same(c), tuple_(*key).in_(select(*locked.cte("workflow_tallies_locked").c)))
        .values(open=c.c.open - ended.c.n)
        .returning(*key, c.c.open)
        .cte("workflow_counted")
    )
    at_zero = (
        select(ended.c.run_id)
        .select_from(ended.outerjoin(counted, same(counted)))
        .where(func.coalesce(counted.c.open, zero) <= zero)
    )
    if failed is None:
        at_zero = at_zero.distinct().subquery("workflow_at_zero")
    else:
        at_zero = union(at_zero, select(func.unnest(failed))).subquery("workflow_at_zero")
    runs = (
        select(r.c.id)
        .join_from(r, at_zero, r.c.id == at_zero.c.run_id)
        .order_by(r.c.id)
        .with_for_update(of=r)
        .cte("workflow_runs_locked")
    )
    locked = select(func.count()).select_from(runs).scalar_subquery()
    return locked if up_to is None else case((counting, locked))


def _records(table: Any, *names: str) -> list[Any]:
    """Columns of a jsonb_to_recordset row, typed as ``table``'s columns of those names."""
    return [column(name, table.c[name].type) for name in names]


def _json_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``rows`` as JSON values (ids as text, enums as their values)."""
    return [{k: _plain(v) for k, v in row.items()} for row in rows]


def _plain(value: Any) -> Any:
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, enum.Enum):
        return value.value
    return value


def step_copy(processor: Processor, name: str, **overrides: Any) -> Processor:
    """``processor`` registered again as ``name`` with its retry policy or timeout
    overridden (a step's own settings)."""
    derived = copy.copy(processor)
    derived.name = name
    for key, value in overrides.items():
        setattr(derived, key, value)
    return derived


__all__ = [
    "Condition",
    "Ref",
    "RunDetail",
    "Step",
    "StepView",
    "Workflow",
    "WorkflowError",
    "WorkflowService",
    "Workflows",
]

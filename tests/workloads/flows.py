"""Step functions of the workflow tests (tests/workloads/flows.yaml)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from sqlalchemy import String, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from beanflow.models import WorkflowStep


class FlowBase(DeclarativeBase):
    pass


class FlowEffect(FlowBase):
    """One row per (run, step, element) whose effect committed: its primary key refuses a
    second one."""

    __tablename__ = "flow_effects"
    key: Mapped[str] = mapped_column(String, primary_key=True)


def fetch(user_id: int, emails: int) -> dict:
    return {
        "user_id": user_id,
        "emails": [f"user{user_id}+{n}@example.com" for n in range(emails)],
        "vip": user_id % 2 == 0,
    }


def avatar(results: dict) -> str:
    return f"avatar of {results['fetch']['user_id']}"


def welcome(item: str) -> str:
    return f"welcomed {item}"


def report(results: dict, input: dict) -> dict:
    return {"user": input["user_id"], "avatar": results["avatar"], "sent": results["welcome"]}


def gift(user_id: int) -> str:
    return f"gift for {user_id}"


def boom(message: str = "it broke") -> None:
    raise RuntimeError(message)


def notify_admin(error: str, step: str, run_id: str) -> str:
    return f"admin told: run {run_id} failed at {step}: {error}"


def slow(flag: str) -> str:
    """Says it started (a file), then waits until cancelled."""
    Path(flag).write_text(str(os.getpid()))
    signal.pause()
    return "never"


def effect(db: Session, task, item: object = None, results: dict | None = None) -> str:
    """Writes the step's effect row in the step's own transaction."""
    step = db.scalars(select(WorkflowStep).where(WorkflowStep.task_id == task.id)).one()
    key = f"{step.run_id}/{step.step}/{step.index}"
    db.add(FlowEffect(key=key))
    return key


def flaky_effect(db: Session, task, flag: str, item: object = None) -> str:
    """Fails until the file ``flag`` exists, then writes its effect."""
    if not Path(flag).exists():
        raise RuntimeError("not yet")
    return effect(db, task, item)


def picky_effect(db: Session, task, flag: str, item: str) -> str:
    """Fails for the odd elements (user…+N@…) until the file ``flag`` exists."""
    if int(item.split("+")[1].split("@")[0]) % 2 and not Path(flag).exists():
        raise RuntimeError("odd, not yet")
    return effect(db, task, item)

"""Processors that the worker-process tests run; configured from BEANFLOW_* variables."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

from sqlalchemy import String, text
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import beanflow as bq

app = bq.BeanQueue()


class UserBase(DeclarativeBase):
    pass


class Effect(UserBase):
    """A user table that processors write to in the task's transaction."""

    __tablename__ = "effects"
    key: Mapped[str] = mapped_column(String, primary_key=True)


@app.processor(channel="work")
def echo(value: object) -> object:
    return value


@app.processor(channel="work")
def write_effect(db: Session, key: str) -> None:
    db.add(Effect(key=key))


@app.processor(channel="work")
def slow_effect(db: Session, key: str, flag: str, seconds: float) -> None:
    """Writes its effect, says it started (a file), then works for ``seconds``."""
    db.add(Effect(key=key))
    db.flush()
    Path(flag).write_text(str(os.getpid()))
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.01)


@app.processor(channel="work")
def kill_my_worker() -> None:
    """Dies like a segfault would: no cleanup, no exception."""
    os.kill(os.getpid(), signal.SIGKILL)


@app.processor(channel="work")
def exit_my_worker() -> None:
    os._exit(3)


@app.processor(channel="work", timeout=0.5)
def spin() -> None:
    """Never returns on its own: only its timeout ends it."""
    while True:
        pass


@app.processor(channel="work")
def slow_once(flag: str) -> str:
    """The first run says it started (a file holding its pid) and never ends; later runs
    return at once."""
    path = Path(flag)
    if path.exists():
        return "second run"
    path.write_text(str(os.getpid()))
    while True:
        time.sleep(0.01)


@app.processor(channel="chaos")
def mark(db: Session, task: bq.Task) -> None:
    """The chaos run's task: its effect is a row keyed by its own id, so an effect committed
    twice would fail on the primary key."""
    db.add(Effect(key=str(task.id)))
    db.flush()
    time.sleep(0.003)  # a little work, so that kills land in the middle of tasks


@app.processor(channel="limits")
def idle_in_transaction(db: Session, key: str, seconds: float) -> None:
    """Writes, then keeps its transaction idle for ``seconds``."""
    db.add(Effect(key=key))
    db.flush()
    time.sleep(seconds)


@app.processor(channel="limits")
def slow_query(db: Session, seconds: float) -> None:
    db.execute(text("SELECT pg_sleep(:seconds)"), {"seconds": seconds})


@app.processor(channel="limits")
def quick(value: int) -> int:
    return value


@app.processor(channel="work")
def hang_up(db: Session) -> None:
    """Has the server drop its own connection, mid-statement."""
    db.execute(text("SELECT pg_terminate_backend(pg_backend_pid())"))


@app.processor(channel="work")
def boom(message: str) -> None:
    """Fails, with a traceback to show."""
    raise ValueError(message)


@app.processor(channel="work")
def fails_once(flag: str) -> str:
    """Fails on its first run (leaving the file ``flag``), succeeds on any later one."""
    path = Path(flag)
    if not path.exists():
        path.write_text("failed once")
        raise RuntimeError("the first run fails")
    return "ran again"


async def awaits() -> None:
    """Not a processor: an async function (a file naming it is refused)."""


def yields() -> Iterator[int]:
    """Not a processor: a generator function (a file naming it is refused)."""
    yield 1

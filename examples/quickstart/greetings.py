"""The quickstart's processor: plain functions, declared in beanflow.yaml."""

from sqlalchemy.orm import Session

import beanflow as bq


def greet(db: Session, task: bq.Task, name: str) -> str:
    if name == "flaky" and task.attempts == 1:
        raise ConnectionError("the first attempt fails; the retry policy tries again")
    if name == "parent":
        bq.enqueue(db, "greet", name="child")  # this task's child, in its transaction
    return f"hello, {name}"

"""The reference README's custom models, with ``import beanflow as bq``."""

from __future__ import annotations

import uuid

from sqlalchemy import ForeignKey
from sqlalchemy.dialects.postgresql import UUID
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

import beanflow as bq
from beanflow.models.task import listen_events


class Base(DeclarativeBase):
    pass


class Task(bq.TaskModelMixin, Base):
    __tablename__ = "task"
    worker_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True),
        ForeignKey("worker.id", onupdate="CASCADE"),
        nullable=True,
        index=True,
    )

    worker: Mapped[Worker] = relationship("Worker", back_populates="tasks", uselist=False)


listen_events(Task)


class Worker(bq.WorkerModelMixin, Base):
    __tablename__ = "worker"

    tasks: Mapped[list[Task]] = relationship(
        "Task",
        back_populates="worker",
        cascade="all,delete",
        order_by="Task.created_at",
    )


class Event(bq.EventModelMixin, Base):
    __tablename__ = "event"
    task_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("task.id"), index=True)
    task: Mapped[Task] = relationship("Task")


config = bq.Config(
    TASK_MODEL="my_pkgs.custom.Task",
    WORKER_MODEL="my_pkgs.custom.Worker",
    EVENT_MODEL="my_pkgs.custom.Event",
)
app = bq.BeanQueue(config)


@app.processor(channel="custom")
def double(task: Task, n: int) -> int:
    return 2 * n

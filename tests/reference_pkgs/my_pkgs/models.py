"""The user's own models of the reference README: rows that point at their task."""

from __future__ import annotations

import uuid

from sqlalchemy import ForeignKey, Integer, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

import beanflow as bq


class Base(DeclarativeBase):
    pass


class Image(Base):
    __tablename__ = "images"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    blob_name: Mapped[str] = mapped_column(String)
    width: Mapped[int | None] = mapped_column(Integer)
    height: Mapped[int | None] = mapped_column(Integer)
    task_id: Mapped[uuid.UUID] = mapped_column(ForeignKey(bq.Task.id))
    task: Mapped[bq.Task] = relationship(bq.Task)


class File(Base):
    __tablename__ = "files"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    blob_name: Mapped[str] = mapped_column(String)
    backed_up: Mapped[bool] = mapped_column(default=False)
    task_id: Mapped[uuid.UUID] = mapped_column(ForeignKey(bq.Task.id))
    task: Mapped[bq.Task] = relationship(bq.Task)

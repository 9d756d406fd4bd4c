"""A shop's own tables and the processors that work on them.

``charge`` updates the user's ``orders`` row and enqueues a ``send_receipt`` child task: both
commit with the task's completion, or neither does.
"""

from __future__ import annotations

import uuid

from sqlalchemy import ForeignKey, Numeric, String
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship

import beanflow as bq


class Base(DeclarativeBase):
    pass


class Order(Base):
    __tablename__ = "orders"
    id: Mapped[int] = mapped_column(primary_key=True)
    customer: Mapped[str] = mapped_column(String)
    amount: Mapped[float] = mapped_column(Numeric(10, 2))
    status: Mapped[str] = mapped_column(String, default="placed")
    receipt_sent: Mapped[bool] = mapped_column(default=False)
    # the task that charges this order, written in the same transaction as the order
    task_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey(bq.Task.id))
    task: Mapped[bq.Task | None] = relationship(bq.Task)


class PaymentDeclined(Exception):
    """The payment provider said no; retrying will not help."""


def charge(db: Session, order_id: int) -> dict:
    order = db.get(Order, order_id, with_for_update=True)
    if order.amount <= 0:
        raise PaymentDeclined(f"order {order_id}: nothing to charge")
    order.status = "charged"
    bq.enqueue(db, "send_receipt", order_id=order_id)  # a child task, same transaction
    return {"order": order_id, "charged": float(order.amount)}


def send_receipt(db: Session, order_id: int) -> None:
    db.get(Order, order_id).receipt_sent = True


def report(db: Session) -> dict:
    """The hourly report: how many orders are in each status."""
    rows = db.query(Order.status, Order.id).all()
    counts: dict[str, int] = {}
    for status, _ in rows:
        counts[status] = counts.get(status, 0) + 1
    return counts

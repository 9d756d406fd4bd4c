"""The declarative base of beanflow's default models."""

from sqlalchemy.orm import DeclarativeBase


class Base(DeclarativeBase):
    """Base of beanflow's own Task, Worker and Event; custom models bring their own."""

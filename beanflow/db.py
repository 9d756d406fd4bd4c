"""Engine and session factory; picks the embedded server when no URL is configured."""

from __future__ import annotations

from sqlalchemy import Engine, create_engine
from sqlalchemy.engine import make_url
from sqlalchemy.orm import sessionmaker

from . import embedded
from .config import Config


def database_url(config: Config) -> str:
    """The configured URL with a psycopg2 driver, or the embedded server's URL."""
    if config.DATABASE_URL is None:
        return embedded.start(config.EMBEDDED_DIR)
    url = make_url(config.DATABASE_URL)
    # SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3; beanflow speaks psycopg2
    if url.drivername in ("postgresql", "postgres"):
        url = url.set(drivername="postgresql+psycopg2")
    return url.render_as_string(hide_password=False)


def make_engine(config: Config) -> Engine:
    """An engine for the configured database."""
    return create_engine(database_url(config), pool_pre_ping=True)


def make_session_factory(engine: Engine) -> sessionmaker:
    return sessionmaker(bind=engine)

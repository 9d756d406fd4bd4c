"""Test databases: each test gets its own, cloned from a template that has the tables.

The server is BEANFLOW_TEST_DATABASE_URL when set, otherwise an embedded PostgreSQL that this
test session starts in its own temporary folder (and that stops when the session ends).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

import beanflow as bq
from beanflow import db, embedded
from beanflow.models import Base

from .helpers import OwnServer, Workers


@pytest.fixture(scope="session")
def server_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    """URL of a maintenance database on the server the tests use."""
    configured = os.environ.get("BEANFLOW_TEST_DATABASE_URL")
    if configured:
        return db.database_url(bq.Config(DATABASE_URL=configured))
    return embedded.start(tmp_path_factory.mktemp("embedded"))


def _admin(server_url: str):
    return create_engine(server_url, isolation_level="AUTOCOMMIT")


def database_url(server_url: str, name: str) -> str:
    return make_url(server_url).set(database=name).render_as_string(hide_password=False)


@pytest.fixture(scope="session")
def template_database(server_url: str) -> Iterator[str]:
    name = f"beanflow_template_{uuid.uuid4().hex[:12]}"
    admin = _admin(server_url)
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    engine = create_engine(database_url(server_url, name))
    Base.metadata.create_all(engine)
    engine.dispose()
    yield name
    with admin.connect() as connection:
        connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def create_database(server_url: str, template: str | None = None) -> str:
    name = f"beanflow_test_{uuid.uuid4().hex[:12]}"
    admin = _admin(server_url)
    with admin.connect() as connection:
        clause = f' TEMPLATE "{template}"' if template else ""
        connection.execute(text(f'CREATE DATABASE "{name}"{clause}'))
    admin.dispose()
    return name


def drop_database(server_url: str, name: str) -> None:
    admin = _admin(server_url)
    with admin.connect() as connection:
        connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture
def db_url(server_url: str, template_database: str) -> Iterator[str]:
    """A fresh database with beanflow's default tables, dropped after the test."""
    name = create_database(server_url, template_database)
    yield database_url(server_url, name)
    drop_database(server_url, name)


@pytest.fixture
def empty_db_url(server_url: str) -> Iterator[str]:
    """A fresh database without any table."""
    name = create_database(server_url)
    yield database_url(server_url, name)
    drop_database(server_url, name)


@pytest.fixture
def config(db_url: str) -> bq.Config:
    return bq.Config(env={}, DATABASE_URL=db_url, POLL_TIMEOUT=5.0)


@pytest.fixture
def app(config: bq.Config) -> Iterator[bq.BeanQueue]:
    app = bq.BeanQueue(config)
    yield app
    app.engine.dispose()


@pytest.fixture
def session(app: bq.BeanQueue):
    with app.session_factory() as session:
        yield session


@pytest.fixture
def workers(db_url: str, tmp_path) -> Iterator[Workers]:
    """Starts real worker processes (``python -m beanflow``) against the test database."""
    pool = Workers(db_url, tmp_path)
    yield pool
    pool.kill_all()


@pytest.fixture
def own_server(tmp_path) -> Iterator[OwnServer]:
    """A server the test may restart, crash or reconfigure (an embedded one of its own)."""
    server = OwnServer(tmp_path / "own-server")
    yield server
    server.stop()
    # a test run leaves nothing behind, even after the test restarted or crashed its server
    assert server.running_processes() == []

"""The reference (BeanQueue) README's examples, unchanged but for ``import beanflow as bq``
and ``beanflow`` on the command line."""

from __future__ import annotations

import datetime
import subprocess
import sys
import typing

import pytest
from sqlalchemy import create_engine, func, select, text
from sqlalchemy.orm import Session

import beanflow as bq
from beanflow.models import TaskState

from . import helpers
from .helpers import ROOT

PACKAGES = ROOT / "tests" / "reference_pkgs"
sys.path.insert(0, str(PACKAGES))

from my_pkgs import custom, models  # noqa: E402
from my_pkgs.processors import resize_image  # noqa: E402


def beanflow(db_url: str, *arguments: str, **env: str) -> subprocess.CompletedProcess:
    return helpers.beanflow(
        *arguments, BEANFLOW_DATABASE_URL=db_url, PYTHONPATH=str(PACKAGES), **env
    )


@pytest.fixture
def db(empty_db_url: str) -> typing.Iterator[Session]:
    result = beanflow(empty_db_url, "create_tables")
    assert result.returncode == 0, result.stderr
    engine = create_engine(bq.db.database_url(bq.Config(env={}, DATABASE_URL=empty_db_url)))
    models.Base.metadata.create_all(engine)
    with Session(engine) as session:
        yield session
    engine.dispose()


def test_usage_examples_end_to_end(empty_db_url, db):
    # "you can use the `run` helper"
    task = resize_image.run(width=200, height=300)
    image = models.Image(task=task, blob_name="...")
    db.add(image)
    db.add(task)
    db.commit()

    # "use `bq.Task` model object to construct the task object"
    file_task = bq.Task(
        channel="files",
        module="my_pkgs.files.processors",
        name="upload_to_s3_for_backup",
    )
    file = models.File(task=file_task, blob_name="...")
    db.add(file_task)
    db.add(file)
    db.commit()

    # "To submit a task for testing purpose"
    submitted = beanflow(
        empty_db_url,
        "submit",
        "images",
        "my_pkgs.processors",
        "resize_image",
        "-k",
        '{"width": 200, "height": 300}',
        BEANFLOW_PROCESSOR_PACKAGES='["my_pkgs.processors"]',
    )
    assert submitted.returncode == 0, submitted.stderr
    submitted_task = db.get(bq.Task, submitted.stdout.strip())
    assert (submitted_task.module, submitted_task.name, submitted_task.kwargs) == (
        "my_pkgs.processors",
        "resize_image",
        {"width": 200, "height": 300},
    )
    db.add(models.Image(task=submitted_task, blob_name="submitted"))
    db.commit()

    # BQ_PROCESSOR_PACKAGES='["my_pkgs.processors"]' bq process images  (here with --burst)
    images = beanflow(
        empty_db_url,
        "process",
        "images",
        "--burst",
        BEANFLOW_PROCESSOR_PACKAGES='["my_pkgs.processors"]',
    )
    assert images.returncode == 0, images.stderr
    # bq -a my_pkgs.bq.app process files
    files = beanflow(empty_db_url, "-a", "my_pkgs.bq.app", "process", "files", "--burst")
    assert files.returncode == 0, files.stderr

    db.expire_all()
    assert {t.state for t in db.scalars(select(bq.Task))} == {TaskState.DONE}
    assert [(i.width, i.height) for i in db.scalars(select(models.Image))] == [(200, 300)] * 2
    assert db.scalars(select(models.File.backed_up)).all() == [True]


def test_schedule_example(empty_db_url, db):
    task = resize_image.run(width=200, height=300)
    task.scheduled_at = func.now() + datetime.timedelta(minutes=3)
    db.add(task)
    db.commit()
    assert (task.scheduled_at - db.scalar(select(func.now()))) > datetime.timedelta(minutes=2)


def test_retry_examples_build():
    app = bq.BeanQueue()
    delay_retry = bq.DelayRetry(delay=datetime.timedelta(seconds=120))
    capped_delay_retry = bq.LimitAttempt(3, delay_retry)

    def my_retry_policy(task: bq.Task) -> typing.Any:
        return func.now() + datetime.timedelta(seconds=5)

    @app.processor(channel="images", retry_policy=delay_retry, retry_exceptions=ValueError)
    def resize_image(db: Session, task: bq.Task, width: int, height: int):
        pass

    @app.processor(channel="images", retry_policy=capped_delay_retry)
    def resize_image_capped(db: Session, task: bq.Task, width: int, height: int):
        pass

    @app.processor(channel="images", retry_policy=my_retry_policy)
    def resize_image_custom(db: Session, task: bq.Task, width: int, height: int):
        pass

    assert len(app.registry.processors) == 3


def test_custom_models(empty_db_url):
    """TASK_MODEL/WORKER_MODEL/EVENT_MODEL name the user's own tables; everything works."""
    assert beanflow(empty_db_url, "-a", "my_pkgs.custom.app", "create-tables").returncode == 0
    engine = create_engine(bq.db.database_url(bq.Config(env={}, DATABASE_URL=empty_db_url)))
    with Session(engine) as session:
        task = custom.double.run(n=21)
        assert isinstance(task, custom.Task)
        session.add(task)
        session.commit()
        result = beanflow(empty_db_url, "-a", "my_pkgs.custom.app", "process", "custom", "--burst")
        assert result.returncode == 0, result.stderr
        session.refresh(task)
        assert (task.state, task.result) == (TaskState.DONE, 42)
        assert task.worker.state == bq.WorkerState.SHUTDOWN
        events = session.scalars(select(custom.Event.type).order_by(custom.Event.id)).all()
        assert events == [bq.EventType.CLAIMED, bq.EventType.COMPLETE]

        # retention, though these foreign keys delete and unlink nothing themselves
        session.execute(text("UPDATE task SET finished_at = now() - interval '40 days'"))
        session.execute(text("UPDATE worker SET last_heartbeat = now() - interval '40 days'"))
        session.commit()
        result = beanflow(empty_db_url, "-a", "my_pkgs.custom.app", "purge")
        assert result.returncode == 0, result.stderr
        assert "1 tasks done" in result.stdout and "1 workers" in result.stdout
        for model in (custom.Task, custom.Event, custom.Worker):
            assert session.scalar(select(func.count()).select_from(model)) == 0
    engine.dispose()


def test_config_programmatic_and_process_tasks(db_url):
    config = bq.Config(
        PROCESSOR_PACKAGES=["my_pkgs.processors"],
        DATABASE_URL=db_url,
        BATCH_SIZE=10,
    )
    app = bq.BeanQueue(config=config)
    app.load_processors()
    assert app.registry.get("images", "my_pkgs.processors", "resize_image") is resize_image
    assert app.process_tasks(channels=("images",), burst=True) == 0
    app.engine.dispose()

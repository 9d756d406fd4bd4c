"""beanflow quickstart: submit tasks, process them, watch one retry and one spawn a child.

    python examples/quickstart/quickstart.py

With no database URL configured (BEANFLOW_DATABASE_URL), beanflow starts an embedded
PostgreSQL in .beanflow/ beside its beanflow.yaml and stops it when this script exits.
"""

from __future__ import annotations

import logging
from pathlib import Path

from sqlalchemy import select

import beanflow as bq


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)-7s %(message)s")
    app = bq.load(Path(__file__).with_name("beanflow.yaml")).app
    app.create_tables()
    with app.session_factory() as session:
        names = ("world", "flaky", "parent")
        submitted = [bq.enqueue(session, "greet", name=name) for name in names]
        session.commit()
        print(f"submitted {len(submitted)} tasks", flush=True)

        app.process_tasks(["quickstart"], burst=True)

        ids = [task.id for task in submitted]
        tasks = session.scalars(
            select(bq.Task).where(bq.Task.id.in_(ids) | bq.Task.parent_id.in_(ids))
        ).all()
        tasks.sort(key=lambda task: ids.index(task.id) if task.id in ids else len(ids))
        print(f"\n{'task':<10} {'state':<6} {'attempts':<8} {'parent':<10} result")
        for task in tasks:
            parent = str(task.parent_id)[:8] if task.parent_id else "-"
            print(
                f"{str(task.id)[:8]:<10} {task.state.value:<6} {task.attempts:<8} "
                f"{parent:<10} {task.result}"
            )


if __name__ == "__main__":
    main()

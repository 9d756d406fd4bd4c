"""What a running deployment serves when metrics are on (``beanflow run --metrics-port`` or
``metrics:`` in the YAML): ``/metrics`` in Prometheus's format and ``/healthz``.

Workers are separate processes: each counts its tasks into prometheus_client's multiprocess
files (``engine/metrics.py``), which ``/metrics`` adds up, beside gauges read at scrape time
from the database through the operations API (queue depth, oldest due task, workers).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from sqlalchemy import text

from .engine.metrics import MULTIPROCESS_DIR
from .ops import Operations

logger = logging.getLogger(__name__)


def enable_multiprocess() -> str:
    """Make this process and the workers it starts (they inherit its environment) count into
    a fresh folder; call before anything imports prometheus_client. Returns the folder."""
    folder = tempfile.mkdtemp(prefix="beanflow-metrics-")
    os.environ[MULTIPROCESS_DIR] = folder
    return folder


class QueueCollector:
    """Gauges read when scraped: tasks by channel and state, the oldest due task's age, and
    workers (this supervisor's processes, and the database's rows)."""

    def __init__(self, ops: Operations, processes: Callable[[], tuple[int, int]]) -> None:
        self.ops, self.processes = ops, processes

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        queue = GaugeMetricFamily(
            "beanflow_queue_tasks",
            "Tasks pending (due now, or scheduled later) and running, by channel",
            labels=["channel", "state"],
        )
        oldest = GaugeMetricFamily(
            "beanflow_oldest_due_task_age_seconds",
            "How long the oldest due task of each channel has waited",
            labels=["channel"],
        )
        workers = GaugeMetricFamily(
            "beanflow_workers",
            "Workers known to the database, alive (heartbeating) or not",
            labels=["alive"],
        )
        with self.ops.app.session_factory() as session:
            for counts in self.ops.counts(session):
                for state in ("due", "scheduled", "running"):
                    queue.add_metric([counts.channel, state], getattr(counts, state))
                age = counts.oldest_due_age.total_seconds() if counts.oldest_due_age else 0.0
                oldest.add_metric([counts.channel], age)
            found = self.ops.workers(session, gone=0)
        workers.add_metric(["true"], sum(1 for w in found if w.alive))
        workers.add_metric(["false"], sum(1 for w in found if not w.alive))
        alive, expected = self.processes()
        processes = GaugeMetricFamily(
            "beanflow_worker_processes",
            "This supervisor's worker processes: running, and expected",
            labels=["kind"],
        )
        processes.add_metric(["running"], alive)
        processes.add_metric(["expected"], expected)
        yield from (queue, oldest, workers, processes)


class MetricsServer:
    """Serves /metrics and /healthz on a thread of its own."""

    def __init__(
        self,
        ops: Operations,
        processes: Callable[[], tuple[int, int]],
        host: str = "127.0.0.1",
        port: int = 9187,
    ) -> None:
        from prometheus_client import CollectorRegistry, make_wsgi_app, multiprocess

        self.ops, self.processes = ops, processes
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        registry.register(QueueCollector(ops, processes))
        self.metrics_app = make_wsgi_app(registry)
        self.server: WSGIServer = make_server(host, port, self._route, handler_class=_Quiet)
        self.thread = threading.Thread(
            target=self.server.serve_forever, name="beanflow-metrics", daemon=True
        )

    @property
    def port(self) -> int:
        return self.server.server_port

    def start(self) -> None:
        self.thread.start()
        logger.info("metrics on http://%s:%d/metrics", *self.server.server_address[:2])

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        folder = os.environ.get(MULTIPROCESS_DIR)
        if folder and os.path.basename(folder).startswith("beanflow-metrics-"):
            shutil.rmtree(folder, ignore_errors=True)

    def health(self) -> tuple[bool, dict[str, Any]]:
        """Alive when this supervisor answers, all its workers run, and the database
        answers."""
        alive, expected = self.processes()
        report: dict[str, Any] = {"workers": {"running": alive, "expected": expected}}
        try:
            with self.ops.app.engine.connect() as connection:
                connection.execute(text("SELECT 1"))
            report["database"] = "ok"
        except Exception as error:  # noqa: BLE001 - any failure is the answer
            report["database"] = str(error).splitlines()[0]
        healthy = report["database"] == "ok" and alive == expected
        return healthy, report | {"healthy": healthy}

    def _route(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            return self.metrics_app(environ, start_response)
        if path == "/healthz":
            healthy, report = self.health()
            status = "200 OK" if healthy else "503 Service Unavailable"
            start_response(status, [("Content-Type", "application/json")])
            return [json.dumps(report).encode()]
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"/metrics or /healthz\n"]


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base's name
        logger.debug("metrics: " + format, *args)

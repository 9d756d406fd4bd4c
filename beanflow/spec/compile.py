"""A validated spec → a Deployment: the app and its registry, retry policies, the channels'
worker processes, and the schedules.

Compiling also checks what the schema cannot (imports resolve, references exist, names are
unique, cron expressions and timezones parse, kwargs fit their function), and reports every
problem it finds rather than stopping at the first.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from collections.abc import Mapping
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter
from sqlalchemy.engine import make_url

from ..app import BeanQueue
from ..config import (
    ENV_PREFIX,
    Config,
    ConfigError,
    HeartbeatsTooClose,
    duration,
    import_object,
    parse_duration,
    parse_setting,
)
from ..dashboard import TOKEN_ENV, DashboardSettings
from ..deployment import Deployment
from ..engine.pool import ChannelPlan
from ..engine.schedules import Schedule
from ..errors import BeanflowError
from ..models.task import check_channel
from ..processors.processor import Processor, why_not_a_processor
from ..workflows import Workflows
from .load import Document, Path_, Problem
from .policies import PolicyCompiler
from .workflows import WorkflowCompiler

# worker: key → Config field
_WORKER_SETTINGS = {
    "heartbeat_period": "WORKER_HEARTBEAT_PERIOD",
    "heartbeat_timeout": "WORKER_HEARTBEAT_TIMEOUT",
    "shutdown_grace_period": "SHUTDOWN_GRACE_PERIOD",
    "batch_window": "BATCH_WINDOW",
    "max_worker_crashes": "MAX_WORKER_CRASHES",
    "events": "EVENTS",
}
_BAD = object()  # a value that has a problem

# channels.NAME: key → Config field
_CHANNEL_SETTINGS = {"batch_size": "BATCH_SIZE", "poll_timeout": "POLL_TIMEOUT"}


class _Compiler:
    def __init__(self, document: Document, env: Mapping[str, str]) -> None:
        self.document = document
        self.data = document.data
        self.env = env
        self.problems: list[Problem] = []
        self.declared: dict[tuple[str, str, str], str] = {}  # registry key → processors' name

    def problem(self, path: Path_, message: str) -> None:
        self.problems.append(self.document.problem(path, message))

    def section(self, key: str) -> dict[str, Any]:
        value = self.data.get(key)
        return value if isinstance(value, dict) else {}

    def compile(self) -> Deployment | None:
        config = self.config()
        if config is None:
            return None
        deployment = Deployment(BeanQueue(config))
        self.scan(deployment)
        self.policies = PolicyCompiler(self.section("retry_policies"), self.problem)
        self.policies.compile_all()
        self.processors(deployment)
        self.channels(deployment)
        self.schedules(deployment)
        self.workflows(deployment)
        self.retention(deployment)
        serving = self.section("metrics")
        if isinstance(serving.get("port"), int):
            deployment.metrics = (str(serving.get("host", "127.0.0.1")), serving["port"])
        if isinstance(self.data.get("dashboard"), dict):
            deployment.dashboard = self.dashboard(self.section("dashboard"))
        return deployment

    def dashboard(self, given: dict[str, Any]) -> DashboardSettings:
        settings = DashboardSettings(
            host=given.get("host", "127.0.0.1"),
            port=given.get("port", 8787),
            read_only=given.get("read_only", False),
            token=given.get("token") or self.env.get(TOKEN_ENV) or None,
        )
        try:
            settings.check()
        except BeanflowError as error:
            self.problem(("dashboard", "host") if "host" in given else ("dashboard",), str(error))
        return settings

    def settings(self, values: dict[str, tuple[Path_, Any]]) -> dict[str, Any] | None:
        """Config fields → their values parsed (``values``: field → (path, raw value)); None,
        with a problem at the path of each bad value, if any is bad."""
        parsed, bad = {}, False
        for field, (path, value) in values.items():
            try:
                parsed[field] = parse_setting(field, value)
            except ValueError as error:
                self.problem(path, str(error))
                bad = True
        return None if bad else parsed

    def config(self) -> Config | None:
        values: dict[str, tuple[Path_, Any]] = {}
        database = self.data.get("database")
        if database is not None and not (isinstance(database, str) and not database.strip()):
            values["DATABASE_URL"] = (("database",), database)  # empty: the embedded server
        if "packages" in self.data:
            values["PROCESSOR_PACKAGES"] = (("packages",), self.data["packages"])
        # the embedded server's folder is the file's, not the current directory's: every
        # command given this file finds the same server
        folder = Path(self.document.file).resolve().parent
        embedded = self.data.get("embedded_dir")
        if isinstance(embedded, str) and embedded.strip():
            values["EMBEDDED_DIR"] = (("embedded_dir",), str(folder / embedded))
        elif "embedded_dir" in self.data:
            values["EMBEDDED_DIR"] = (("embedded_dir",), embedded)
        elif ENV_PREFIX + "EMBEDDED_DIR" not in self.env:
            values["EMBEDDED_DIR"] = ((), str(folder / ".beanflow"))
        for key, value in self.section("worker").items():
            if key in _WORKER_SETTINGS:
                values[_WORKER_SETTINGS[key]] = (("worker", key), value)
        settings = self.settings(values)
        if settings is None:
            return None
        try:
            return Config(env=self.env, **settings)
        except HeartbeatsTooClose as error:
            worker = self.section("worker")
            path = ("worker", "heartbeat_timeout") if "heartbeat_timeout" in worker else ()
            self.problem(path, str(error))
        except ConfigError as error:  # a BEANFLOW_* variable: the message names it
            self.problem((), str(error))
        return None

    def scan(self, deployment: Deployment) -> None:
        app = deployment.app
        for index, package in enumerate(app.config.PROCESSOR_PACKAGES):
            try:
                app.registry.scan([package])
            except KeyboardInterrupt:
                raise
            except BaseException as error:  # noqa: BLE001 - any failure of the user's import
                self.problem(
                    ("packages", index),
                    f"cannot import {package!r}: {type(error).__name__}: {error}",
                )
        if set(app.config.PROCESSOR_PACKAGES) <= app.registry.scanned:
            for processor in app.load_processors().processors.values():
                deployment.processors.setdefault(processor.name, processor)

    def processors(self, deployment: Deployment) -> None:
        app = deployment.app
        for name, spec in self.section("processors").items():
            if not isinstance(spec, dict) or not isinstance(spec.get("function"), str):
                continue
            path: Path_ = ("processors", name)
            policy = exceptions = None
            if "retry_policy" in spec:
                compiled = self.policies.policy(spec["retry_policy"], (*path, "retry_policy"))
                if compiled is not None:
                    policy, exceptions = compiled[0], compiled[1] or None
            function = self.function(spec["function"], (*path, "function"))
            channel = self.channel(spec.get("channel"), (*path, "channel"))
            timeout = self.timeout(spec, (*path, "timeout"))
            if function is None or channel is None or timeout is _BAD:
                continue
            processor = Processor(
                function,
                channel,
                retry_policy=policy,
                retry_exceptions=exceptions,
                auto_complete=spec.get("auto_complete", True) is not False,
                timeout=timeout,
                task_model=app.task_model,
            )
            other = deployment.processors.get(name)
            if other is not None and other.func is not processor.func:
                self.problem(
                    path,
                    f"the name {name!r} is also the processor "
                    f"{other.module}:{other.name} found in packages",
                )
                continue
            key = (processor.channel, processor.module, processor.name)
            if key in self.declared:
                self.problem(
                    path,
                    f"{spec['function']} on channel {processor.channel!r} is "
                    f"already declared as {self.declared[key]!r}",
                )
                continue
            self.declared[key] = name
            app.registry.processors[key] = processor
            deployment.processors[name] = processor

    def function(self, written: str, path: Path_) -> Any:
        """The function an import path names, or None (and a problem at ``path``)."""
        try:
            function = import_object(written)
        except ImportError as error:
            self.problem(path, str(error))
            return None
        if isinstance(function, Processor):
            function = function.func
        if inspect.isclass(function):
            self.problem(path, f"{written!r} is a class; a processor is a function")
            return None
        if not callable(function):
            self.problem(path, f"{written!r} is not callable")
            return None
        why_not = why_not_a_processor(function)
        if why_not is not None:
            self.problem(path, why_not)
            return None
        return function

    def timeout(self, spec: dict[str, Any], path: Path_) -> Any:
        """A processor's timeout in seconds (None: none), or _BAD (and a problem)."""
        if "timeout" not in spec:
            return None
        try:
            return duration()(spec["timeout"])
        except ValueError as error:
            self.problem(path, str(error))
            return _BAD

    def channel(self, name: Any, path: Path_) -> str | None:
        """A channel name, or None (and a problem at ``path``, unless the schema's)."""
        if not isinstance(name, str):
            return None  # the schema has reported it
        try:
            return check_channel(name)
        except ValueError as error:
            self.problem(path, str(error))
            return None

    def declared_processors(self) -> dict[str, str]:
        """Declared processor names → their channel, including those that failed to compile
        (so that what refers to them is not reported again)."""
        return {
            name: spec["channel"]
            for name, spec in self.section("processors").items()
            if isinstance(spec, dict) and isinstance(spec.get("channel"), str)
        }

    def channels(self, deployment: Deployment) -> None:
        registered = deployment.app.registry.channels()
        served = registered | set(self.declared_processors().values())
        for channel, spec in self.section("channels").items():
            if not isinstance(spec, dict):
                continue
            path: Path_ = ("channels", channel)
            if self.channel(channel, path) is None:
                continue
            if channel not in served:
                self.problem(
                    path,
                    f"no processor runs on channel {channel!r}"
                    f"; processors' channels: {', '.join(sorted(served)) or 'none'}",
                )
            settings = self.settings(
                {f: ((*path, k), spec[k]) for k, f in _CHANNEL_SETTINGS.items() if k in spec}
            )
            if settings is not None:
                options = {k: settings[f] for k, f in _CHANNEL_SETTINGS.items() if k in spec}
                deployment.channels.append(ChannelPlan(channel, spec.get("workers", 1), **options))
        planned = {plan.channel for plan in deployment.channels}
        deployment.channels.extend(ChannelPlan(c) for c in sorted(registered - planned))

    def schedules(self, deployment: Deployment) -> None:
        names = deployment.processors
        for name, spec in self.section("schedules").items():
            if not isinstance(spec, dict):
                continue
            path: Path_ = ("schedules", name)
            processor = names.get(str(spec.get("processor")))
            known = set(names) | set(self.declared_processors())
            if str(spec.get("processor")) not in known:
                declared = ", ".join(sorted(known)) or "none"
                self.problem(
                    (*path, "processor"),
                    f"no processor named {spec.get('processor')!r}; declared: {declared}",
                )
            cron = str(spec.get("cron", ""))
            if not croniter.is_valid(cron):
                self.problem((*path, "cron"), f"{cron!r} is not a valid cron expression")
            timezone = str(spec.get("timezone", "UTC"))
            try:
                ZoneInfo(timezone)
            except (ZoneInfoNotFoundError, ValueError):
                self.problem((*path, "timezone"), f"unknown timezone {timezone!r}")
            kwargs = spec.get("kwargs", {})
            if processor is not None:
                try:
                    processor.check_kwargs(kwargs)
                except ValueError as error:
                    self.problem((*path, "kwargs"), str(error))
            if processor is not None and croniter.is_valid(cron):
                deployment.schedules.append(
                    Schedule(name, processor, cron, timezone, kwargs, spec.get("catch_up", 1))
                )

    def workflows(self, deployment: Deployment) -> None:
        compiler = WorkflowCompiler(
            self.section("workflows"), deployment, self.policies, self.timeout, self.problem, _BAD
        )
        compiled = compiler.compile_all()
        if compiled and not hasattr(deployment.app.task_model, "workflow_run_id"):
            self.problem(
                ("workflows",),
                f"the task model {deployment.app.task_model.__name__} cannot hold workflow "
                "steps: add beanflow.TaskModelRefWorkflowMixin to it",
            )
        elif compiled:
            deployment.workflows = Workflows(deployment.app, compiled)
            deployment.app.task_end_hooks.append(deployment.workflows)

    def retention(self, deployment: Deployment) -> None:
        kept = {}
        for key, value in self.section("retention").items():
            if key in RETENTION_KEYS:
                try:
                    kept[key] = None if value is None else timedelta(seconds=parse_duration(value))
                except ValueError as error:
                    self.problem(("retention", key), str(error))
        deployment.retention = dataclasses.replace(deployment.retention, **kept)
        shortest = deployment.retention.shortest_for_tasks()
        now = datetime.now(timezone.utc)
        for schedule in deployment.schedules:
            if shortest is None or schedule.catch_up < 1:
                continue
            reach = now - schedule.recent_ticks(now, schedule.catch_up)[0]
            if reach >= shortest:
                self.problem(
                    ("schedules", schedule.name, "catch_up"),
                    f"catch_up {schedule.catch_up} reaches back {reach} in ticks, as long as "
                    f"the shortest retention of finished tasks ({shortest}): make it smaller, or "
                    "keep finished tasks longer",
                )


RETENTION_KEYS = ("done", "failed", "cancelled", "events", "workers", "every")


def compile_document(
    document: Document, env: Mapping[str, str] | None = None
) -> tuple[Deployment | None, list[Problem]]:
    """Build the deployment a document declares; also returns every problem found."""
    compiler = _Compiler(document, os.environ if env is None else env)
    deployment = compiler.compile()
    return deployment, sorted(set(compiler.problems))


def describe(deployment: Deployment, file: str) -> str:
    """One paragraph saying what a valid file declares."""
    config = deployment.app.config
    names = sorted(deployment.processors)
    channels = "; ".join(
        f"{plan.channel} ({plan.workers} worker{'s' if plan.workers != 1 else ''}, batch "
        f"{plan.batch_size or config.BATCH_SIZE})"
        for plan in deployment.channels
    )
    schedules = ", ".join(f"{s.name} ({s.cron} {s.timezone})" for s in deployment.schedules)
    definitions = deployment.workflows.definitions if deployment.workflows else {}
    flows = [f"{name} ({len(w.steps)} steps)" for name, w in definitions.items()]
    database = (
        "the embedded PostgreSQL"
        if config.DATABASE_URL is None
        else make_url(config.DATABASE_URL).render_as_string(hide_password=True)
    )
    return (
        f"{file} is valid. It declares {len(names)} processor(s) ({', '.join(names) or 'none'})"
        f" on {len(deployment.channels)} channel(s): {channels or 'none'}; "
        f"{len(deployment.schedules)} schedule(s){': ' + schedules if schedules else ''}; "
        f"{len(flows)} workflow(s){': ' + ', '.join(flows) if flows else ''}; "
        f"database: {database}."
    )

"""Configuration: defaults, ``BEANFLOW_*`` environment variables, validation."""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
from collections.abc import Mapping
from typing import Any

ENV_PREFIX = "BEANFLOW_"


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the setting."""


@dataclasses.dataclass
class Config:
    """beanflow settings.

    Every field can be passed as a keyword argument; a field not passed is read from the
    environment variable ``BEANFLOW_<FIELD>`` and otherwise keeps its default.
    """

    # Python packages scanned for @processor-decorated functions.
    PROCESSOR_PACKAGES: list[str] = dataclasses.field(default_factory=list)
    # SQLAlchemy/libpq URL; None starts (or reuses) the embedded server in EMBEDDED_DIR.
    DATABASE_URL: str | None = None
    EMBEDDED_DIR: str = ".beanflow"
    # Tasks claimed per statement; N > 1 runs them in one transaction (group commit).
    BATCH_SIZE: int = 1
    # A batch transaction commits early once it has been open this many seconds.
    BATCH_WINDOW: float = 1.0
    # Longest an idle worker sleeps before it looks for due tasks without a notify.
    POLL_TIMEOUT: float = 60.0
    WORKER_HEARTBEAT_PERIOD: float = 30.0
    WORKER_HEARTBEAT_TIMEOUT: float = 100.0
    # How long a stopping worker lets its running task finish before returning it.
    SHUTDOWN_GRACE_PERIOD: float = 30.0
    # A task whose worker died this many times while holding it is failed, not re-queued.
    MAX_WORKER_CRASHES: int = 3
    # Write one Event row per task state transition.
    EVENTS: bool = True
    TASK_MODEL: str = "beanflow.models.Task"
    WORKER_MODEL: str = "beanflow.models.Worker"
    EVENT_MODEL: str = "beanflow.models.Event"

    def __init__(self, env: Mapping[str, str] | None = None, **values: Any) -> None:
        env = os.environ if env is None else env
        names = {field.name for field in dataclasses.fields(self)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ConfigError(f"unknown setting(s): {', '.join(unknown)}")
        for field in dataclasses.fields(self):
            if field.name in values:
                value = _check(field.name, field.type, values[field.name], field.name)
            elif ENV_PREFIX + field.name in env:
                variable = ENV_PREFIX + field.name
                value = _check(field.name, field.type, _parse(env[variable], variable), variable)
            elif field.default_factory is not dataclasses.MISSING:
                value = field.default_factory()
            else:
                value = field.default
            setattr(self, field.name, value)


_POSITIVE = {
    "BATCH_SIZE",
    "POLL_TIMEOUT",
    "WORKER_HEARTBEAT_PERIOD",
    "WORKER_HEARTBEAT_TIMEOUT",
    "MAX_WORKER_CRASHES",
}


def _parse(raw: str, variable: str) -> Any:
    """Environment values are JSON where they parse as JSON, else plain strings."""
    try:
        return json.loads(raw)
    except ValueError:
        if raw.lstrip().startswith(("[", "{")):
            raise ConfigError(f"{variable}: not valid JSON: {raw!r}") from None
        return raw


def _check(name: str, annotation: str, value: Any, source: str) -> Any:
    kind = annotation.replace(" | None", "")
    if value is None and "None" in annotation:
        return None
    if kind == "list[str]":
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{source}: expected a list of strings, got {value!r}")
        return list(value)
    if kind == "bool":
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: expected true or false, got {value!r}")
        return value
    if kind in ("int", "float"):
        number_type = int if kind == "int" else (int, float)
        if isinstance(value, bool) or not isinstance(value, number_type):
            expected = "an integer" if kind == "int" else "a number"
            raise ConfigError(f"{source}: expected {expected}, got {value!r}")
        if value < 0 or (name in _POSITIVE and value == 0):
            raise ConfigError(
                f"{source}: must be {'> 0' if name in _POSITIVE else '>= 0'}, got {value!r}"
            )
        return value
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{source}: expected a non-empty string, got {value!r}")
    return value


def import_object(path: str) -> Any:
    """The object at ``package.module:attribute`` (or ``package.module.attribute``); raises
    ImportError saying why not."""
    if ":" not in path:
        path = ":".join(path.rsplit(".", 1))
    module_name, _, attribute = path.partition(":")
    try:
        value: Any = importlib.import_module(module_name)
    except ImportError as error:
        raise ImportError(f"cannot import {module_name!r}: {error}") from None
    except Exception as error:  # noqa: BLE001 - the user's module failed while importing
        message = f"importing {module_name!r} failed: {type(error).__name__}: {error}"
        raise ImportError(message) from None
    for part in attribute.split("."):
        if not hasattr(value, part):
            raise ImportError(f"{module_name!r} has no attribute {attribute!r}")
        value = getattr(value, part)
    return value

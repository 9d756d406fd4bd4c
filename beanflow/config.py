"""Configuration: defaults, ``BEANFLOW_*`` environment variables, and one parser per setting.

Every value goes through its field's parser, whichever way it arrives: a ``Config(...)``
keyword, a ``BEANFLOW_*`` variable, or a key of beanflow.yaml (``Config.parse``). So each
setting has one syntax and one set of bounds everywhere.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import os
import re
from collections.abc import Callable, Mapping
from typing import Any

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from .errors import ConfigError
from .models.jsonb import parse_json

ENV_PREFIX = "BEANFLOW_"

Parser = Callable[[Any], Any]

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*(ms|s|m|h|d)?\s*$")
DURATION_HELP = "a duration such as 250ms, 30s, 5m, 1h or 1d (a bare number is seconds)"
LONGEST_DURATION = 100 * 365 * 86400.0


class HeartbeatsTooClose(ConfigError):
    """WORKER_HEARTBEAT_TIMEOUT is not longer than WORKER_HEARTBEAT_PERIOD."""


class DurationTooLong(ValueError):
    """A duration longer than LONGEST_DURATION."""


def parse_duration(value: Any) -> float:
    """Seconds in ``"250ms"``, ``"30s"``, ``"5m"``, ``"1h"``, ``"1d"``, or a number of seconds
    (also as text); raises ValueError for anything else, NaN and infinity included, and for
    more than 100 years (a time that far from now is out of reach of Python's datetime, if
    not of PostgreSQL's)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise ValueError(f"{value!r} is not {DURATION_HELP}")
        seconds = float(value)
    else:
        match = _DURATION.match(value) if isinstance(value, str) else None
        if not match:
            raise ValueError(f"{json.dumps(value, default=repr)} is not {DURATION_HELP}")
        seconds = float(match.group(1)) * _UNITS[match.group(2) or "s"]
    if seconds > LONGEST_DURATION:
        raise DurationTooLong(f"{json.dumps(value, default=repr)} is longer than 100 years")
    return seconds


def _bounded(number: float, positive: bool, shown: Any) -> None:
    if number < 0 or (positive and number == 0):
        raise ValueError(f"must be {'> 0' if positive else '>= 0'}, got {shown!r}")


def integer(*, positive: bool = True) -> Parser:
    def parse(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"expected an integer, got {value!r}")
        _bounded(value, positive, value)
        return value

    return parse


def duration(*, positive: bool = True) -> Parser:
    def parse(value: Any) -> float:
        seconds = parse_duration(value)
        _bounded(seconds, positive, value)
        return seconds

    return parse


def boolean(value: Any) -> bool:
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.lower() in ("true", "1", "yes")
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {value!r}")
    return value


def text(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"expected a non-empty string, got {value!r}")
    return value


def strings(value: Any) -> list[str]:
    if isinstance(value, str):
        value = [part.strip() for part in value.split(",") if part.strip()]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"expected a list of strings, got {value!r}")
    return list(value)


def database_url(value: Any) -> str | None:
    """A PostgreSQL URL, or None (the embedded server)."""
    if value is None:
        return None
    text(value)
    try:
        url = make_url(value.strip())
    except ArgumentError:
        raise ValueError(
            f"{value!r} is not a database URL such as postgresql://user@host:5432/name"
        ) from None
    if url.get_backend_name() not in ("postgresql", "postgres"):
        raise ValueError(
            f"beanflow needs PostgreSQL; {url.drivername!r} URLs are not supported "
            f"({url.render_as_string(hide_password=True)})"
        )
    return value.strip()


def _setting(default: Any, parse: Parser) -> Any:
    factory = (lambda: list(default)) if isinstance(default, list) else None
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata={"parse": parse})
    return dataclasses.field(default=default, metadata={"parse": parse})


@dataclasses.dataclass(init=False)
class Config:
    """beanflow settings.

    Every field can be passed as a keyword argument; a field not passed is read from the
    environment variable ``BEANFLOW_<FIELD>`` and otherwise keeps its default. Durations are
    seconds, or text such as ``"30s"`` or ``"5m"``.
    """

    # Python packages scanned for @processor-decorated functions.
    PROCESSOR_PACKAGES: list[str] = _setting([], strings)
    # SQLAlchemy/libpq URL; None starts (or reuses) the embedded server in EMBEDDED_DIR.
    DATABASE_URL: str | None = _setting(None, database_url)
    EMBEDDED_DIR: str = _setting(".beanflow", text)
    # The most tasks claimed, run and committed together (group commit); 1: a transaction per
    # task. A worker claims as many as its recent tasks say fit in BATCH_WINDOW.
    BATCH_SIZE: int = _setting(100, integer())
    # How long a batch may run: past it, the batch commits what finished and gives the rest
    # of its tasks back to the queue. A crash re-runs at most this much work.
    BATCH_WINDOW: float = _setting(0.1, duration(positive=False))
    # Longest an idle worker sleeps before it looks for due tasks without a notify.
    POLL_TIMEOUT: float = _setting(60.0, duration())
    WORKER_HEARTBEAT_PERIOD: float = _setting(30.0, duration())
    # Silence after which a worker is found dead; longer than the period.
    WORKER_HEARTBEAT_TIMEOUT: float = _setting(100.0, duration())
    # How long a stopping worker lets its running task finish before returning it.
    SHUTDOWN_GRACE_PERIOD: float = _setting(30.0, duration(positive=False))
    # A task whose worker died this many times while holding it is failed, not re-queued.
    MAX_WORKER_CRASHES: int = _setting(3, integer())
    # Write one Event row per task state transition.
    EVENTS: bool = _setting(True, boolean)
    TASK_MODEL: str = _setting("beanflow.models.Task", text)
    WORKER_MODEL: str = _setting("beanflow.models.Worker", text)
    EVENT_MODEL: str = _setting("beanflow.models.Event", text)

    def __init__(self, env: Mapping[str, str] | None = None, **values: Any) -> None:
        env = os.environ if env is None else env
        unknown = sorted(set(values) - set(FIELDS))
        if unknown:
            raise ConfigError(f"unknown setting(s): {', '.join(unknown)}")
        for name, field in FIELDS.items():
            variable = ENV_PREFIX + name
            if name in values:
                value = self.parse(name, values[name], name)
            elif variable in env:
                value = self.parse(name, _from_environment(env[variable], variable), variable)
            elif field.default_factory is not dataclasses.MISSING:
                value = field.default_factory()
            else:
                value = field.default
            setattr(self, name, value)
        if self.WORKER_HEARTBEAT_TIMEOUT <= self.WORKER_HEARTBEAT_PERIOD:
            raise HeartbeatsTooClose(
                f"WORKER_HEARTBEAT_TIMEOUT ({self.WORKER_HEARTBEAT_TIMEOUT:g}s) must be longer "
                f"than WORKER_HEARTBEAT_PERIOD ({self.WORKER_HEARTBEAT_PERIOD:g}s), or live "
                "workers would find each other dead"
            )

    @staticmethod
    def parse(name: str, value: Any, source: str) -> Any:
        """``value`` for the field ``name``, parsed and bounds-checked; raises ConfigError
        naming ``source`` (a field, a variable, or a key of a file)."""
        try:
            return parse_setting(name, value)
        except ValueError as error:
            raise ConfigError(f"{source}: {error}") from None


def parse_setting(name: str, value: Any) -> Any:
    """``value`` for the field ``name``, parsed and bounds-checked; raises ValueError saying
    what is wrong with the value (the caller says where it came from)."""
    return FIELDS[name].metadata["parse"](value)


FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(Config)}


def _from_environment(raw: str, variable: str) -> Any:
    """Environment values are JSON where they parse as JSON, else plain strings."""
    try:
        return parse_json(raw)
    except ValueError:
        if raw.lstrip().startswith(("[", "{")):
            raise ConfigError(f"{variable}: not valid JSON: {raw!r}") from None
        return raw


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
    except KeyboardInterrupt:
        raise
    except BaseException as error:  # noqa: BLE001 - the user's module failed (sys.exit() too)
        message = f"importing {module_name!r} failed: {type(error).__name__}: {error}"
        raise ImportError(message) from None
    for part in attribute.split("."):
        if not hasattr(value, part):
            raise ImportError(f"{module_name!r} has no attribute {attribute!r}")
        value = getattr(value, part)
    return value

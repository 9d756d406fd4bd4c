"""Retry policies of beanflow.yaml → the engine's policies, named or written inline."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

from ..config import DurationTooLong, import_object, parse_duration
from ..processors.retry import DelayRetry, ExponentialBackoffRetry, LimitAttempt, RetryPolicy
from .load import Path_

Compiled = tuple[RetryPolicy, tuple[type[BaseException], ...]]


class PolicyCompiler:
    """Compiles the ``retry_policies`` section (``declared``) once each, and inline policies;
    reports each mistake with ``problem(path, message)``: unknown names, cycles, exception
    classes that do not exist."""

    def __init__(self, declared: dict[str, Any], problem: Callable[[Path_, str], None]) -> None:
        self.declared = declared
        self.problem = problem
        self.compiled: dict[str, Compiled | None] = {}

    def compile_all(self) -> None:
        for name in self.declared:
            self.named_policy(name, ())

    def named_policy(self, name: str, chain: tuple[str, ...]) -> Compiled | None:
        if name in chain:
            cycle = " → ".join((*chain[chain.index(name) :], name))
            self.problem(
                ("retry_policies", chain[-1]),
                f"retry policies refer to each other in a cycle: {cycle}",
            )
            return None
        if name not in self.compiled:
            spec = self.declared[name]
            self.compiled[name] = self.policy(spec, ("retry_policies", name), (*chain, name))
        return self.compiled[name]

    def duration(self, value: Any, path: Path_) -> timedelta | None:
        """``value`` as a duration; None when it is none (reported, unless the schema has:
        it checks the syntax, not the length)."""
        try:
            return timedelta(seconds=parse_duration(value))
        except DurationTooLong as error:
            self.problem(path, str(error))
        except ValueError:
            pass
        return None

    def policy(self, spec: Any, path: Path_, chain: tuple[str, ...] = ()) -> Compiled | None:
        """A policy written inline or named; None when it has problems (already reported)."""
        if isinstance(spec, str):
            if spec not in self.declared:
                declared = ", ".join(self.declared) or "none"
                self.problem(path, f"no retry policy named {spec!r}; declared: {declared}")
                return None
            return self.named_policy(spec, chain)
        if not isinstance(spec, dict):
            return None
        exceptions = self.exceptions(spec.get("exceptions"), (*path, "exceptions"))
        try:
            kind = spec.get("kind")
            if kind == "delay":
                delay = self.duration(spec["delay"], (*path, "delay"))
                return None if delay is None else (DelayRetry(delay), exceptions)
            if kind == "exponential":
                max_delay = self.duration(spec.get("max_delay", "1h"), (*path, "max_delay"))
                if max_delay is None:
                    return None
                return ExponentialBackoffRetry(
                    base=spec.get("base", 2.0),
                    exponent_offset=spec.get("exponent_offset", 0.0),
                    exponent_scalar=spec.get("exponent_scalar", 1.0),
                    max_delay=max_delay,
                    jitter=spec.get("jitter", 0.0),
                ), exceptions
            if kind == "limit":
                inner = self.policy(spec.get("retry_policy"), (*path, "retry_policy"), chain)
                if inner is None:
                    return None
                return LimitAttempt(spec["maximum_attempt"], inner[0]), exceptions or inner[1]
        except (KeyError, TypeError, ValueError):
            pass  # the schema has reported the shape
        return None

    def exceptions(self, paths: Any, where: Path_) -> tuple[type[BaseException], ...]:
        found = []
        for index, path in enumerate(paths if isinstance(paths, list) else []):
            try:
                value = import_object(str(path))
            except ImportError as error:
                self.problem((*where, index), str(error))
                continue
            if isinstance(value, type) and issubclass(value, BaseException):
                found.append(value)
            else:
                self.problem((*where, index), f"{path!r} is not an exception class")
        return tuple(found)

"""ProcessorRegistry and the ``@processor`` decorator.

A worker runs only what its registry holds. Rows name a (channel, module, name); the registry
answers from what was registered or scanned, and never imports a module a row names.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterable
from typing import Any

from .processor import ExceptionTypes, Processor
from .retry import RetryPolicy


class ProcessorRegistry:
    """Processors by (channel, module, name)."""

    def __init__(self) -> None:
        self.processors: dict[tuple[str, str, str], Processor] = {}
        self.scanned: set[str] = set()

    def add(self, processor: Processor) -> Processor:
        key = (processor.channel, processor.module, processor.name)
        existing = self.processors.get(key)
        if existing is not None and existing.func is not processor.func:
            raise ValueError(f"two processors registered as {key}")
        self.processors[key] = processor
        return processor

    def get(self, channel: str, module: str, name: str) -> Processor | None:
        return self.processors.get((channel, module, name))

    def find(self, channel: str, name: str) -> list[Processor]:
        """Processors of ``channel`` called ``name`` (a function name or ``module:name``)."""
        module, _, function = name.rpartition(":")
        return [
            p
            for (c, m, n), p in self.processors.items()
            if c == channel and n == function and module in ("", m)
        ]

    def channels(self) -> set[str]:
        return {channel for channel, _, _ in self.processors}

    def scan(self, packages: Iterable[str]) -> None:
        """Import each package and its submodules; register every processor defined there.
        A package is scanned once: scanning it again changes nothing."""
        for package_name in packages:
            if package_name in self.scanned:
                continue
            package = importlib.import_module(package_name)
            modules = [package]
            if hasattr(package, "__path__"):
                for info in pkgutil.walk_packages(package.__path__, package_name + "."):
                    modules.append(importlib.import_module(info.name))
            for module in modules:
                for value in vars(module).values():
                    if isinstance(value, Processor) and value.module == module.__name__:
                        self.add(value)
            self.scanned.add(package_name)


def processor(
    channel: str,
    *,
    retry_policy: RetryPolicy | None = None,
    retry_exceptions: ExceptionTypes | None = None,
    auto_complete: bool = True,
    timeout: float | None = None,
    task_model: type | None = None,
    registry: ProcessorRegistry | None = None,
) -> Callable[[Callable[..., Any]], Processor]:
    """Declare a function as the processor of ``channel``'s tasks.

    Found by ``ProcessorRegistry.scan`` (``PROCESSOR_PACKAGES``), or added to ``registry``.
    """

    def decorate(func: Callable[..., Any]) -> Processor:
        made = Processor(
            func,
            channel,
            retry_policy=retry_policy,
            retry_exceptions=retry_exceptions,
            auto_complete=auto_complete,
            timeout=timeout,
            task_model=task_model,
        )
        if registry is not None:
            registry.add(made)
        return made

    return decorate

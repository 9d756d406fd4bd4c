"""The declarative layer: beanflow.yaml → a compiled BeanQueue."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from ..app import BeanQueue
from .compile import compile_document, describe
from .load import Problem
from .load import load as load_document
from .validate import validate

__all__ = ["Problem", "SpecError", "check", "describe", "load", "load_document"]


class SpecError(ValueError):
    """A spec file has problems; ``problems`` lists them, each located."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("\n".join(map(str, problems)))


def check(path: str | os.PathLike[str]) -> tuple[BeanQueue | None, list[Problem]]:
    """Load, validate and compile a spec file; every problem found, in file order. The
    file's folder is added to ``sys.path``, so processors may live beside it."""
    # processors may live beside the file, as in the examples
    folder = str(Path(path).resolve().parent)
    if folder not in sys.path:
        sys.path.append(folder)
    document, problems = load_document(path)
    if document is None:
        return None, problems
    problems += validate(document)
    app, compile_problems = compile_document(document)
    problems = sorted(set(problems + compile_problems), key=lambda p: (p.line, p.column, p.path))
    return (app if not problems else None), problems


def load(path: str | os.PathLike[str] = "beanflow.yaml") -> BeanQueue:
    """The application declared by a beanflow.yaml; raises SpecError listing its problems.

    The loaded application becomes the default through which ``beanflow.enqueue(session,
    "name", …)`` resolves processor names.
    """
    app, problems = check(Path(path))
    if app is None:
        raise SpecError(problems)
    BeanQueue.default = app
    return app

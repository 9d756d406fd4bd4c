"""The declarative layer: beanflow.yaml → a compiled Deployment."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from ..deployment import Deployment, set_default
from ..errors import SpecError
from .compile import compile_document, describe
from .load import Document, Problem
from .load import load as load_document
from .validate import validate

__all__ = ["Problem", "SpecError", "check", "describe", "load", "load_document"]


def check(path: str | os.PathLike[str]) -> tuple[Deployment | None, list[Problem]]:
    """Load, validate and compile a spec file; every problem found, in file order. The
    file's folder is added to ``sys.path``, so processors may live beside it."""
    folder = str(Path(path).resolve().parent)
    if folder not in sys.path:
        sys.path.append(folder)
    document, problems = load_document(path)
    if document is None:
        return None, problems
    problems += validate(document)
    deployment, compile_problems = compile_document(document)
    problems = sorted(set(problems + compile_problems), key=lambda p: (p.line, p.column, p.path))
    if deployment is not None:
        problems += _left_out(document, deployment, problems)
    if deployment is None or problems:
        return None, problems
    deployment.path = Path(path)
    return deployment, problems


def load(path: str | os.PathLike[str] = "beanflow.yaml", *, default: bool = True) -> Deployment:
    """The deployment a beanflow.yaml declares; raises SpecError listing its problems.

    Unless ``default=False``, it becomes the default deployment, through which
    ``beanflow.enqueue(session, "name", …)`` resolves the processor names the file declares.
    """
    deployment, problems = check(Path(path))
    if deployment is None:
        raise SpecError(problems)
    if default:
        set_default(deployment)
    return deployment


def _left_out(document: Document, deployment: Deployment, problems: list[Problem]) -> list[Problem]:
    """A problem for each processor or schedule declared but not compiled, unless a problem
    already says why: nothing declared is ever dropped in silence."""
    reported = {p.path for p in problems}
    compiled = {
        "processors": set(deployment.processors),
        "schedules": {schedule.name for schedule in deployment.schedules},
    }
    left_out = []
    for section, names in compiled.items():
        declared = document.data.get(section)
        for name in declared if isinstance(declared, dict) else {}:
            where = f"{section}.{name}"
            if name not in names and not any(
                path == where or path.startswith((f"{where}.", f"{where}[")) for path in reported
            ):
                left_out.append(document.problem((section, name), "could not be compiled"))
    return left_out

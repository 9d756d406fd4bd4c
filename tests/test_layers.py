"""The one-way dependency rule (ARCHITECTURE.md): each layer imports only layers below it.

Checked on the source, imports made only for type checking included: a type-only import is
still a dependency of the reader's mind, and it hid engine → app before.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "beanflow"

# module (or package) → layer; the longest matching prefix wins
LAYER = {
    "errors": 0,
    "engine.queries": 0,  # pure SQL builders: they import nothing of beanflow
    "models": 1,
    "config": 2,
    "embedded": 2,
    "db": 3,
    "processors": 3,
    "engine": 4,
    "app": 5,
    "ops": 6,
    "workflows": 7,
    "metrics": 8,
    "dashboard": 8,
    "deployment": 9,
    "spec": 10,
    "cli": 11,
    "__init__": 12,
    "__main__": 12,
}


def layer_of(module: str) -> tuple[str, int]:
    """The layer ``module`` belongs to, by the longest matching prefix."""
    parts = module.split(".")
    for size in range(len(parts), 0, -1):
        prefix = ".".join(parts[:size])
        if prefix in LAYER:
            return prefix, LAYER[prefix]
    raise KeyError(f"{module} is in no layer: add it to LAYER")


def imports(path: Path, source: str | None = None) -> set[str]:
    """Every beanflow module imported by ``path`` (or by ``source`` as if it were there),
    type-checking imports included."""
    package = ".".join(path.relative_to(PACKAGE).with_suffix("").parts[:-1])
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text() if source is None else source)):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.split(".") if package else []
            base = base[: len(base) - (node.level - 1)]
            target = ".".join([*base, *(node.module.split(".") if node.module else [])])
            if node.module:
                found.add(target)
            else:  # from . import db, spec
                found.update(".".join(filter(None, [target, a.name])) for a in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("beanflow."):
            found.add(node.module.removeprefix("beanflow."))
        elif isinstance(node, ast.Import):
            found.update(
                a.name.removeprefix("beanflow.")
                for a in node.names
                if a.name.startswith("beanflow.")
            )
    return found


def dependencies() -> list[tuple[str, str]]:
    """(importer, imported) for every import between beanflow's modules."""
    pairs = []
    for path in PACKAGE.rglob("*.py"):
        module = ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        module = module.removesuffix(".__init__") or "__init__"
        pairs.extend((module, imported) for imported in imports(path))
    return pairs


def test_dependencies_point_one_way():
    wrong = []
    for module, imported in dependencies():
        (own, level), (other, other_level) = layer_of(module), layer_of(imported)
        if own != other and other_level >= level:
            wrong.append(f"{module} (layer {level}) imports {imported} (layer {other_level})")
    assert wrong == []


def test_the_engine_does_not_know_the_app_or_the_declarative_layer():
    assert [
        (module, imported)
        for module, imported in dependencies()
        if module.startswith("engine")
        and imported.split(".")[0] in ("app", "deployment", "spec", "cli")
    ] == []


def test_type_checking_imports_are_seen():
    source = (
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..app import BeanQueue\n"
    )
    assert imports(PACKAGE / "engine" / "worker.py", source) == {"app"}


def test_models_import_only_models_the_sql_and_the_errors():
    for path in (PACKAGE / "models").glob("*.py"):
        outside = {layer_of(i)[0] for i in imports(path)} - {"models", "engine.queries", "errors"}
        assert outside == set(), path

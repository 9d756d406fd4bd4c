"""The one-way dependency rule of DESIGN.md: cli → spec → app → engine → processors → models,
with config/db/embedded beneath everything but the models. Checked on the source, ignoring
imports made for type checking only."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "beanflow"

LAYER = {
    "models": 0,
    "config": 1,
    "embedded": 1,
    "db": 2,
    "processors": 2,
    "engine": 3,
    "app": 4,
    "spec": 5,
    "cli": 6,
    "__init__": 7,
    "__main__": 7,
}


def layer_of(module: str) -> int:
    return LAYER[module.split(".")[0]]


def runtime_imports(path: Path) -> set[str]:
    """beanflow modules imported by ``path`` outside ``if TYPE_CHECKING:`` blocks."""
    package = ".".join(path.relative_to(PACKAGE).with_suffix("").parts[:-1])
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING":
            return
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".") if package else []
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, *(node.module.split(".") if node.module else [])])
                names = [target] if node.module else [a.name for a in node.names]
                found.update(n for n in names if n)
            elif node.module and node.module.startswith("beanflow."):
                found.add(node.module.removeprefix("beanflow."))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return found


def test_dependencies_point_one_way():
    wrong = []
    for path in PACKAGE.rglob("*.py"):
        module = ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        for imported in runtime_imports(path):
            same_layer = imported.split(".")[0] == module.split(".")[0]
            if not same_layer and layer_of(imported) >= layer_of(module):
                wrong.append(f"{module} imports {imported}")
    assert wrong == []


def test_models_import_nothing_of_beanflow_but_models():
    for path in (PACKAGE / "models").glob("*.py"):
        assert {i.split(".")[0] for i in runtime_imports(path)} <= {"models"}, path

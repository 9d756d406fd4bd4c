"""YAML → plain data, keeping the line and column of every key and value; ${ENV} interpolation.

Errors a user can make (a missing or empty file, bad YAML, a duplicate key, an undefined
variable) are returned as located ``Problem``s, never raised.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

Path_ = tuple[str | int, ...]

_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


@dataclasses.dataclass(frozen=True, order=True)
class Problem:
    """One mistake in a spec file, where it is, and what is wrong."""

    file: str
    line: int
    column: int
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.path}: " if self.path else ""
        return f"{self.file}:{self.line}:{self.column}: {where}{self.message}"


@dataclasses.dataclass
class Document:
    """The file's data and where each piece of it was written (1-based line and column)."""

    file: str
    data: dict[str, Any]
    locations: dict[Path_, tuple[int, int]]

    def where(self, path: Path_) -> tuple[int, int]:
        """The location of ``path``, or of its nearest written ancestor."""
        path = tuple(path)
        while path not in self.locations and path:
            path = path[:-1]
        return self.locations.get(path, (1, 1))

    def problem(self, path: Path_, message: str) -> Problem:
        line, column = self.where(path)
        return Problem(self.file, line, column, dotted(path), message)


def dotted(path: Path_) -> str:
    """``processors.resize.retry_policy`` or ``schedules.nightly.kwargs[0]``."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def load(
    path: str | os.PathLike[str], env: Mapping[str, str] | None = None
) -> tuple[Document | None, list[Problem]]:
    """Read a spec file; returns (document, []) or (None or partial document, problems)."""
    env = os.environ if env is None else env
    name = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return None, [Problem(name, 1, 1, "", "no such file")]
    except (OSError, UnicodeDecodeError) as error:
        return None, [Problem(name, 1, 1, "", f"cannot be read: {error}")]
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        line, column = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        return None, [Problem(name, line, column, "", f"invalid YAML: {error.problem}")]
    except yaml.reader.ReaderError as error:  # a character YAML does not allow
        before = text[: error.position]
        line, column = before.count("\n") + 1, len(before) - before.rfind("\n")
        return None, [
            Problem(
                name,
                line,
                column,
                "",
                f"invalid YAML: character {error.character!r} is not allowed",
            )
        ]
    if root is None:
        return None, [Problem(name, 1, 1, "", "the file is empty")]
    if not isinstance(root, yaml.MappingNode):
        return None, [
            Problem(
                name,
                root.start_mark.line + 1,
                root.start_mark.column + 1,
                "",
                "the top level must be a mapping of keys (database, processors, channels, …)",
            )
        ]
    converter = _Converter(name, env)
    data = converter.convert(root, ())
    return Document(name, data, converter.locations), converter.problems


class _Converter:
    def __init__(self, file: str, env: Mapping[str, str]) -> None:
        self.file = file
        self.env = env
        self.locations: dict[Path_, tuple[int, int]] = {}
        self.problems: list[Problem] = []
        self.loader = yaml.SafeLoader("")

    def convert(self, node: yaml.Node, path: Path_) -> Any:
        self.locations[path] = (node.start_mark.line + 1, node.start_mark.column + 1)
        if isinstance(node, yaml.MappingNode):
            result: dict[str, Any] = {}
            for key_node, value_node in node.value:
                key = self.loader.construct_object(key_node)
                if not isinstance(key, str):
                    key = str(key)
                child = (*path, key)
                if key in result:
                    self.problems.append(
                        Problem(
                            self.file,
                            key_node.start_mark.line + 1,
                            key_node.start_mark.column + 1,
                            dotted(child),
                            "duplicate key (it is already set above)",
                        )
                    )
                    continue
                result[key] = self.convert(value_node, child)
                # a mapping's entry is located at its key, where the reader looks
                self.locations[child] = (
                    key_node.start_mark.line + 1,
                    key_node.start_mark.column + 1,
                )
            return result
        if isinstance(node, yaml.SequenceNode):
            return [self.convert(item, (*path, i)) for i, item in enumerate(node.value)]
        value = self.loader.construct_object(node)
        if isinstance(value, str) and "${" in value:
            return self.interpolate(node, value, path)
        return value

    def interpolate(self, node: yaml.ScalarNode, value: str, path: Path_) -> Any:
        def substitute(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            if name in self.env:
                return self.env[name]
            if default is not None:
                return default
            line, column = self.locations[path]
            self.problems.append(
                Problem(
                    self.file,
                    line,
                    column,
                    dotted(path),
                    f"environment variable {name} is not set (write "
                    f"${{{name}:-default}} to give a default)",
                )
            )
            return ""

        result = _VARIABLE.sub(substitute, value)
        if node.style is None:  # a plain scalar: `workers: ${N:-2}` is the number 2
            try:
                return yaml.safe_load(result) if result.strip() else None
            except yaml.YAMLError:
                return result
        return result

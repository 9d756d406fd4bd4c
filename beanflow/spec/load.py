"""YAML → plain data, keeping the line and column of every key and value; ${ENV} interpolation.

Errors a user can make (a missing, empty or huge file, bytes that are not UTF-8, bad YAML, a
duplicate key, an undefined variable, a document nested too deeply, an alias bomb) are returned
as located ``Problem``s, never raised, in bounded time and memory.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from .variables import Variables

Path_ = tuple[str | int, ...]

# bounds on what a file may make the loader do: its size, nesting, and converted nodes (an
# alias repeats its anchor's nodes, so a small file could otherwise expand without end)
MAX_FILE_BYTES = 1_000_000
MAX_DEPTH = 64
MAX_NODES = 100_000
_MERGE = "tag:yaml.org,2002:merge"


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
    name = str(path)
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        return None, [Problem(name, 1, 1, "", "no such file")]
    except OSError as error:
        return None, [Problem(name, 1, 1, "", f"cannot be read: {error}")]
    if len(raw) > MAX_FILE_BYTES:
        message = f"the file is {len(raw):,} bytes; a beanflow.yaml may be {MAX_FILE_BYTES:,}"
        return None, [Problem(name, 1, 1, "", message)]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line_start = raw.rfind(b"\n", 0, error.start) + 1
        column = len(raw[line_start : error.start].decode("utf-8", "replace")) + 1
        line = raw.count(b"\n", 0, error.start) + 1
        byte = raw[error.start : error.start + 1].hex()
        return None, [Problem(name, line, column, "", f"byte 0x{byte} is not UTF-8 text")]
    variables = Variables(os.environ if env is None else env)
    try:
        root = yaml.compose(variables.protect(text), Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        line, column = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        problem = variables.original(str(error.problem))
        return None, [Problem(name, line, column, "", f"invalid YAML: {problem}")]
    except yaml.reader.ReaderError as error:  # a character YAML does not allow
        before = text[: error.position]
        line, column = before.count("\n") + 1, len(before) - before.rfind("\n")
        message = f"invalid YAML: character {error.character!r} is not allowed"
        return None, [Problem(name, line, column, "", message)]
    except RecursionError:
        return None, [Problem(name, 1, 1, "", f"nested more than {MAX_DEPTH} levels deep")]
    if root is None:
        return None, [Problem(name, 1, 1, "", "the file is empty")]
    if not isinstance(root, yaml.MappingNode):
        message = "the top level must be a mapping of keys (database, processors, channels, …)"
        return None, [_at(name, root, "", message)]
    converter = _Converter(name, variables)
    try:
        data = converter.convert(root, ())
    except _Stop as stop:
        return None, [*converter.problems, stop.problem]
    return Document(name, data, converter.locations), converter.problems


def _at(file: str, node: yaml.Node, path: str, message: str) -> Problem:
    return Problem(file, node.start_mark.line + 1, node.start_mark.column + 1, path, message)


class _Stop(Exception):
    """The document cannot be read further (too deep, too big, or containing itself)."""

    def __init__(self, problem: Problem) -> None:
        self.problem = problem


class _Converter:
    def __init__(self, file: str, variables: Variables) -> None:
        self.file = file
        self.variables = variables
        self.locations: dict[Path_, tuple[int, int]] = {}
        self.problems: list[Problem] = []
        self.loader = yaml.SafeLoader("")
        self.nodes = 0
        self.inside: set[int] = set()  # the nodes being converted, to find a self-reference

    def convert(self, node: yaml.Node, path: Path_) -> Any:
        self.nodes += 1
        where = dotted(path)
        if self.nodes > MAX_NODES:
            message = f"the document expands to more than {MAX_NODES:,} values (aliases?)"
            raise _Stop(_at(self.file, node, where, message))
        if len(path) > MAX_DEPTH:
            raise _Stop(_at(self.file, node, where, f"nested more than {MAX_DEPTH} levels deep"))
        if id(node) in self.inside:
            raise _Stop(_at(self.file, node, where, "an alias that contains itself"))
        self.locations.setdefault(path, (node.start_mark.line + 1, node.start_mark.column + 1))
        self.inside.add(id(node))
        try:
            if isinstance(node, yaml.MappingNode):
                return self.mapping(node, path)
            if isinstance(node, yaml.SequenceNode):
                return [self.convert(item, (*path, i)) for i, item in enumerate(node.value)]
            return self.scalar(node, path)
        finally:
            self.inside.discard(id(node))

    def mapping(self, node: yaml.MappingNode, path: Path_) -> dict[str, Any]:
        """Its own keys (a repeated one is a problem), then those merged in with ``<<``
        (``<<: *base`` or ``<<: [*a, *b]``) that it does not set itself."""
        result: dict[str, Any] = {}
        merged = []
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE:
                sources = (
                    value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
                )
                merged.extend(sources)
                continue
            key = self.key(key_node, path)
            child = (*path, key)
            if key in result:
                self.problems.append(
                    _at(
                        self.file,
                        key_node,
                        dotted(child),
                        "duplicate key (it is already set above)",
                    )
                )
                continue
            # a mapping's entry is located at its key, where the reader looks
            self.locations[child] = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
            result[key] = self.convert(value_node, child)
        own = {key: self.locations[(*path, key)] for key in result}
        for source in merged:
            if not isinstance(source, yaml.MappingNode):
                self.problems.append(
                    _at(
                        self.file, source, dotted(path), "<< merges mappings only (write <<: *name)"
                    )
                )
                continue
            for key, value in self.convert(source, path).items():
                result.setdefault(key, value)
        for key, location in own.items():  # a key set here is located here, not in the merge
            self.locations[(*path, key)] = location
        return result

    def key(self, node: yaml.Node, path: Path_) -> str:
        if not isinstance(node, yaml.ScalarNode):
            self.problems.append(_at(self.file, node, dotted(path), "a key must be plain text"))
            return f"<key at line {node.start_mark.line + 1}>"
        return str(self.scalar(node, path, typed=False))

    def scalar(self, node: yaml.Node, path: Path_, typed: bool = True) -> Any:
        try:
            value = self.loader.construct_object(node)
        except yaml.YAMLError as error:
            problem = getattr(error, "problem", None) or str(error)
            self.problems.append(_at(self.file, node, dotted(path), f"invalid YAML: {problem}"))
            return None
        if not (isinstance(value, str) and self.variables.present(value)):
            return value

        def unset(name: str) -> None:
            self.problems.append(
                _at(
                    self.file,
                    node,
                    dotted(path),
                    f"environment variable {name} is not set (write ${{{name}:-default}} to "
                    "give a default)",
                )
            )

        result = self.variables.substitute(value, unset)
        if typed and node.style is None and self.variables.whole(value):
            # a plain scalar that is only a variable takes its YAML type: `workers: ${N:-2}`
            try:
                return yaml.safe_load(result) if result.strip() else None
            except yaml.YAMLError:
                return result
        return result

"""JSON Schema validation of a loaded spec; every error located as file:line:col + key path."""

from __future__ import annotations

import difflib
import functools
import json
import math
from pathlib import Path
from typing import Any

import jsonschema

from .load import Document, Problem

_HERE = Path(__file__).resolve().parent
# inside the wheel (beanflow/schemas/), or in a source checkout (schemas/ beside beanflow/)
_SCHEMA_PLACES = [_HERE.parent / "schemas", _HERE.parent.parent / "schemas"]


@functools.cache
def schema() -> dict[str, Any]:
    """The JSON Schema of beanflow.yaml."""
    for folder in _SCHEMA_PLACES:
        path = folder / "beanflow.schema.json"
        if path.exists():
            return json.loads(path.read_text(encoding="utf-8"))
    raise FileNotFoundError("beanflow.schema.json is missing from the installation")


def validate(document: Document) -> list[Problem]:
    """Every place where the document breaks the schema, or holds a number that is not
    finite (NaN passes every minimum and maximum of a schema)."""
    validator = jsonschema.Draft202012Validator(schema())
    problems = [
        document.problem(path, f"{value!r} is not a number (NaN and infinity are not allowed)")
        for path, value in _non_finite(document.data, ())
    ]
    for error in validator.iter_errors(document.data):
        problems.extend(_explain(document, error))
    return sorted(set(problems))


def _non_finite(value: Any, path: tuple) -> list[tuple[tuple, float]]:
    if isinstance(value, float) and not math.isfinite(value):
        return [(path, value)]
    if isinstance(value, dict):
        return [found for k, v in value.items() for found in _non_finite(v, (*path, k))]
    if isinstance(value, list):
        return [found for i, v in enumerate(value) for found in _non_finite(v, (*path, i))]
    return []


def _explain(document: Document, error: jsonschema.ValidationError) -> list[Problem]:
    path = tuple(error.absolute_path)
    if "propertyNames" in error.relative_schema_path and isinstance(error.instance, str):
        path = (*path, error.instance)  # a bad name is located at the name itself
    if error.validator == "additionalProperties" and isinstance(error.instance, dict):
        allowed = list(error.schema.get("properties", {}))
        unexpected = [k for k in error.instance if k not in allowed]
        return [
            document.problem((*path, key), f"unknown key{_did_you_mean(key, allowed)}")
            for key in unexpected
        ]
    if error.validator in ("oneOf", "anyOf") and error.context:
        # name the alternative that came closest instead of "is not valid under any schema"
        deepest = max(error.context, key=lambda e: len(e.absolute_path))
        if len(deepest.absolute_path) > len(error.absolute_path):
            return _explain(document, deepest)
        if all(e.validator in ("type", "pattern", "minimum") for e in error.context):
            expected = error.schema.get("description", "a valid value")
            return [
                document.problem(
                    path,
                    f"{_short(error.instance)} is not {expected[0].lower()}"
                    f"{expected[1:].rstrip('.')}",
                )
            ]
    if error.validator == "if":
        return []
    if error.validator == "required":
        return [
            document.problem(path, error.message.replace("is a required property", "is required"))
        ]
    return [document.problem(path, _message(error))]


def _message(error: jsonschema.ValidationError) -> str:
    instance = _short(error.instance)
    if error.validator == "pattern":
        description = error.schema.get("description")
        return f"{instance} is not valid" + (f": expected {description}" if description else "")
    if error.validator == "enum":
        return f"{instance} is not one of {', '.join(map(str, error.validator_value))}"
    if error.validator == "type":
        return f"{instance} is not of type {error.validator_value}"
    if error.validator == "const":
        return f"{instance} must be {error.validator_value!r}"
    return error.message


def _short(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def _did_you_mean(key: str, allowed: list[str]) -> str:
    close = difflib.get_close_matches(key, allowed, n=1)
    return f" (did you mean {close[0]!r}?)" if close else f"; expected one of: {', '.join(allowed)}"

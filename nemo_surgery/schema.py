"""Validate decoded JSON documents against small declarative schemas, with one-line errors.

Every document the tool reads back (neuron sets, statistics) is checked here,
once, before any field is used: a wrong type anywhere gives one
:class:`~nemo_surgery.errors.InputError` naming the file, the field path
(``layers[2].needed_by[0]``), what was expected and how to get a valid
document. Readers then use plain indexing, never defensive ``.get`` chains.
:func:`read_json` also turns JSON that the decoder cannot handle (invalid,
not UTF-8, nested deeper than the interpreter's recursion limit) into the
same one-line error.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nemo_surgery.errors import InputError


class SchemaError(ValueError):
    """A document does not match its schema; ``where`` is the field path."""

    def __init__(self, where: str, message: str):
        super().__init__(f"{where or 'top level'}: {message}")
        self.where = where


@dataclass(frozen=True)
class Int:
    """An integer (booleans excluded), at least ``minimum`` when given."""

    minimum: int | None = None


@dataclass(frozen=True)
class Num:
    """A number (int or float, booleans excluded)."""


@dataclass(frozen=True)
class Str:
    """A string."""


@dataclass(frozen=True)
class Bool:
    """A boolean."""


@dataclass(frozen=True)
class AnyValue:
    """Anything (free-form provenance)."""


@dataclass(frozen=True)
class Nullable:
    """``null`` or the inner schema."""

    inner: Any


@dataclass(frozen=True)
class ListOf:
    """A JSON array whose items all match ``item``."""

    item: Any


@dataclass(frozen=True)
class Obj:
    """A JSON object: ``required`` and ``optional`` keys with their schemas; other keys are allowed."""

    required: dict[str, Any] = field(default_factory=dict)
    optional: dict[str, Any] = field(default_factory=dict)


_TYPE_NAMES = {Int: "an integer", Num: "a number", Str: "a string", Bool: "true or false", ListOf: "a list", Obj: "an object"}


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return f"the integer {value}"
    if isinstance(value, float):
        return f"the number {value}"
    if isinstance(value, str):
        return f"the string {value[:40]!r}"
    if isinstance(value, list):
        return f"a list of {len(value)}"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def validate(value: Any, schema: Any, where: str = "") -> None:
    """Raise :class:`SchemaError` at the first place where ``value`` does not match ``schema``.

    Iterative over containers' items (no recursion per item), recursive only over
    the schema's own depth, which is small and fixed.
    """
    if isinstance(schema, AnyValue):
        return
    if isinstance(schema, Nullable):
        if value is not None:
            validate(value, schema.inner, where)
        return
    ok = {
        Int: lambda: _is_int(value) and (schema.minimum is None or value >= schema.minimum),
        Num: lambda: isinstance(value, (int, float)) and not isinstance(value, bool),
        Str: lambda: isinstance(value, str),
        Bool: lambda: isinstance(value, bool),
        ListOf: lambda: isinstance(value, list),
        Obj: lambda: isinstance(value, dict),
    }[type(schema)]()
    if not ok:
        expected = _TYPE_NAMES[type(schema)]
        if isinstance(schema, Int) and schema.minimum is not None:
            expected = f"an integer >= {schema.minimum}"
        raise SchemaError(where, f"expected {expected}, found {_describe(value)}")
    if isinstance(schema, ListOf):
        for i, item in enumerate(value):
            validate(item, schema.item, f"{where}[{i}]")
    elif isinstance(schema, Obj):
        prefix = f"{where}." if where else ""
        for key, sub in schema.required.items():
            if key not in value:
                raise SchemaError(where, f"missing required field {key!r}")
            validate(value[key], sub, prefix + key)
        for key, sub in schema.optional.items():
            if key in value:
                validate(value[key], sub, prefix + key)


def check_document(doc: Any, schema: Any, path: str | Path, what: str, hint: str) -> Any:
    """Validate ``doc``; on mismatch raise a one-line InputError naming the file, field and ``hint``."""
    try:
        validate(doc, schema)
    except SchemaError as exc:
        raise InputError(f"{path}: not a valid {what} ({exc}); {hint}") from None
    return doc


def read_json(path: str | Path, what: str, hint: str) -> Any:
    """Decode a JSON file; any decoding failure (syntax, encoding, depth) is a one-line InputError."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{path}: not a valid {what} (not UTF-8 text); {hint}") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read the {what} ({exc.strerror or exc}); {hint}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: not a valid {what} (not JSON: {exc}); {hint}") from None
    except RecursionError:
        raise InputError(f"{path}: not a valid {what} (JSON nested too deeply to be one); {hint}") from None

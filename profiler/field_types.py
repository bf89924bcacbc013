"""Settings records check their own field types, so a wrong value is a one-line error naming it.

``check_fields(record, "grid.")`` compares every field of a dataclass with its annotation
(int, float, bool, str, None, unions, tuples and dicts) and raises ConfigError
``grid.repeats: must be an integer, got 'abc'`` on the first mismatch.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

from simulator.records.errors import ConfigError

_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "null"}


def matches(value: Any, annotation: Any) -> bool:
    """True when value fits the annotation (bool is not an integer; an integer is a number)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(matches(value, a) for a in args)
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if annotation in (str, type(None)):
        return isinstance(value, annotation)
    if origin is tuple:
        if not isinstance(value, tuple | list):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(matches(v, args[0]) for v in value)
        return len(value) == len(args) and all(matches(v, a) for v, a in zip(value, args, strict=True))
    if origin is dict or annotation is dict:
        return isinstance(value, dict)
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    return True


def describe(annotation: Any) -> str:
    """'an integer', 'null or a number', 'a list of integers', ..."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe(a) for a in sorted(args, key=lambda a: a is not type(None)))
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {describe(args[0]).split(' ', 1)[1]}s"
        return f"a list of {len(args)} {describe(args[0]).split(' ', 1)[1]}s"
    if origin is dict or annotation is dict:
        return "a mapping"
    return _NAMES.get(annotation, getattr(annotation, "__name__", str(annotation)))


def check_fields(record: Any, prefix: str = "") -> None:
    """ConfigError naming the first field of the dataclass record whose value has the wrong type."""
    hints = typing.get_type_hints(type(record))
    for f in dataclasses.fields(record):
        value = getattr(record, f.name)
        if not matches(value, hints[f.name]):
            raise ConfigError(f"{prefix}{f.name}", f"must be {describe(hints[f.name])}, got {value!r}")


def check_known(given: Any, allowed: Any, prefix: str = "", note: str = "") -> None:
    """ConfigError naming the first unknown key (``prefix`` + key), the closest allowed ones
    and ``note``."""
    import difflib

    allowed = sorted(allowed)
    for key in sorted(set(given) - set(allowed)):
        close = difflib.get_close_matches(str(key), allowed, n=3, cutoff=0.5)
        hint = f"did you mean {' or '.join(prefix + c for c in close)}? " if close else ""
        raise ConfigError(f"{prefix}{key}", f"unknown setting; {hint}allowed: {', '.join(allowed)}"
                          + (f"; {note}" if note else ""))


def check_values(record_type: type, data: dict[str, Any], prefix: str = "") -> None:
    """Like check_fields, on the dict a dataclass is about to be built from (nested records too);
    keys the record does not have are left to its own check."""
    hints = typing.get_type_hints(record_type)
    for key, value in data.items():
        annotation = hints.get(key)
        if annotation is None:
            continue
        if dataclasses.is_dataclass(annotation) and isinstance(value, dict):
            check_values(annotation, value, f"{prefix}{key}.")
        elif not matches(value, annotation):
            raise ConfigError(f"{prefix}{key}", f"must be {describe(annotation)}, got {value!r}")

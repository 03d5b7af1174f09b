"""Rows to records by column name (SQL rows, the memory store's): a SELECT list and the
values of a model come from its fields."""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, TypeVar

from .. import times
from ..models import DeployStatus, Role

T = TypeVar("T")


def moment(value: datetime | str | None) -> datetime | None:
    """A stored time as the interface gives it: aware, in UTC (text on SQLite)."""
    if value is None:
        return None
    if isinstance(value, str):
        return times.parse(value)
    return value.astimezone(UTC)


def role(value: str) -> Role:
    """A stored role; "owner" is what queries say for an app's owner."""
    return Role.OWNER if value == "owner" else Role.parse(value)


def _optional(convert: Callable[[Any], Any]) -> Callable[[Any], Any]:
    return lambda value: None if value is None else convert(value)


_CONVERT: dict[Any, Callable[[Any], Any]] = {
    datetime: moment,
    DeployStatus: DeployStatus,
    Role: role,
    bool: bool,
    int: int,
    float: float,
}


@functools.cache
def _fields(cls: type) -> tuple[tuple[str, Callable[[Any], Any] | None], ...]:
    """Each field of a model dataclass with the conversion its type asks for."""
    hints = typing.get_type_hints(cls)
    found = []
    for item in dataclasses.fields(cls):
        hint = hints[item.name]
        convert = _CONVERT.get(hint)
        if convert is None and isinstance(hint, types.UnionType):
            inner = [a for a in typing.get_args(hint) if a is not type(None)]
            if len(inner) == 1 and inner[0] in _CONVERT:
                convert = _optional(_CONVERT[inner[0]])
        found.append((item.name, convert))
    return tuple(found)


def record(cls: type[T], row: Mapping[str, Any], prefix: str = "", **given: Any) -> T:
    """The model `cls` from a row's columns named as its fields (after `prefix`); fields in
    `given` are taken from there instead."""
    values: dict[str, Any] = {}
    model: type = cls
    for name, convert in _fields(model):
        if name in given:
            values[name] = given[name]
            continue
        value = row[prefix + name]
        values[name] = value if convert is None or value is None else convert(value)
    return cls(**values)


def select_list(
    cls: type, alias: str, prefix: str = "", *, joined: Mapping[str, str | None] | None = None
) -> str:
    """The SELECT list of a model: `alias.field AS field` for each of its fields, except
    those `joined` names: their expression instead (a joined table's), or left out (None)."""
    joined = joined or {}
    parts = []
    for name, _ in _fields(cls):
        expression = joined.get(name, f"{alias}.{name}")
        if expression is not None:
            parts.append(f"{expression} AS {prefix}{name}")
    return ", ".join(parts)


def field_names(cls: type) -> tuple[str, ...]:
    return tuple(name for name, _ in _fields(cls))

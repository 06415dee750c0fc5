"""Keyword overrides of a recipe: ``epochs=3`` or ``training={"epochs": 3}`` or
``**{"training.epochs": 3}`` all set the same field. A short name is routed to the one section
that has it; an ambiguous or unknown name is an error naming it (with a suggestion)."""

from __future__ import annotations

import difflib
from typing import Any

from pydantic import BaseModel

from .base import RecipeError, section_type

__all__ = ["apply_overrides", "field_paths"]


def _section_type(cls: type[BaseModel], name: str) -> type[BaseModel] | None:
    return section_type(cls.model_fields[name].annotation)


def field_paths(cls: type[BaseModel], prefix: str = "") -> list[str]:
    """Every leaf field of a recipe class as a dotted name (``training.epochs``)."""
    out = []
    for name in cls.model_fields:
        sub = _section_type(cls, name)
        out += field_paths(sub, f"{prefix}{name}.") if sub else [f"{prefix}{name}"]
    return out


def _route(cls: type[BaseModel], key: str) -> list[str]:
    if "." in key or key in cls.model_fields:
        return key.split(".")
    hits = [p for p in field_paths(cls) if p.rsplit(".", 1)[-1] == key]
    if len(hits) == 1:
        return hits[0].split(".")
    if len(hits) > 1:
        raise RecipeError(key, f"is ambiguous in a {cls.__name__}; say which: {', '.join(hits)}")
    close = difflib.get_close_matches(key, [p.rsplit(".", 1)[-1] for p in field_paths(cls)] + list(cls.model_fields),
                                      n=1, cutoff=0.7)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise RecipeError(key, f"is not a field of a {cls.__name__}{hint}")


def _set(cls: type[BaseModel], d: dict, path: list[str], value: Any) -> None:
    head = path[0]
    if head not in cls.model_fields:
        raise RecipeError(".".join(path), f"is not a field of a {cls.__name__}")
    sub = _section_type(cls, head)
    if len(path) == 1:
        if sub is not None and isinstance(value, dict):
            cur = d.get(head)
            cur = cur.model_dump(exclude_unset=True) if isinstance(cur, BaseModel) else dict(cur or {})
            for k, v in value.items():
                _set(sub, cur, k.split("."), v)
            d[head] = cur
        else:
            d[head] = value
        return
    if sub is None:
        raise RecipeError(".".join(path), f"{head} has no sub-fields")
    cur = d.get(head)
    if cur is not None and not isinstance(cur, (dict, BaseModel)):
        raise RecipeError(head, f"is a section; give a dict of its fields, got {cur!r}")
    cur = cur.model_dump(exclude_unset=True) if isinstance(cur, BaseModel) else dict(cur or {})
    _set(sub, cur, path[1:], value)
    d[head] = cur


def apply_overrides(cls: type[BaseModel], data: dict, changes: dict[str, Any]) -> dict:
    """``data`` (a recipe as a dict) with ``changes`` applied; ``None`` values are skipped."""
    out = dict(data)
    for key, value in changes.items():
        if value is None:
            continue
        _set(cls, out, _route(cls, key), value)
    return out

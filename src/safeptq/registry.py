"""A small named registry: the single source for dispatch, ``safeptq ls``, ``--help`` choices and
"did you mean" suggestions (methods, objectives, suites, judges and schemes each have one)."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from .errors import UnknownNameError

__all__ = ["Registry"]

T = TypeVar("T")


class Registry(Generic[T]):
    """Names (plus aliases) → entries, each with a one-line description."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}
        self._help: dict[str, str] = {}
        self._aliases: dict[str, str] = {}

    def add(self, name: str, item: T, help: str = "", aliases: tuple[str, ...] = ()) -> T:
        if name in self._items or name in self._aliases:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._items[name], self._help[name] = item, help
        for a in aliases:
            self._aliases[a] = name
        return item

    def register(self, name: str, help: str = "", aliases: tuple[str, ...] = ()) -> Callable[[T], T]:
        """Decorator form of :meth:`add`."""
        def deco(item: T) -> T:
            return self.add(name, item, help, aliases)
        return deco

    def canonical(self, name: str) -> str:
        """The registered name for ``name`` or one of its aliases; one-line error with suggestions."""
        key = str(name).strip()
        if key in self._items:
            return key
        norm = key.lower().replace("_", "-")
        for cand in (key.lower(), norm, norm.replace("-", "_")):
            if cand in self._items:
                return cand
            if cand in self._aliases:
                return self._aliases[cand]
        close = difflib.get_close_matches(key, list(self._items) + list(self._aliases), n=1, cutoff=0.6)
        hint = f"; did you mean {self._aliases.get(close[0], close[0])!r}?" if close else ""
        raise UnknownNameError(f"unknown {self.kind} {name!r}{hint} (choose one of {', '.join(self._items)})")

    def get(self, name: str) -> T:
        return self._items[self.canonical(name)]

    def __contains__(self, name: object) -> bool:
        try:
            self.canonical(str(name))
        except UnknownNameError:
            return False
        return True

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def names(self) -> list[str]:
        return list(self._items)

    def describe(self) -> list[tuple[str, str]]:
        """``(name, help)`` rows for ``safeptq ls``."""
        return [(n, self._help[n]) for n in self._items]

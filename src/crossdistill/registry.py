"""A small name -> object registry (methods, datasets)."""

from __future__ import annotations

from typing import Callable, Generic, TypeVar

from .errors import CrossDistillError, shorten, suggest

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[name] = obj
            return obj

        return decorator

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise CrossDistillError(
                f"unknown {self.kind} {shorten(name)}; available: {', '.join(sorted(self._items))}."
                + suggest(str(name)[:100], self._items)
            ) from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

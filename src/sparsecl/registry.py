"""A tiny name -> object registry, used for methods, benchmarks and backbones.

No global side effects beyond the module-level dict each registry owns; registering the
same name twice is an error so that typos in plugins do not silently shadow built-ins.
"""
from __future__ import annotations

from typing import Generic, Iterator, TypeVar

from sparsecl import SparseCLError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to objects; lookup errors list the known names."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def add(self, name: str, obj: T) -> None:
        if name in self._items:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._items[name] = obj

    def remove(self, name: str) -> None:
        self._items.pop(name, None)

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            known = ", ".join(sorted(self._items))
            raise SparseCLError(f"unknown {self.kind} {name!r} (known: {known})") from None

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))

    def items(self) -> list[tuple[str, T]]:
        return sorted(self._items.items())

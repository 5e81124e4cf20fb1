"""Named registries: the one mechanism behind every seam (engines, embedding schemes, ML zones, models).

A new capability is one module plus one registration::

    from coupling.schemes import SCHEMES

    @SCHEMES.register("my-scheme")
    class MyScheme(EmbeddingScheme): ...

Look-ups of unknown names raise :class:`~potentials.core.errors.SetupError` naming the known ones, so a typo in
a system.toml or on the command line ends in one clear line.
"""
from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

from potentials.core.errors import SetupError

T = TypeVar("T")


class Registry(Generic[T]):
    """A mapping name -> object (a class or a factory), filled by :meth:`register`.

    ``kind`` names what is registered, for error messages ("embedding scheme", "model architecture").
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str, obj: T | None = None) -> Callable[[T], T] | T:
        """Register ``obj`` under ``name``; without ``obj``, a decorator. A name is registered once."""
        def add(item: T) -> T:
            if name in self._items and self._items[name] is not item:
                raise ValueError(f"{self.kind} {name!r} is already registered ({self._items[name]!r})")
            self._items[name] = item
            return item

        return add if obj is None else add(obj)

    def unregister(self, name: str) -> None:
        """Remove ``name`` (tests that register a temporary entry clean up with this)."""
        self._items.pop(name, None)

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise SetupError(f"unknown {self.kind} {name!r}; known: {', '.join(self.names())}") from None

    __getitem__ = get

    def names(self) -> tuple[str, ...]:
        return tuple(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

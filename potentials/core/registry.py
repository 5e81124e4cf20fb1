"""Named registries: the one mechanism behind every seam (engines, embedding schemes, ML zones, models).

A new capability is one module plus one registration::

    from coupling.schemes import SCHEMES

    @SCHEMES.register("my-scheme")
    class MyScheme(EmbeddingScheme): ...

An entry whose module is costly to import (torch kernels, another package) is registered lazily by name and
module, ``SCHEMES.register_lazy("electrostatic-lr", "coupling.schemes_lr")``: the module is imported, and
registers itself, on the first look-up of that name, so listing the names (``mlmm --help``) stays cheap.

Look-ups of unknown names raise :class:`~potentials.core.errors.SetupError` naming the known ones, so a typo in
a system.toml or on the command line ends in one clear line.
"""
from __future__ import annotations

import importlib
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
        self._lazy: dict[str, str] = {}          # name -> module that registers it when imported

    def register(self, name: str, obj: T | None = None) -> Callable[[T], T] | T:
        """Register ``obj`` under ``name``; without ``obj``, a decorator. A name is registered once."""
        def add(item: T) -> T:
            if name in self._items and self._items[name] is not item:
                raise ValueError(f"{self.kind} {name!r} is already registered ({self._items[name]!r})")
            self._items[name] = item
            return item

        return add if obj is None else add(obj)

    def register_lazy(self, name: str, module: str) -> None:
        """Register ``name`` as provided by ``module``, imported on the first :meth:`get` of that name."""
        self._lazy[name] = module

    def unregister(self, name: str) -> None:
        """Remove ``name`` (tests that register a temporary entry clean up with this)."""
        self._items.pop(name, None)

    def get(self, name: str) -> T:
        if name not in self._items and name in self._lazy:
            importlib.import_module(self._lazy[name])
        try:
            return self._items[name]
        except KeyError:
            raise SetupError(f"unknown {self.kind} {name!r}; known: {', '.join(self.names())}") from None

    __getitem__ = get

    def names(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys([*self._items, *self._lazy]))

    def __contains__(self, name: object) -> bool:
        return name in self._items or name in self._lazy

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())

"""The one TOML -> dataclass mechanism of the project.

Every configuration file (``system.toml``, the model preset, the training config, the labelling config) is a
dataclass loaded by :func:`load` / :func:`build`: unknown keys are rejected, each value's type is checked
against the field's annotation, and every error names the key and the file::

    cfg = load(TrainConfig, "train.toml")          # SetupError("train.toml [optim] lr: expected float, ...")

Fields with ``metadata={"config": False}`` are not read from files (e.g. the folder a file was read from).
Nested dataclasses are TOML tables; ``list``/``tuple`` fields are TOML arrays (a tuple field receives a tuple);
``dict`` fields are tables kept as dicts. :func:`to_dict` is the inverse (None values left out), and
:func:`describe` prints the effective configuration for ``--print-config``.
"""
from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from potentials.core.errors import SetupError

T = TypeVar("T")


def read_toml(path: str | Path, what: str = "config") -> dict:
    """The parsed TOML file; a missing or malformed file is one SetupError naming it."""
    path = Path(path)
    if not path.is_file():
        raise SetupError(f"{what} {path} not found")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise SetupError(f"{path}: not valid TOML ({exc})") from None


def load(klass: type[T], path: str | Path, what: str = "config") -> T:
    """Read ``path`` and build ``klass`` from it (see :func:`build`)."""
    return build(klass, read_toml(path, what), where=str(path))


def build(klass: type[T], values: Any, where: str = "config") -> T:
    """A ``klass`` instance from a plain dict: unknown keys and wrong types raise SetupError naming
    ``where`` and the key; missing required keys too. Nested dataclass fields are built recursively."""
    if not isinstance(values, dict):
        raise SetupError(f"{where}: expected a table, got {values!r}")
    hints = typing.get_type_hints(klass)
    fields = {f.name: f for f in dataclasses.fields(klass) if f.init and f.metadata.get("config", True)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise SetupError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(fields)}")
    kwargs = {}
    for name, value in values.items():
        nested = dataclasses.is_dataclass(hints[name])
        kwargs[name] = _convert(hints[name], value, f"{where} [{name}]" if nested else f"{where} {name}")
    missing = [n for n, f in fields.items() if n not in kwargs and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise SetupError(f"{where}: missing required key(s) {missing}")
    try:
        return klass(**kwargs)
    except TypeError as exc:
        raise SetupError(f"{where}: {exc}") from None


def _convert(hint: Any, value: Any, where: str) -> Any:
    """``value`` checked (and lists turned into tuples) against the annotation ``hint``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _convert(option, value, where)
            except SetupError as exc:
                errors.append(str(exc))
        raise SetupError(errors[0] if len(errors) == 1 else
                         f"{where}: {value!r} matches none of {_name(hint)}")
    if dataclasses.is_dataclass(hint):
        return build(hint, value, where)
    if origin in (list, tuple) or hint in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise SetupError(f"{where}: expected an array ({_name(hint)}), got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise SetupError(f"{where}: expected {len(args)} values, got {len(value)}")
            return tuple(_convert(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        item = args[0] if args else Any
        out = [_convert(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if (origin is tuple or hint is tuple) else out
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise SetupError(f"{where}: expected a table ({_name(hint)}), got {value!r}")
        vt = args[1] if len(args) == 2 else Any
        return {k: _convert(vt, v, f"{where}.{k}") for k, v in value.items()}
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SetupError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise SetupError(f"{where}: expected an integer, got {value!r}")
        return value
    if hint in (str, bool):
        if not isinstance(value, hint):
            raise SetupError(f"{where}: expected {hint.__name__}, got {value!r}")
        return value
    return value


def _name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def to_dict(obj: Any) -> dict:
    """The dataclass as plain TOML-ready values (nested tables; None entries left out)."""
    def clean(v):
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items() if x is not None}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v
    return clean(dataclasses.asdict(obj))


def describe(obj: Any, title: str | None = None) -> str:
    """The effective configuration as TOML text (for ``--print-config``); an object with its own ``to_dict``
    (:class:`~potentials.core.spec.SystemSpec`) is written as that gives it."""
    import tomli_w

    text = tomli_w.dumps(obj.to_dict() if callable(getattr(obj, "to_dict", None)) else to_dict(obj))
    return f"# {title}\n{text}" if title else text

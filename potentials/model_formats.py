"""Which model family a file holds, found WITHOUT unpickling it.

``torch.save`` writes a zip archive whose ``<name>/data.pkl`` is a pickle; TorchScript (``torch.jit.save``)
writes a zip with ``constants.pkl`` and ``code/``; old torch versions wrote a bare sequence of pickles. The
pickle's opcodes name every class it would import (``GLOBAL module name``); :mod:`pickletools` lists them
without running anything. So:

* a pickle that imports only tensors and containers is a weights-only file (ours: a dict with
  ``"architecture"``; the ``aimnet`` package's current format: a dict with ``"model_yaml"``), read with
  ``torch.load(weights_only=True)``;
* a pickle whose top object is a ``mace.*`` class is a MACE model (mace-torch saves the model object, the
  format of the released MACE-OFF files), ``torchani.*`` an ANI model: loading those runs code from the file,
  so it is done only for a recognised family and said in the log;
* a TorchScript archive is named by the package its code was scripted from (``code/__torch__/aimnet/...``:
  the released AIMNet2 ``.jpt`` files).
"""
from __future__ import annotations

import io
import pickletools
import zipfile
from pathlib import Path
from typing import NamedTuple

from potentials.core.errors import SetupError

# the model families --model-type names: our network, then those with their own adapter module
# (potentials/adapters_<family>.py, imported on first use by potentials.adapters)
MODEL_TYPES = ("embedded-aimnet2", "mace", "aimnet2", "ani")

# modules (and their submodules) a pure weights file may import from
WEIGHTS_MODULES = ("torch", "collections", "__builtin__", "builtins", "_codecs", "copyreg", "numpy")
# families of pickled models, by the top-level module of the top object's class
PICKLE_FAMILIES = {"mace": "mace", "torchani": "ani"}
TORCHSCRIPT_FAMILIES = {"aimnet": "aimnet2", "aimnet2": "aimnet2", "torchani": "ani", "mace": "mace"}
# globals no model file of any family needs: refused even for a recognised family
FORBIDDEN = ("os ", "posix ", "nt ", "subprocess ", "sys ", "shutil ", "socket ", "importlib", "runpy ",
             "builtins eval", "builtins exec", "builtins compile", "builtins __import__", "builtins open",
             "__builtin__ eval", "__builtin__ exec", "__builtin__ compile", "__builtin__ __import__",
             "__builtin__ open", "pty ", "webbrowser ")


class FileKind(NamedTuple):
    """kind: ``"weights"`` (weights-only pickle), ``"pickle"`` (a pickled object of class ``root``),
    ``"torchscript"``; family: the :data:`potentials.adapter_base.MODELS` name when known from the file alone
    (None for weights files: their dict says)."""

    kind: str
    family: str | None
    root: str


def pickle_globals(data: bytes) -> list[str]:
    """``"module name"`` of every class/function a pickle imports, in order (nothing is executed)."""
    out, strings = [], []
    for op, arg, _ in pickletools.genops(io.BytesIO(data)):
        if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "SHORT_BINSTRING", "BINSTRING"):
            strings.append(str(arg))
        elif op.name in ("GLOBAL", "INST"):
            out.append(str(arg))
        elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
            out.append(f"{strings[-2]} {strings[-1]}")
    return out


def _legacy_pickles(path: Path) -> list[str]:
    """Globals of the object pickle of a pre-zip torch file (pickles: magic, protocol, sys info, object)."""
    raw = path.read_bytes()
    stream, found = io.BytesIO(raw), None
    for _ in range(4):
        start = stream.tell()
        try:
            for _op in pickletools.genops(stream):
                pass
        except Exception:                           # noqa: BLE001 - not (or no more) pickles
            break
        found = pickle_globals(raw[start:stream.tell()])
    if found is None:
        raise SetupError(f"model file {path} is neither a torch file nor a TorchScript archive")
    return found


def classify(path) -> FileKind:
    """What ``path`` holds (:class:`FileKind`); SetupError for a file that is none of the known formats."""
    path = Path(path)
    if not path.is_file():
        raise SetupError(f"model file {path} not found; give the right path")
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            if any(n.endswith("constants.pkl") or "/code/" in n for n in names):
                return _torchscript(names)
            pkl = next((n for n in names if n.endswith("data.pkl")), None)
            if pkl is None:
                raise SetupError(f"model file {path}: a zip archive without data.pkl is no torch model file")
            globs = pickle_globals(zf.read(pkl))
    else:
        globs = _legacy_pickles(path)
    return _from_globals(path, globs)


def _torchscript(names: list[str]) -> FileKind:
    for n in names:
        parts = n.split("/")
        if "__torch__" in parts:
            pkg = parts[parts.index("__torch__") + 1] if parts.index("__torch__") + 1 < len(parts) else ""
            pkg = pkg.removesuffix(".py")
            if pkg in TORCHSCRIPT_FAMILIES:
                return FileKind("torchscript", TORCHSCRIPT_FAMILIES[pkg], pkg)
    return FileKind("torchscript", None, "")


def _weights_only(glob: str) -> bool:
    module = glob.split(" ")[0]
    return any(module == m or module.startswith(m + ".") for m in WEIGHTS_MODULES)


def _from_globals(path: Path, globs: list[str]) -> FileKind:
    bad = [g for g in globs if g.startswith(FORBIDDEN)]
    if bad:
        raise SetupError(f"model file {path} imports {bad[0]!r} when unpickled: refused (no model file needs it)")
    if all(_weights_only(g) for g in globs):
        return FileKind("weights", None, "")
    root = next((g for g in globs if not _weights_only(g)), "")
    family = PICKLE_FAMILIES.get(root.split(".")[0].split(" ")[0])
    return FileKind("pickle", family, root)


def weights_family(contents: dict) -> str | None:
    """The family of a weights-only file's dict, when its keys say it: ``model_yaml`` (the ``aimnet`` package's
    current format) -> ``aimnet2``; a TorchANI state dict (the released ``*_state_dict.pt``) -> ``ani``; None
    otherwise (our files record ``architecture``)."""
    if "architecture" in contents:
        return None
    if "model_yaml" in contents:
        return "aimnet2"
    if any(str(k).startswith(("energy_shifter.", "potentials.nnp.")) for k in contents):
        return "ani"
    return None

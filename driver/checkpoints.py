"""i-PI's state on disk, for continuing a run: which file to continue from, and the automatic checkpoints.

i-PI writes ``RESTART`` only when it exits (soft exit: end of the run, SIGTERM, a dropped client). An i-PI that
is killed (SIGKILL, the OOM killer, node trouble) leaves the RESTART of an earlier attempt, or none. `mlmm run`
therefore adds a checkpoint output of its own, ``<checkpoint filename='autosave' stride='N' overwrite='false'/>``:
i-PI writes a new file ``PREFIX.autosave_K`` every N steps (after all outputs of that step), so a kill during a
write leaves the previous one intact; the supervisor keeps the newest `KEEP` of them. The state to continue from
is the newest readable one of ``RESTART``, ``resume.xml`` (the state the current attempt started from) and the
autosaves (:func:`newest`). States at step 0 do not count: i-PI would write the step-0 outputs a second time.
"""
from __future__ import annotations

import logging
import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from . import xmlinput

log = logging.getLogger(__name__)

AUTOSAVE = "autosave"          # filename attribute of the automatic checkpoint (file PREFIX.autosave_K)
DEFAULT_STRIDE = 1000          # steps between automatic checkpoints (mlmm run --checkpoint-stride)
KEEP = 2                       # automatic checkpoints kept while a run goes on
RESTART = "RESTART"
RESUME = "resume.xml"


@dataclass(frozen=True)
class State:
    """A file i-PI can continue from, and the step it holds (MD steps done)."""

    path: Path
    step: int


def set_autosave(root: ET.Element, stride: int) -> None:
    """Give the input (template or RESTART) the automatic checkpoint every ``stride`` steps (0: none), in place."""
    output = root.find("output")
    if output is None:
        output = ET.SubElement(root, "output")
    old = [el for el in output.findall("checkpoint") if el.get("filename") == AUTOSAVE]
    for el in old[1:] if stride > 0 else old:
        output.remove(el)
    if stride <= 0:
        return
    el = old[0] if old else ET.SubElement(output, "checkpoint", filename=AUTOSAVE)
    el.set("stride", str(int(stride)))
    el.set("overwrite", "false")
    output.remove(el)                   # last: i-PI writes the outputs in this order, the checkpoint after them
    output.append(el)


def autosaves(folder: Path, root: ET.Element) -> list[Path]:
    """The automatic checkpoints in ``folder`` (with i-PI's ``#name#k#`` backups of them), newest first."""
    stem = f"{xmlinput.output_prefix(root)}.{AUTOSAVE}_"
    found = [p for p in folder.glob(f"{stem}*") if p.name[len(stem):].isdigit()]
    found += [p for p in folder.glob(f"#{stem}*#*#")]
    return sorted(found, key=_mtime, reverse=True)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def newest(folder: Path, root: ET.Element | None = None) -> State | None:
    """The state to continue the run in ``folder`` from: the readable one with the highest step among RESTART,
    resume.xml and the automatic checkpoints (``root``: the run's input, for their names; RESTART's if None);
    on a tie RESTART first. None if there is none past step 0."""
    if root is None:
        try:
            root = ET.parse(folder / RESTART).getroot()
        except (OSError, ET.ParseError):
            root = ET.Element("simulation")
    best: State | None = None
    for path in [folder / RESTART, folder / RESUME] + autosaves(folder, root):
        step = xmlinput.restart_step(path) if path.is_file() else None
        if step is not None and step > 0 and (best is None or step > best.step):
            best = State(path, step)
    return best


def prune(folder: Path, root: ET.Element, keep: int = KEEP) -> None:
    """Remove all but the newest ``keep`` automatic checkpoints."""
    for path in autosaves(folder, root)[keep:]:
        _remove(path)


def clear(folder: Path, root: ET.Element, but: Path | None = None) -> None:
    """Remove the automatic checkpoints (except ``but``): the run goes on from another state, or has ended."""
    for path in autosaves(folder, root):
        if but is None or path.resolve() != but.resolve():
            _remove(path)


def _remove(path: Path) -> None:
    try:
        os.remove(path)
    except OSError as exc:
        log.debug("could not remove %s: %s", path, exc)

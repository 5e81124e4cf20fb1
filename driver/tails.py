"""The ends of i-PI's growing text outputs: cutting them back to a step, finding where the steps after one begin.

Continuing a run (``mlmm run --resume``, an automatic restart) must cost what the continuation adds, not what
the run already wrote: every function here reads a file backwards, block by block, only until it has found the
step it looks for, and then works forwards on that tail alone. The step of a row or frame is the ``step``
column of a properties table (or of ``properties.csv``) and the ``Step: N`` i-PI writes in every frame's
comment line (xyz, extxyz, pdb) or extras header.
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Callable, Iterator

from . import trajectory

log = logging.getLogger(__name__)

BLOCK = 1 << 16                          # bytes first read backwards (doubled at each further step)
_STEP_IN_COMMENT = re.compile(rb"Step:\s+(\d+)")


def _region(path: Path, enough: Callable[[int, bytes], bool]) -> tuple[int, bytes]:
    """``(offset, bytes)``: the end of ``path`` from a line start on, read backwards until ``enough(offset,
    bytes)`` holds or the file's start is reached."""
    with open(path, "rb") as fh:
        start = fh.seek(0, os.SEEK_END)
        data, block = b"", BLOCK
        while start > 0:
            new = max(0, start - block)
            fh.seek(new)
            data, start = fh.read(start - new) + data, new
            block *= 2
            skip = 0 if start == 0 else data.find(b"\n") + 1
            if (skip or start == 0) and enough(start + skip, data[skip:]):
                return start + skip, data[skip:]
        return 0, data


def _lines(base: int, data: bytes) -> Iterator[tuple[int, bytes]]:
    """``(offset, line)`` for the lines of ``data`` (which starts at file offset ``base``), newline kept."""
    pos = 0
    while pos < len(data):
        end = data.find(b"\n", pos)
        end = len(data) if end < 0 else end + 1
        yield base + pos, data[pos:end]
        pos = end


def _truncate(path: Path, offset: int, what: str, step: int) -> None:
    size = path.stat().st_size
    if offset < size:
        with open(path, "r+b") as fh:
            fh.truncate(offset)
        log.info("%s: removed %d bytes of %s after step %d (redone by the resumed run)", path.name, size - offset,
                 what, step)


# --------------------------------------------------------------------------- trajectories (Step: marks)
def _frames(base: int, data: bytes) -> list[tuple[int, int, int]]:
    """``(frame start, step, line number)`` of the marked frames in ``data``: an xyz/extxyz frame starts with
    the atom-count line before its comment, an extras or pdb frame with the marked line itself."""
    out, prev_off, prev_line = [], None, b""
    for k, (off, line) in enumerate(_lines(base, data)):
        m = _STEP_IN_COMMENT.search(line)
        if m is not None:
            start = prev_off if prev_off is not None and prev_line.strip().isdigit() else off
            out.append((start, int(m.group(1)), k))
        prev_off, prev_line = off, line
    return out


def _frames_back_to(path: Path, step: int) -> tuple[int, list[tuple[int, int, int]]]:
    """The tail of a trajectory that holds a frame of a step <= ``step`` (with the line before it), or the whole
    file; returns its offset and its frames."""
    def enough(base: int, data: bytes) -> bool:
        return any(s <= step and k > 0 for _, s, k in _frames(base, data))
    base, data = _region(path, enough)
    return base, _frames(base, data)


def trim_trajectory(path: str | Path, step: int) -> int:
    """Cut an i-PI text trajectory (xyz, ase/extxyz, pdb, extras) back to the frames of steps <= ``step``; returns
    the frames removed. A binary (``format='bin'``) trajectory has no step marks and is left alone (warning)."""
    path = Path(path)
    base, frames = _frames_back_to(path, step)
    if not frames:
        if base == 0 and path.stat().st_size:
            log.warning("%s has no 'Step:' marks (binary?): cannot remove the frames a resumed run repeats", path)
        return 0
    later = [f for f in frames if f[1] > step]
    if later:
        _truncate(path, later[0][0], f"{len(later)} frame(s)", step)
    return len(later)


def frame_offset(path: str | Path, step: int) -> int:
    """Byte offset of the last frame of a step <= ``step`` (where to start reading the frames after it); 0 if
    there is none."""
    _, frames = _frames_back_to(Path(path), step)
    done = [f for f in frames if f[1] <= step]
    return done[-1][0] if done else 0


# --------------------------------------------------------------------------- tables (a step column)
def _step_of(line: bytes, col: int, sep: bytes | None) -> int | None:
    """The step of a complete table row; None for a partial or unreadable one."""
    if not line.endswith(b"\n"):
        return None
    try:
        return int(float(line.split(sep)[col]))
    except (ValueError, IndexError):
        return None


def _trim_table(path: Path, step: int, col: int, sep: bytes | None, comment: bytes) -> int:
    """Cut a table whose rows carry their step in column ``col`` back to the rows of steps <= ``step`` (a
    half-written last row goes too); returns the rows removed."""
    def rows(base: int, data: bytes) -> Iterator[tuple[int, int | None]]:
        for off, line in _lines(base, data):
            if line.strip() and not line.startswith(comment) and off >= skip:
                yield off, _step_of(line, col, sep)

    skip = _header_end(path, comment)
    base, data = _region(path, lambda b, d: b <= skip or any(s is not None and s <= step for _, s in rows(b, d)))
    cut, removed = None, 0
    for off, s in rows(base, data):
        if cut is None and (s is None or s > step):
            cut = off
        if cut is not None:
            removed += 1
    if cut is not None:
        _truncate(path, cut, f"{removed} row(s)", step)
    return removed


def _header_end(path: Path, comment: bytes) -> int:
    """Offset of the first line of ``path`` after its leading header lines (starting with ``comment``)."""
    offset = 0
    with open(path, "rb") as fh:
        for raw in fh:
            if not raw.startswith(comment):
                break
            offset += len(raw)
    return offset


def properties_step_column(path: Path) -> int | None:
    """The 0-based column of ``step`` in an i-PI properties file (from its header), None if it has none."""
    with open(path, "rb") as fh:
        for raw in fh:
            if not raw.startswith(b"#"):
                break
            parsed = trajectory.parse_header_line(raw.decode(errors="replace"))
            if parsed is not None and parsed[2] == "step":
                return parsed[0]
    return None


def trim_properties(path: str | Path, step: int) -> int:
    """Cut an i-PI properties file back to the rows of steps <= ``step``; returns the rows removed.

    A resumed i-PI appends to its outputs from the step of its RESTART, which lags the last written row by up
    to ``safe_stride`` steps (ipi.md §3.6): without this those steps would be written twice. A half-written
    last row goes too. A file without a ``step`` column is left alone (warning)."""
    path = Path(path)
    col = properties_step_column(path)
    if col is None:
        if path.stat().st_size > _header_end(path, b"#"):
            log.warning("%s has no 'step' column: cannot remove the rows a resumed run repeats", path)
        return 0
    return _trim_table(path, step, col, None, b"#")


def csv_step_column(path: Path) -> int | None:
    """The column of ``step`` in ``properties.csv`` (its first line), None if absent."""
    with open(path, "rb") as fh:
        names = fh.readline().strip().split(b",")
    return names.index(b"step") if b"step" in names else None


def trim_csv(path: str | Path, step: int) -> int:
    """Cut ``properties.csv`` back to the rows of steps <= ``step``; returns the rows removed."""
    path = Path(path)
    col = csv_step_column(path)
    if col is None:
        return 0
    with open(path, "rb") as fh:
        first = len(fh.readline())

    def enough(base: int, data: bytes) -> bool:
        return base <= first or any(_step_of(line, col, b",") is not None and _step_of(line, col, b",") <= step
                                    for off, line in _lines(base, data) if off >= first)

    base, data = _region(path, enough)
    cut, removed = None, 0
    for off, line in _lines(base, data):
        if off < first:
            continue
        s = _step_of(line, col, b",")
        if cut is None and (s is None or s > step):
            cut = off
        removed += cut is not None
    if cut is not None:
        _truncate(path, cut, f"{removed} row(s)", step)
    return removed


def last_csv_step(path: Path) -> int | None:
    """The step of the last complete row of ``properties.csv``; None if it has none (or no step column)."""
    col = csv_step_column(path)
    if col is None:
        return None
    with open(path, "rb") as fh:
        first = len(fh.readline())
    base, data = _region(path, lambda b, d: any(_step_of(ln, col, b",") is not None
                                                for off, ln in _lines(b, d) if off >= first))
    steps = [s for off, ln in _lines(base, data) if off >= first and (s := _step_of(ln, col, b",")) is not None]
    return steps[-1] if steps else None


def properties_rows_after(path: Path, step: int) -> list[bytes]:
    """The complete data rows of an i-PI properties file with a step > ``step`` (read from its end)."""
    col = properties_step_column(path)
    if col is None:
        raise ValueError(f"{path} has no 'step' column")
    skip = _header_end(path, b"#")

    def enough(base: int, data: bytes) -> bool:
        return base <= skip or any((s := _step_of(ln, col, None)) is not None and s <= step
                                   for off, ln in _lines(base, data) if off >= skip and ln.strip())

    base, data = _region(path, enough)
    return [ln for off, ln in _lines(base, data) if off >= skip and ln.strip() and not ln.startswith(b"#")
            and (s := _step_of(ln, col, None)) is not None and s > step]

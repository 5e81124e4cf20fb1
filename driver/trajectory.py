"""Run outputs in standard formats: AMBER-convention NetCDF trajectories and a CSV properties table.

The NetCDF files follow the AMBER trajectory convention 1.0 (https://ambermd.org/netcdf/nctraj.xhtml):
64-bit-offset NetCDF3, dimensions frame (unlimited)/spatial/atom/cell_spatial/cell_angular/label, float32
``coordinates`` in Å, float32 ``time`` in ps, float64 ``cell_lengths`` (Å) and ``cell_angles`` (degree).
MDTraj, VMD, cpptraj and ParmEd read them. Non-periodic systems get no cell variables (the large box i-PI
needs for clusters is not physical).

Crash safety: `write_netcdf` writes a temporary file and renames it; `AmberNetCDFWriter` syncs after every
frame, so an interrupted run leaves a readable file with the frames written so far.
"""
from __future__ import annotations

import csv
import logging
import os
import re
from pathlib import Path
from types import TracebackType

import numpy as np

from potentials.core.errors import SetupError
from potentials.core.units import BOHR_PER_ANGSTROM

log = logging.getLogger(__name__)

_PROGRAM = "mlmm"
_VERSION = "0.1.0"


class AmberNetCDFWriter:
    """Append frames to an AMBER-convention NetCDF trajectory, one frame at a time.

    Parameters
    ----------
    path : str or Path
        Output file. With ``append=True`` an existing file is extended (a resumed run); its atom count and
        periodicity must match.
    n_atoms : int
        Number of atoms per frame.
    periodic : bool
        Write ``cell_lengths``/``cell_angles`` (required in every frame) or not.
    append : bool
        Extend an existing file instead of creating a new one.
    title : str
        Global ``title`` attribute.
    """

    def __init__(self, path: str | Path, n_atoms: int, *, periodic: bool = True, append: bool = False,
                 title: str = "mlmm trajectory"):
        import netCDF4

        self.path = Path(path)
        self.periodic = periodic
        if append and self.path.exists():
            self._ds = netCDF4.Dataset(self.path, "a")
            if getattr(self._ds, "Conventions", "") != "AMBER":
                self._ds.close()
                raise SetupError(f"{self.path}: not an AMBER NetCDF trajectory; cannot append to it")
            have_atoms = len(self._ds.dimensions["atom"])
            have_cell = "cell_lengths" in self._ds.variables
            if have_atoms != n_atoms or have_cell != periodic:
                self._ds.close()
                raise SetupError(f"{self.path}: has {have_atoms} atoms (periodic={have_cell}), the run has "
                                 f"{n_atoms} (periodic={periodic}); write to a new file")
        else:
            self._ds = netCDF4.Dataset(self.path, "w", format="NETCDF3_64BIT_OFFSET")
            self._define(n_atoms, title)
        self.n_atoms = n_atoms

    def _define(self, n_atoms: int, title: str) -> None:
        ds = self._ds
        ds.Conventions = "AMBER"
        ds.ConventionVersion = "1.0"
        ds.program = _PROGRAM
        ds.programVersion = _VERSION
        ds.application = "i-PI"
        ds.title = title
        ds.createDimension("frame", None)
        ds.createDimension("spatial", 3)
        ds.createDimension("atom", n_atoms)
        ds.createDimension("label", 5)
        ds.createVariable("spatial", "S1", ("spatial",))[:] = np.array(list("xyz"), dtype="S1")
        t = ds.createVariable("time", "f4", ("frame",))
        t.units = "picosecond"
        c = ds.createVariable("coordinates", "f4", ("frame", "atom", "spatial"))
        c.units = "angstrom"
        if self.periodic:
            ds.createDimension("cell_spatial", 3)
            ds.createDimension("cell_angular", 3)
            ds.createVariable("cell_spatial", "S1", ("cell_spatial",))[:] = np.array(list("abc"), dtype="S1")
            labels = ds.createVariable("cell_angular", "S1", ("cell_angular", "label"))
            labels[:] = np.array([list(s.ljust(5)) for s in ("alpha", "beta", "gamma")], dtype="S1")
            ds.createVariable("cell_lengths", "f8", ("frame", "cell_spatial")).units = "angstrom"
            ds.createVariable("cell_angles", "f8", ("frame", "cell_angular")).units = "degree"

    def __len__(self) -> int:
        return len(self._ds.dimensions["frame"])

    @property
    def last_time(self) -> float | None:
        """Time (ps) of the last frame in the file, None if empty: a resumed run appends after it."""
        n = len(self)
        return float(self._ds.variables["time"][n - 1]) if n else None

    def write_frame(self, positions: np.ndarray, time_ps: float, cell_lengths: np.ndarray | None = None,
                    cell_angles: np.ndarray | None = None) -> None:
        """Append one frame.

        Parameters
        ----------
        positions : (N, 3) array, Å
        time_ps : float, ps
        cell_lengths : (3,) array, Å; required if periodic
        cell_angles : (3,) array, degree; required if periodic
        """
        positions = np.asarray(positions, dtype=float)
        if positions.shape != (self.n_atoms, 3):
            raise ValueError(f"frame has shape {positions.shape}, the trajectory holds ({self.n_atoms}, 3)")
        if not np.all(np.isfinite(positions)):
            raise ValueError(f"{self.path}: non-finite coordinates at t = {time_ps} ps")
        i = len(self)
        v = self._ds.variables
        v["coordinates"][i] = positions
        v["time"][i] = time_ps
        if self.periodic:
            if cell_lengths is None or cell_angles is None:
                raise ValueError(f"{self.path} is periodic: every frame needs cell_lengths and cell_angles")
            v["cell_lengths"][i] = cell_lengths
            v["cell_angles"][i] = cell_angles
        self._ds.sync()

    def close(self) -> None:
        if self._ds.isopen():
            self._ds.close()

    def __enter__(self) -> "AmberNetCDFWriter":
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def netcdf_times_after(path: str | Path, t_ps: float) -> tuple[int, int]:
    """(frames in the AMBER NetCDF ``path``, how many of the last ones have a time > ``t_ps``), reading times
    from the end only."""
    import netCDF4

    with netCDF4.Dataset(path) as ds:
        n = len(ds.dimensions["frame"])
        time = ds.variables["time"]
        k = 0
        while k < n and float(time[n - 1 - k]) > t_ps:
            k += 1
    return n, k


def netcdf_truncate(path: str | Path, frames: int) -> None:
    """Keep the first ``frames`` frames of a NetCDF3 (classic or 64-bit offset) file, in place: the record count
    in the header is lowered and the file cut after that record. netCDF4 cannot shrink the unlimited dimension;
    rewriting the file would cost the whole run. Raises ValueError for other formats."""
    import struct

    path = Path(path)
    with open(path, "r+b") as fh:
        head = fh.read(1 << 16)
        if head[:3] != b"CDF" or head[3] not in (1, 2):
            raise ValueError(f"{path}: not a NetCDF3 classic/64-bit-offset file")
        numrecs = struct.unpack(">i", head[4:8])[0]
        begin, recsize = _netcdf3_records(head, head[3])
        if frames >= numrecs:
            return
        fh.seek(4)
        fh.write(struct.pack(">i", frames))
        fh.truncate(min(fh.seek(0, os.SEEK_END), begin + frames * recsize))


def _netcdf3_records(head: bytes, version: int) -> tuple[int, int]:
    """(offset of the first record, bytes per record) from a NetCDF3 header (the format spec's grammar)."""
    import struct

    pos = 8

    def i32() -> int:
        nonlocal pos
        pos += 4
        return struct.unpack(">i", head[pos - 4:pos])[0]

    def name() -> None:
        nonlocal pos
        n = i32()
        pos += -(-n // 4) * 4

    def attrs() -> None:
        nonlocal pos
        tag, n = i32(), i32()
        for _ in range(n if tag else 0):
            name()
            size = {1: 1, 2: 1, 3: 2, 4: 4, 5: 4, 6: 8}[i32()]
            nbytes = i32() * size
            pos += -(-nbytes // 4) * 4

    tag, n = i32(), i32()
    dims = []
    for _ in range(n if tag else 0):
        name()
        dims.append(i32())
    attrs()
    tag, n = i32(), i32()
    begins, recsize = [], 0
    for _ in range(n if tag else 0):
        name()
        ids = [i32() for _ in range(i32())]
        attrs()
        i32()                                       # nc_type
        vsize = i32()
        off = struct.unpack(">q" if version == 2 else ">i", head[pos:pos + (8 if version == 2 else 4)])[0]
        pos += 8 if version == 2 else 4
        if ids and dims[ids[0]] == 0:               # a record variable: its first dimension is the unlimited one
            begins.append(off)
            recsize += vsize
    if not begins:
        raise ValueError("no record variables")
    return min(begins), recsize


def write_netcdf(path: str | Path, positions_ang: np.ndarray, cell_lengths: np.ndarray | None,
                 cell_angles: np.ndarray | None, time_ps: np.ndarray) -> None:
    """Write a whole trajectory at once (temporary file, then rename: never a half-written file).

    Parameters
    ----------
    path : str or Path
    positions_ang : (F, N, 3) array, Å
    cell_lengths : (F, 3) array, Å, or None for a non-periodic system
    cell_angles : (F, 3) array, degree, or None
    time_ps : (F,) array, ps
    """
    positions_ang = np.asarray(positions_ang, dtype=float)
    if positions_ang.ndim != 3 or positions_ang.shape[2] != 3:
        raise ValueError(f"positions must have shape (frames, atoms, 3), got {positions_ang.shape}")
    n_frames, n_atoms = positions_ang.shape[:2]
    periodic = cell_lengths is not None
    if len(time_ps) != n_frames or (periodic and (len(cell_lengths) != n_frames or len(cell_angles) != n_frames)):
        raise ValueError("positions, time and cell arrays must have the same number of frames")
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with AmberNetCDFWriter(tmp, n_atoms, periodic=periodic) as w:
        for i in range(n_frames):
            w.write_frame(positions_ang[i], float(time_ps[i]), cell_lengths[i] if periodic else None,
                          cell_angles[i] if periodic else None)
    os.replace(tmp, path)


def ipi_frames(path: str | Path, start: int = 0):
    """Yield ``(step, positions Å (N,3), cell lengths Å, cell angles deg)`` from an i-PI position trajectory
    (format ``xyz`` in any units, or ``ase``/extxyz), from byte offset ``start`` (a frame's first line) on. A
    truncated last frame (crash mid-write) ends the iteration with a warning."""
    from ase.geometry import cell_to_cellpar

    path = Path(path)
    if path.suffix == ".extxyz":
        import ase.io
        from ase.io.extxyz import XYZError

        with open(path) as fh:
            fh.seek(start)
            try:
                for atoms in ase.io.iread(fh, format="extxyz"):
                    m = re.search(r"Step:\s+(\d+)", str(atoms.info.get("ipi_comment", "")))
                    cellpar = cell_to_cellpar(atoms.cell.array)
                    yield (int(m.group(1)) if m else None), atoms.positions, cellpar[:3], cellpar[3:]
            except (XYZError, ValueError, IndexError) as exc:
                log.warning("%s: stopped at an incomplete frame (%s)", path, exc)
        return

    from ipi.utils.io import iter_file

    bohr_to_ang = 1.0 / BOHR_PER_ANGSTROM          # i-PI's own factor (potentials.core.units takes it from i-PI)
    with open(path) as fh:
        fh.seek(start)
        frames = iter_file("xyz", fh)
        while True:
            try:
                frame = next(frames)
            except StopIteration:
                return
            except (ValueError, IndexError, EOFError) as exc:
                log.warning("%s: stopped at an incomplete frame (%s)", path, exc)
                return
            if np.any(np.asarray(frame["atoms"].names) == ""):     # i-PI's reader pads a short frame
                log.warning("%s: stopped at an incomplete frame", path)
                return
            m = re.search(r"Step:\s+(\d+)", frame["comment"])
            # i-PI's h has the cell vectors as columns (bohr); positions are bohr after process_units
            cellpar = cell_to_cellpar(frame["cell"].h.T * bohr_to_ang)
            pos = frame["atoms"].q.reshape(-1, 3) * bohr_to_ang
            yield (int(m.group(1)) if m else None), pos, cellpar[:3], cellpar[3:]


def ipi_to_netcdf(src: str | Path, dst: str | Path, *, timestep_ps: float, periodic: bool,
                  append: bool = False, start: int = 0) -> int:
    """Convert an i-PI position trajectory to AMBER NetCDF; returns the number of frames written.

    Parameters
    ----------
    src : i-PI trajectory (``*.xyz`` or ``*.extxyz``)
    dst : NetCDF file
    timestep_ps : float, ps
        MD time step; frame time = step × timestep (steps from the i-PI comment lines).
    periodic : bool
        Store the cell; False for clusters (i-PI's box is then a dummy).
    append : bool
        Extend an existing ``dst``, skipping frames not later than its last time (a resumed run).
    start : int
        Byte offset in ``src`` of the first frame to read (:func:`driver.tails.frame_offset`), so that appending
        reads only what is new.
    """
    dst = Path(dst)
    tmp = dst if append else dst.with_name(f".{dst.name}.tmp")
    writer = None
    n = 0
    try:
        for k, (step, pos, lengths, angles) in enumerate(ipi_frames(src, start)):
            if writer is None:
                writer = AmberNetCDFWriter(tmp, len(pos), periodic=periodic, append=append)
                t_last = writer.last_time
                # times are float32 in the file: at 10 ns their spacing is already ~2 time steps of 0.5 fs
                tol = max(0.5 * timestep_ps, 2.0 * float(np.spacing(np.float32(t_last or 0.0))))
            t = (step if step is not None else k) * timestep_ps
            if t_last is not None and t < t_last + tol:
                continue
            writer.write_frame(pos, t, lengths, angles)
            n += 1
    finally:
        if writer is not None:
            writer.close()
    if writer is not None and not append:
        os.replace(tmp, dst)
    return n


# --------------------------------------------------------------------------- properties table
_UNIT_SUFFIX = {"picosecond": "ps", "femtosecond": "fs", "kiloj/mol": "kjmol", "electronvolt": "eV",
                "kelvin": "K", "angstrom": "A", "atomic_unit": "au", "j/mol": "jmol", "cal/mol": "calmol"}


_HEADER = re.compile(r"#\s*(?:column|cols\.)\s+(\d+)(?:-(\d+))?\s*-->\s*([^\s{(]+)(?:\{([^}]+)\})?"
                     r"(?:\(([^)]*)\))?(?:\{([^}]+)\})?")


def parse_header_line(line: str) -> tuple[int, int, str, str] | None:
    """One ``# column 3 --> conserved{kiloj/mol} : ...`` header line of an i-PI properties file as
    ``(first column (0-based), end column (exclusive), label, unit)``; None for other lines."""
    m = _HEADER.match(line)
    if m is None:
        return None
    start, end, name, u1, args, u2 = m.groups()
    label = name + (f"({args})" if args is not None else "")
    return int(start) - 1, int(end or start), label, u2 or u1 or ""


def read_properties(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Read an i-PI properties file: ``({column label: values}, {column label: unit})``.

    Labels are i-PI's, e.g. ``conserved`` or ``pot_component_raw(0)``. Partly written last lines are
    skipped (the file may still be growing).
    """
    cols: list[tuple[int, int, str, str]] = []
    rows: list[bytes] = []
    with open(path, "rb") as fh:
        for raw in fh:
            if raw.startswith(b"#"):
                col = parse_header_line(raw.decode(errors="replace"))
                if col is not None:
                    cols.append(col)
            else:
                rows.append(raw)
    return _columns(cols, rows)


def properties_header(path: str | Path) -> list[tuple[int, int, str, str]]:
    """The columns of an i-PI properties file (see `parse_header_line`), from its leading header lines only."""
    cols = []
    with open(path, "rb") as fh:
        for raw in fh:
            if not raw.startswith(b"#"):
                break
            col = parse_header_line(raw.decode(errors="replace"))
            if col is not None:
                cols.append(col)
    return cols


def _columns(cols: list[tuple[int, int, str, str]], lines: list[bytes]
             ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Values and units of the complete rows among ``lines`` of a table with columns ``cols``."""
    rows: list[list[float]] = []
    for line in lines:
        if line.endswith(b"\n") and line.strip():
            try:
                rows.append([float(x) for x in line.split()])
            except ValueError:
                continue
    width = max((c[1] for c in cols), default=0)
    data = np.array([r for r in rows if len(r) >= width], dtype=float).reshape(-1, width)
    values = {label: data[:, a:b].squeeze(axis=1) if b - a == 1 else data[:, a:b] for a, b, label, _ in cols}
    units = {label: unit for _, _, label, unit in cols}
    return values, units


def csv_column(label: str, unit: str, components: list[str] | None = None) -> str:
    """Plain column name for an i-PI property: ``conserved`` + kiloj/mol -> ``conserved_kjmol``;
    ``pot_component_raw(1)`` with components ['mm', 'ml'] -> ``pot_ml_kjmol``."""
    m = re.fullmatch(r"pot_component(_raw)?\((\d+)\)", label)
    if m and components and int(m.group(2)) < len(components):
        label = f"pot_{components[int(m.group(2))]}" + ("" if m.group(1) else "_weighted")
    label = re.sub(r"[^A-Za-z0-9_]+", "_", label).strip("_")
    if unit:
        label += "_" + _UNIT_SUFFIX.get(unit, re.sub(r"[^A-Za-z0-9]+", "", unit))
    return label


def write_properties_csv(src: str | Path, dst: str | Path, components: list[str] | None = None,
                         rows: list[bytes] | None = None) -> int:
    """Rewrite an i-PI properties file as CSV with plain column names (see `csv_column`); returns rows.

    ``rows``: only these data rows of ``src`` (the new ones of a continued run), appended to ``dst``, which must
    have the same header (ValueError otherwise)."""
    if rows is None:
        values, units = read_properties(src)
    else:
        values, units = _columns(properties_header(src), rows)
    header: list[str] = []
    columns: list[np.ndarray] = []
    for label, v in values.items():
        name = csv_column(label, units[label], components)
        if v.ndim == 1:
            header.append(name)
            columns.append(v)
        else:
            header += [f"{name}_{j}" for j in range(v.shape[1])]
            columns += list(v.T)
    n = len(columns[0]) if columns else 0
    if rows is not None:
        with open(dst, newline="") as fh:
            if next(csv.reader(fh), None) != header:
                raise ValueError(f"{dst} has other columns than {src}; it cannot be appended to")
    with open(dst, "a" if rows is not None else "w", newline="") as fh:
        w = csv.writer(fh)
        if rows is None:
            w.writerow(header)
        for i in range(n):
            w.writerow([f"{c[i]:.10g}" for c in columns])
    return n

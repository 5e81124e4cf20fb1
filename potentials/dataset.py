"""QM/MM reference dataset on disk: NetCDF4, ragged, append-only, resumable.

Layout (frames differ in atom and point-charge counts)::

    dimensions  frame (unlimited), atom (unlimited), charge (unlimited), xyz = 3, quad = 6
    per frame   frame_id, trajectory, solute, kind, environment, split (strings), atom_start, n_atoms,
                charge_start, n_charges, total_charge, temperature, displaced, block, index_in_block,
                energy, dipole, quadrupole, scf_cycles, seconds, complete
    per atom    numbers, positions, forces
    per charge  mm_positions, mm_charges, mm_forces

Units are in each variable's ``units`` attribute: Å, eV, eV/Å, e, e·Å, e·Å², K, s. ``mm_positions``,
``mm_charges`` and ``mm_forces`` are float32 (about 28 bytes per point charge instead of 56; the labeller
rounds the charges and their positions to float32 *before* the QM calculation, so the stored environment is
exactly the one that was computed). Everything else is float64.

The growing file is uncompressed: HDF5 does not reuse the space of a compressed chunk that is rewritten, so
appending frame by frame to compressed variables leaks several times the data size. :func:`compact` writes a
packed, compressed copy with fixed dimensions (used for the small dataset shipped with the tests).

Crash safety: the writer opens the file, appends one frame and closes it again, so a job killed between
frames leaves a consistent file. Within a frame the ``complete`` flag is written last; readers and the
writer only trust the leading run of complete frames, and the next append overwrites a torn one.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Mapping
from pathlib import Path

import netCDF4
import numpy as np

from potentials.core.errors import SetupError

SPLITS = ("train", "val", "test")
STRING_FIELDS = ("frame_id", "trajectory", "solute", "kind", "environment", "split")
FRAME_FIELDS = {  # name: (dtype, units, extra dims)
    "total_charge": ("i4", "e", ()),
    "temperature": ("f8", "K", ()),
    "displaced": ("i1", "1", ()),
    "block": ("i4", "1", ()),
    "index_in_block": ("i4", "1", ()),
    "energy": ("f8", "eV", ()),
    "dipole": ("f8", "e*angstrom", ("xyz",)),
    "quadrupole": ("f8", "e*angstrom^2", ("quad",)),
    "scf_cycles": ("i4", "1", ()),
    "seconds": ("f8", "s", ()),
}
ATOM_FIELDS = {"numbers": ("i1", "1", ()), "positions": ("f8", "angstrom", ("xyz",)),
               "forces": ("f8", "eV/angstrom", ("xyz",))}
CHARGE_FIELDS = {"mm_positions": ("f4", "angstrom", ("xyz",)), "mm_charges": ("f4", "e", ()),
                 "mm_forces": ("f4", "eV/angstrom", ("xyz",))}
DESCRIPTIONS = {
    "energy": "QM/MM total energy of the QM zone in the field of the point charges: electrons + QM nuclei + "
              "their Coulomb interaction with the charges (no MM-MM term)",
    "forces": "-dE/dR on the QM atoms",
    "mm_forces": "-dE/dR on each point charge at fixed charge value (scaled charge times the QM field)",
    "dipole": "dipole of QM electrons + nuclei about the geometric centroid of the QM atoms",
    "quadrupole": "[xx, yy, zz, xy, yz, zx] of sum q r r (electrons + nuclei) about the QM centroid, "
                  "diagonal made traceless by subtracting its mean (AIMNet2 convention)",
    "mm_charges": "embedded MM charges as returned by coupling.embedding.embedded_charges (switch-scaled)",
    "mm_positions": "embedded MM charge positions (periodic images chosen by the embedding)",
    "kind": "periodic | droplet | cluster | displaced | gas",
    "environment": "periodic | droplet | cluster | gas (the MD setting the frame comes from)",
    "solute": "the QM zone: the solute's residue name, or e.g. MOH+3HOH with its 3 nearest waters",
    "trajectory": "MD block the frame belongs to; the split is by trajectory",
    "displaced": "1 if the QM atoms were displaced randomly from the MD frame",
    "complete": "1 once every variable of the frame was written",
}


def _n_complete(nc: netCDF4.Dataset) -> int:
    flags = np.ma.filled(nc.variables["complete"][:], 0)
    bad = np.flatnonzero(flags != 1)
    return int(bad[0]) if len(bad) else len(flags)


class DatasetWriter:
    """Appends labelled frames to a NetCDF4 file; create it with global provenance attributes first."""

    def __init__(self, path: str | os.PathLike, attributes: Mapping[str, object] | None = None,
                 wait_s: float = 600.0):
        self.path = Path(path)
        self.wait_s = wait_s            # how long to wait for a reader's lock before giving up
        if not self.path.exists():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._create(attributes or {})
        else:
            with _folder_lock(self.path):        # jobs starting at once: one rewrites, the others see the result
                with _open(self.path, "r", wait_s) as nc:
                    missing = [v for v in ("complete", "energy", "mm_forces") if v not in nc.variables]
                    fixed = not nc.dimensions["frame"].isunlimited()
                if missing:
                    raise SetupError(f"{self.path} is not a QM/MM dataset (no {missing}); choose another --out")
                if fixed:               # a compacted copy (e.g. shipped): rewritten appendable, frames kept
                    ds = Dataset.open(self.path, wait_s)
                    self._create({**ds.attrs, **(attributes or {})}, ds)

    def _create(self, attributes: Mapping[str, object], ds: "Dataset | None" = None) -> None:
        """Write a new, appendable file (unlimited dimensions) in one step: a temporary file renamed over
        ``self.path``; with ``ds``, its complete frames are copied in first."""
        tmp = self.path.with_suffix(f"{self.path.suffix}.{os.getpid()}.tmp")      # per process: jobs may race
        with netCDF4.Dataset(tmp, "w", format="NETCDF4") as nc:
            for d in ("frame", "atom", "charge"):
                nc.createDimension(d, None)
            nc.createDimension("xyz", 3)
            nc.createDimension("quad", 6)
            for name in STRING_FIELDS:
                nc.createVariable(name, str, ("frame",))
            for name in ("atom_start", "charge_start"):
                nc.createVariable(name, "i8", ("frame",))
            for name in ("n_atoms", "n_charges"):
                nc.createVariable(name, "i4", ("frame",))
            nc.createVariable("complete", "i1", ("frame",), fill_value=0)
            for dim, fields, chunk in (("frame", FRAME_FIELDS, 64), ("atom", ATOM_FIELDS, 1024),
                                       ("charge", CHARGE_FIELDS, 8192)):
                for name, (dtype, units, extra) in fields.items():
                    v = nc.createVariable(name, dtype, (dim, *extra), zlib=False,
                                          chunksizes=(chunk, *([3 if e == "xyz" else 6 for e in extra])))
                    v.units = units
            for name, text in DESCRIPTIONS.items():
                nc.variables[name].description = text
            nc.Conventions = "ipi-mlmm QM/MM reference data v1"
            for key, value in attributes.items():
                nc.setncattr(key, value if not isinstance(value, bool) else int(value))
            if ds is not None and ds.n:
                for dim, arrays in (("frame", ds.meta), ("atom", ds.atoms), ("charge", ds.charges)):
                    for name, data in arrays.items():
                        if name not in nc.variables:        # an extra variable (e.g. a trainer's gas_energy)
                            v = nc.createVariable(name, str if data.dtype == object else data.dtype,
                                                  ds.var_dims[name])
                            v.setncatts({k: a for k, a in ds.var_attrs[name].items() if k != "_FillValue"})
                        nc[name][:len(data)] = data
                nc["complete"][:ds.n] = 1
        if ds is not None:
            os.replace(tmp, self.path)
            return
        try:                # a new file: only the first of several jobs starting at once creates it
            os.link(tmp, self.path)
        except FileExistsError:
            pass
        finally:
            tmp.unlink()

    def add_history(self, line: str) -> None:
        """Append a line to the global ``history`` attribute (one per labelling session)."""
        with _open(self.path, "a", self.wait_s) as nc:
            old = nc.getncattr("history") if "history" in nc.ncattrs() else ""
            nc.setncattr("history", (old + "\n" if old else "") + line)

    def frame_ids(self) -> set[str]:
        """Ids of the complete frames already in the file (to skip them on restart)."""
        return frame_ids(self.path, self.wait_s)

    def append(self, frame: Mapping[str, object]) -> int:
        """Write one frame (a dict with every field of the layout); returns its index.

        Shapes: numbers (n,), positions/forces (n,3); mm_positions/mm_forces (m,3), mm_charges (m,) (m may be
        0); dipole (3,); quadrupole (6,); strings for the string fields; scalars for the rest.
        """
        numbers = np.asarray(frame["numbers"])
        n = len(numbers)
        mq = np.asarray(frame["mm_charges"], dtype=np.float32).reshape(-1)
        m = len(mq)
        if frame["split"] not in SPLITS:
            raise SetupError(f"split {frame['split']!r} of frame {frame['frame_id']} is not one of {SPLITS}")
        with _open(self.path, "a", self.wait_s) as nc:
            i = _n_complete(nc)
            a0 = c0 = 0
            if i:
                a0 = int(nc["atom_start"][i - 1]) + int(nc["n_atoms"][i - 1])
                c0 = int(nc["charge_start"][i - 1]) + int(nc["n_charges"][i - 1])
            nc["complete"][i] = 0
            nc["numbers"][a0:a0 + n] = numbers
            nc["positions"][a0:a0 + n] = np.asarray(frame["positions"], dtype=np.float64).reshape(n, 3)
            nc["forces"][a0:a0 + n] = np.asarray(frame["forces"], dtype=np.float64).reshape(n, 3)
            if m:
                nc["mm_charges"][c0:c0 + m] = mq
                nc["mm_positions"][c0:c0 + m] = np.asarray(frame["mm_positions"], dtype=np.float32).reshape(m, 3)
                nc["mm_forces"][c0:c0 + m] = np.asarray(frame["mm_forces"], dtype=np.float32).reshape(m, 3)
            for name in STRING_FIELDS:
                nc[name][i] = str(frame[name])
            nc["atom_start"][i], nc["n_atoms"][i] = a0, n
            nc["charge_start"][i], nc["n_charges"][i] = c0, m
            for name in FRAME_FIELDS:
                nc[name][i] = frame[name]
            nc.sync()
            nc["complete"][i] = 1
        return i


@contextlib.contextmanager
def _folder_lock(path: Path):
    """An exclusive lock (flock) on the folder holding ``path``, for the check-and-rewrite of a compacted file:
    the file itself cannot be flocked (HDF5 locks it its own way), and a lock file would be left behind."""
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)                     # releases the lock


def frame_ids(path: str | os.PathLike, wait_s: float = 120.0) -> set[str]:
    """Ids of the complete frames of a dataset file (read-only: a compacted file stays as it is)."""
    with _open(Path(path), "r", wait_s) as nc:
        n = _n_complete(nc)
        return set(nc.variables["frame_id"][:n]) if n else set()


class Dataset:
    """Read access: ``Dataset.open(path)``, ``len(ds)``, ``ds.frame(i)``, ``ds.indices('train')``, ``ds.solute(i)``.

    The whole file is read into memory at open and closed again at once (a few hundred MB at most), so a
    reader never holds the HDF5 lock that a running ``mlmm label`` needs to append. ``meta`` holds the
    per-frame fields, ``atoms`` / ``charges`` the ragged per-atom / per-charge arrays (slice them with
    ``meta['atom_start']``/``meta['n_atoms']`` and ``meta['charge_start']``/``meta['n_charges']``).
    """

    def __init__(self, nc: netCDF4.Dataset):
        nc.set_auto_mask(False)
        self.n = n = _n_complete(nc)
        self.attrs = {k: nc.getncattr(k) for k in nc.ncattrs()}
        self.var_attrs = {name: {k: v.getncattr(k) for k in v.ncattrs()} for name, v in nc.variables.items()}
        self.var_dims = {name: v.dimensions for name, v in nc.variables.items()}
        self.fixed_dims = {d: len(nc.dimensions[d]) for d in nc.dimensions if d not in ("frame", "atom", "charge")}
        self.units = {name: a["units"] for name, a in self.var_attrs.items() if "units" in a}
        # every variable is loaded by its first dimension, so extra ones (e.g. a trainer's gas_energy) come along
        self.meta: dict[str, np.ndarray] = {}
        self.atoms: dict[str, np.ndarray] = {}
        self.charges: dict[str, np.ndarray] = {}
        for name in ("atom_start", "n_atoms", "charge_start", "n_charges"):
            self.meta[name] = np.asarray(nc.variables[name][:n])
        na = int(self.meta["atom_start"][-1] + self.meta["n_atoms"][-1]) if n else 0
        nq = int(self.meta["charge_start"][-1] + self.meta["n_charges"][-1]) if n else 0
        for name, v in nc.variables.items():
            dim = v.dimensions[0]
            if name == "complete" or dim not in ("frame", "atom", "charge"):
                continue
            stop = {"frame": n, "atom": na, "charge": nq}[dim]
            data = np.asarray(v[:stop], dtype=object) if v.dtype == str else np.asarray(v[:stop])
            {"frame": self.meta, "atom": self.atoms, "charge": self.charges}[dim][name] = data

    @classmethod
    def open(cls, path: str | os.PathLike, wait_s: float = 120.0) -> "Dataset":
        path = Path(path)
        if not path.exists():
            raise SetupError(f"dataset {path} does not exist; create it with `mlmm label --out {path}`")
        with _open(path, "r", wait_s) as nc:
            if "complete" not in nc.variables:
                raise SetupError(f"{path} is not a QM/MM dataset written by potentials.dataset")
            return cls(nc)

    def close(self) -> None:
        """Nothing to release (the file is closed after reading); kept for ``with`` blocks."""

    def __enter__(self) -> "Dataset":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __len__(self) -> int:
        return self.n

    def _check(self, i: int) -> int:
        if not -self.n <= i < self.n:
            raise IndexError(f"frame {i} out of range for a dataset of {self.n} frames")
        return i % self.n

    def frame(self, i: int) -> dict[str, np.ndarray]:
        """All fields of frame ``i`` as numpy arrays (strings as str); units as in :attr:`units`."""
        i = self._check(i)
        out = {name: self.meta[name][i] for name in self.meta}
        a0, n = int(out["atom_start"]), int(out["n_atoms"])
        c0, m = int(out["charge_start"]), int(out["n_charges"])
        out.update({name: v[a0:a0 + n] for name, v in self.atoms.items()})
        out.update({name: v[c0:c0 + m] for name, v in self.charges.items()})
        return out

    def indices(self, split: str) -> np.ndarray:
        if split not in SPLITS:
            raise SetupError(f"unknown split {split!r}; choose one of {SPLITS}")
        return np.flatnonzero(self.meta["split"] == split)

    def solute(self, i: int) -> str:
        return str(self.meta["solute"][self._check(i)])


def compact(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy the complete frames of ``src`` into a new, zlib-compressed file ``dst`` with fixed dimensions."""
    ds = Dataset.open(src)
    with netCDF4.Dataset(Path(dst), "w", format="NETCDF4") as out:
        sizes = {"frame": ds.n, "atom": len(ds.atoms["numbers"]), "charge": len(ds.charges["mm_charges"])}
        for d, size in (*sizes.items(), *ds.fixed_dims.items()):
            out.createDimension(d, size)
        for name, attrs in ds.var_attrs.items():
            if name in ds.atoms:
                data, dim = ds.atoms[name], "atom"
            elif name in ds.charges:
                data, dim = ds.charges[name], "charge"
            elif name == "complete":
                data, dim = np.ones(ds.n, np.int8), "frame"
            else:
                data, dim = ds.meta[name], "frame"
            is_str = data.dtype == object
            w = out.createVariable(name, str if is_str else data.dtype, ds.var_dims[name], zlib=not is_str,
                                   complevel=6)
            w.setncatts({k: v for k, v in attrs.items() if k != "_FillValue"})
            if len(data):
                w[:] = data
        out.setncatts(ds.attrs)


def _open(path: Path, mode: str, wait_s: float) -> netCDF4.Dataset:
    """Open a NetCDF4 file, retrying while another process holds the HDF5 lock (reader vs. appending writer)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return netCDF4.Dataset(path, mode)
        except OSError as exc:
            with open(path, "rb") as fh:
                is_hdf5 = fh.read(8) == b"\x89HDF\r\n\x1a\n"
            if not is_hdf5 or time.monotonic() > deadline:
                raise SetupError(f"cannot open {path} ({exc}): locked by another process for {wait_s:.0f} s or "
                                 "not a NetCDF4 file; if it is corrupt, restore a copy or delete it") from exc
            time.sleep(0.5)

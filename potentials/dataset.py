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

import os
from collections.abc import Mapping
from pathlib import Path

import netCDF4
import numpy as np

from driver.errors import SetupError

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
    "kind": "periodic | droplet | displaced | gas",
    "environment": "periodic | droplet | gas (the MD setting the frame comes from)",
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

    def __init__(self, path: str | os.PathLike, attributes: Mapping[str, object] | None = None):
        self.path = Path(path)
        if not self.path.exists():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._create(attributes or {})
        else:
            try:
                with netCDF4.Dataset(self.path, "r") as nc:
                    missing = [v for v in ("complete", "energy", "mm_forces") if v not in nc.variables]
            except OSError as exc:
                raise SetupError(f"{self.path} is not a readable NetCDF4 file ({exc}); restore the .bak copy "
                                 "next to it or delete it to start over") from exc
            if missing:
                raise SetupError(f"{self.path} is not a QM/MM dataset (no {missing}); choose another --out")

    def _create(self, attributes: Mapping[str, object]) -> None:
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
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
        os.replace(tmp, self.path)

    def frame_ids(self) -> set[str]:
        """Ids of the complete frames already in the file (to skip them on restart)."""
        with netCDF4.Dataset(self.path, "r") as nc:
            n = _n_complete(nc)
            return set(nc.variables["frame_id"][:n]) if n else set()

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
        with netCDF4.Dataset(self.path, "a") as nc:
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


class Dataset:
    """Read access. ``Dataset.open(path)``; ``len(ds)``; ``ds.frame(i)``; ``ds.indices('train')``.

    Per-frame scalars and strings are loaded at open; ``frame(i)`` reads that frame's atoms and charges.
    """

    def __init__(self, nc: netCDF4.Dataset):
        self._nc = nc
        self.n = _n_complete(nc)
        self.attrs = {k: nc.getncattr(k) for k in nc.ncattrs()}
        self.units = {name: getattr(v, "units") for name, v in nc.variables.items() if hasattr(v, "units")}
        sl = slice(0, self.n)
        self.meta: dict[str, np.ndarray] = {}
        for name in (*STRING_FIELDS, "atom_start", "n_atoms", "charge_start", "n_charges", *FRAME_FIELDS):
            v = nc.variables[name]
            self.meta[name] = np.asarray(v[sl], dtype=object if name in STRING_FIELDS else None) \
                if self.n else np.zeros((0, *v.shape[1:]), dtype=object if name in STRING_FIELDS else v.dtype)

    @classmethod
    def open(cls, path: str | os.PathLike) -> "Dataset":
        path = Path(path)
        if not path.exists():
            raise SetupError(f"dataset {path} does not exist; create it with `mlmm label --out {path}`")
        try:
            nc = netCDF4.Dataset(path, "r")
        except OSError as exc:
            raise SetupError(f"cannot read dataset {path}: {exc}") from exc
        if "complete" not in nc.variables:
            nc.close()
            raise SetupError(f"{path} is not a QM/MM dataset written by potentials.dataset")
        nc.set_auto_mask(False)
        return cls(nc)

    def close(self) -> None:
        self._nc.close()

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
        for name in ATOM_FIELDS:
            out[name] = np.asarray(self._nc.variables[name][a0:a0 + n])
        for name in CHARGE_FIELDS:
            out[name] = np.asarray(self._nc.variables[name][c0:c0 + m])
        return out

    def indices(self, split: str) -> np.ndarray:
        if split not in SPLITS:
            raise SetupError(f"unknown split {split!r}; choose one of {SPLITS}")
        return np.flatnonzero(self.meta["split"] == split)

    def solute(self, i: int) -> str:
        return str(self.meta["solute"][self._check(i)])


def compact(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy the complete frames of ``src`` into a new, zlib-compressed file ``dst`` with fixed dimensions."""
    with Dataset.open(src) as ds, netCDF4.Dataset(Path(dst), "w", format="NETCDF4") as out:
        n = len(ds)
        na = int(ds.meta["atom_start"][-1] + ds.meta["n_atoms"][-1]) if n else 0
        nq = int(ds.meta["charge_start"][-1] + ds.meta["n_charges"][-1]) if n else 0
        for d, size in (("frame", n), ("atom", na), ("charge", nq), ("xyz", 3), ("quad", 6)):
            out.createDimension(d, size)
        for name, v in ds._nc.variables.items():
            dims = v.dimensions
            w = out.createVariable(name, str if v.dtype == str else v.dtype, dims,
                                   zlib=v.dtype != str, complevel=6)
            w.setncatts({k: v.getncattr(k) for k in v.ncattrs()})
            stop = {"frame": n, "atom": na, "charge": nq}[dims[0]]
            if stop:
                w[:stop] = v[:stop]
        out.setncatts(ds.attrs)

"""Labelled frames for training and evaluation: one split of a QM/MM dataset as dicts (Å, eV, e), a snapshot
of a dataset that may still be growing, and flat batches of frames for one network call
(:mod:`potentials.train`, :mod:`potentials.evaluate`).
"""
from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from potentials.core.errors import SetupError

log = logging.getLogger(__name__)

_FRAME_KEYS = ("numbers", "total_charge", "positions", "mm_positions", "mm_charges", "energy", "forces",
               "mm_forces", "dipole")


def load_frames(path: str | Path, split: str | None = None, limit: int | None = None,
                indices: list[int] | None = None) -> list[dict]:
    """Frames of one split as dicts of numpy arrays (Å, eV, e), plus "solute", "index" and "charge"."""
    from potentials.dataset import Dataset

    ds = Dataset.open(str(path))
    try:
        if indices is None:
            indices = list(range(len(ds))) if split in (None, "all") else list(ds.indices(split))
        if limit is not None:
            indices = indices[:limit]
        frames = []
        for i in indices:
            f = ds.frame(int(i))
            missing = [k for k in _FRAME_KEYS if k not in f]
            if missing:
                raise SetupError(f"{path}: frame {i} lacks {missing}; is this a QM/MM dataset from `mlmm label`?")
            frames.append({**f, "index": int(i)})
    finally:
        close = getattr(ds, "close", None)
        if close:
            close()
    return frames


def snapshot_dataset(path: str, dest: str, tries: int = 5) -> str:
    """Copy a dataset that may be growing and check that the copy opens (HDF5 can be mid-write)."""
    from potentials.dataset import Dataset

    for attempt in range(tries):
        shutil.copyfile(path, dest)
        try:
            ds = Dataset.open(dest)
            n = len(ds)
            getattr(ds, "close", lambda: None)()
            log.info("dataset snapshot %s: %d frames", dest, n)
            return dest
        except Exception as exc:          # noqa: BLE001 - any read error of a half-written file: retry
            log.warning("snapshot of %s unreadable (%s); retrying", path, exc)
            time.sleep(2.0 + attempt)
    raise SetupError(f"could not take a readable snapshot of {path} after {tries} tries")


@dataclass
class Batch:
    """Frames concatenated for one network call (flat batching). Lengths: N ML atoms, M MM charges, B frames."""

    numbers: torch.Tensor        # [N] long
    positions: torch.Tensor      # [N,3] Å
    mol_idx: torch.Tensor        # [N] long
    charge: torch.Tensor         # [B] e
    n_atoms: torch.Tensor        # [B]
    ml_off: list[int]
    mm_off: list[int]
    mm_positions: torch.Tensor   # [M,3] Å
    mm_charges: torch.Tensor     # [M] e
    energy: torch.Tensor         # [B] eV float64
    forces: torch.Tensor         # [N,3] eV/Å
    mm_forces: torch.Tensor      # [M,3] eV/Å
    dipole: torch.Tensor         # [B,3] e·Å
    atomic_charges: torch.Tensor | None
    solute: list[str]


def collate(frames: list[dict], device: torch.device | str = "cpu", dtype=torch.float32) -> Batch:
    def cat(key, dt=dtype):
        return torch.as_tensor(np.concatenate([np.asarray(f[key]).reshape(-1, *np.shape(f[key])[1:])
                                               for f in frames]), dtype=dt, device=device)

    n = [len(f["numbers"]) for f in frames]
    m = [len(f["mm_charges"]) for f in frames]
    q_at = None
    if all(f.get("charges") is not None and np.size(f.get("charges")) == len(f["numbers"]) for f in frames):
        q_at = cat("charges")
    return Batch(
        numbers=cat("numbers", torch.long),
        positions=cat("positions"),
        mol_idx=torch.repeat_interleave(torch.arange(len(frames), device=device), torch.tensor(n, device=device)),
        charge=torch.tensor([float(f["total_charge"]) for f in frames], dtype=dtype, device=device),
        n_atoms=torch.tensor(n, dtype=torch.float64, device=device),
        ml_off=np.concatenate([[0], np.cumsum(n)]).tolist(),
        mm_off=np.concatenate([[0], np.cumsum(m)]).tolist(),
        mm_positions=cat("mm_positions").reshape(-1, 3),
        mm_charges=cat("mm_charges").reshape(-1),
        energy=torch.tensor([float(f["energy"]) for f in frames], dtype=torch.float64, device=device),
        forces=cat("forces"),
        mm_forces=cat("mm_forces").reshape(-1, 3),
        dipole=torch.as_tensor(np.stack([f["dipole"] for f in frames]), dtype=dtype, device=device),
        atomic_charges=q_at,
        solute=[str(f.get("solute", "")) for f in frames],
    )


def _batches(n: int, size: int, seed: int, epoch: int, shuffle: bool) -> list[np.ndarray]:
    """Batch indices for one epoch; the order depends only on (seed, epoch), so resuming repeats it."""
    order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
    return [order[i:i + size] for i in range(0, n, size)]

"""Held-out errors of a trained model: ``mlmm evaluate MODEL DATASET`` and the test sets it reads.

:func:`evaluate` gives MAEs per solute for each embedding scheme it is handed (``mlmm evaluate``,
:mod:`driver.pipeline`, hands the electrostatic embedding, what the ML client runs, and the mechanical
baseline, the same network in vacuum plus the Coulomb energy of fixed charges), with the batches
of :mod:`potentials.batches` and the predictions of :mod:`potentials.train`.

The mechanical baseline runs the way mechanical mode runs in a simulation (``[coupling] mechanical_charges =
"model"``, the default: :meth:`coupling.schemes.MechanicalEmbedding.fixed_charges`): the ML atoms carry the
model's vacuum charges at ONE geometry, the start, held fixed for the whole run. Here the start of each trajectory
(the dataset's ``trajectory``: one MD block of one solute) is its first MD frame (lowest ``index_in_block``, not
displaced; :func:`mechanical_charges`), and every frame of the trajectory, displaced ones included, uses those
charges; not the charges of each frame's own geometry, which no run uses. Its dipole is that of the fixed
charges at the frame's geometry (what the MM client's electrostatics sees).

``python -m potentials.evaluate SRC DST [--per-solute N]`` writes a held-out set with paired vacuum QM energies,
so that ``mlmm evaluate`` can report the ML–MM interaction energy error (E_int column).
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from potentials.core.units import KCALMOL_PER_EV

from .batches import _batches, collate, load_frames
from .train import predict

if TYPE_CHECKING:
    from potentials.core.contracts import TrainingScheme

log = logging.getLogger(__name__)


METRICS = ("energy", "forces", "mm_forces", "dipole", "e_int")
# schemes whose ML charges a simulation fixes once, at the start (coupling.schemes.MechanicalEmbedding): evaluated
# with the charges of :func:`mechanical_charges`
FIXED_CHARGE_SCHEMES = ("mechanical",)
BASELINE_NOTE = ("mechanical: the network in vacuum + Coulomb of fixed ML charges, as `[coupling] mechanical_charges "
                 "= \"model\"` (the default) runs: the model's vacuum charges at the first MD frame of each "
                 "trajectory, held fixed for all its frames")


def trajectory_key(frame: dict) -> tuple[str, str, int]:
    """The trajectory a frame belongs to (dataset variable ``trajectory``; the solute for datasets without it)."""
    solute = str(frame.get("solute", "?"))
    return str(frame.get("trajectory", solute)), solute, len(frame["numbers"])


def vacuum_charges(model: torch.nn.Module, frame: dict, device="cpu", dtype=None) -> np.ndarray:
    """The model's atomic charges (e) of a frame's ML atoms in vacuum (φ = E = 0); zeros for a model without."""
    dtype = dtype or next(model.parameters()).dtype
    n = len(frame["numbers"])
    pos = torch.as_tensor(np.asarray(frame["positions"]), dtype=dtype, device=device)
    zeros = torch.zeros(n, dtype=dtype, device=device)
    out = model(torch.as_tensor(np.asarray(frame["numbers"], dtype=np.int64), device=device), pos,
                torch.zeros(n, dtype=torch.long, device=device),
                torch.tensor([float(frame["total_charge"])], dtype=dtype, device=device), zeros,
                torch.zeros(n, 3, dtype=dtype, device=device))
    q = out.get("charges")
    return np.zeros(n) if q is None else q.detach().to(torch.float64).cpu().numpy().reshape(-1)


def mechanical_charges(model: torch.nn.Module, frames: list[dict], device="cpu", dtype=None) -> list[np.ndarray]:
    """The fixed ML charges (e) the mechanical baseline uses for each of ``frames``: the model's vacuum charges at
    the start of the frame's trajectory (:func:`trajectory_key`), its first MD frame (lowest ``index_in_block``
    among frames not displaced, then lowest dataset index), as mechanical mode fixes them at a run's start."""
    def order(f: dict) -> tuple:
        return (bool(f.get("displaced", 0)) or f.get("kind") == "displaced", int(f.get("index_in_block", 0)),
                int(f.get("index", 0)))

    starts: dict = {}
    for f in frames:
        key = trajectory_key(f)
        if key not in starts or order(f) < order(starts[key]):
            starts[key] = f
    charges = {key: vacuum_charges(model, f, device, dtype) for key, f in starts.items()}
    return [charges[trajectory_key(f)] for f in frames]


class _FixedCharges(torch.nn.Module):
    """A model whose output ``charges`` are replaced by given fixed charges (the mechanical baseline's)."""

    def __init__(self, model: torch.nn.Module, charges: torch.Tensor):
        super().__init__()
        self.model, self.charges = model, charges

    def forward(self, *args) -> dict:
        out = dict(self.model(*args))
        out["charges"] = self.charges.to(dtype=out["energy"].dtype)
        return out


def offset_removed_mae(errors_by_set) -> float:
    """MAE of signed errors after subtracting each set's own mean: ``errors_by_set`` is an iterable of arrays,
    one per set (solute, zone). The "offset removed" energy MAE of :func:`evaluate` and
    ``tests/bench/energy_residuals.py``."""
    return float(np.mean(np.concatenate([np.abs(np.asarray(e) - np.mean(e)) for e in errors_by_set])))


def evaluate(model: torch.nn.Module, frames: list[dict], device="cpu", batch_size: int = 16,
             gas_energy: dict[int, float] | None = None, *, schemes: "dict[str, TrainingScheme]",
             fixed: tuple[str, ...] = FIXED_CHARGE_SCHEMES) -> dict[str, dict[str, dict[str, float]]]:
    """Errors per solute (and "all") for each embedding scheme of ``schemes`` (name -> scheme object); the
    schemes named in ``fixed`` run with the fixed charges of :func:`mechanical_charges` (module docstring; ``()``:
    the charges of each frame's own geometry, the old baseline).

    Returns ``{mode: {solute: {"n", "energy", "forces", "mm_forces", "dipole"[, "e_int"]}}}`` with MAEs in
    kcal/mol, kcal/mol/Å (per Cartesian component) and e·Å (per component). ``e_int`` is the MAE of the ML–MM
    interaction energy E(embedded) − E(vacuum, same geometry) when ``gas_energy`` gives the reference vacuum
    energy (eV) of a frame by its dataset index; gas-phase frames are left out of it. ``energy_offset_removed``
    (kcal/mol) is the energy MAE after subtracting each solute's mean signed error (for "all": each solute's
    own), the usual measure when a constant per chemical set does not matter (relative energies).
    """
    dtype = next(model.parameters()).dtype
    model.eval()
    acc: dict = {}
    signed: dict = {}                                        # mode -> solute -> signed energy errors (kcal/mol)
    q_fixed = mechanical_charges(model, frames, device, dtype) if any(m in fixed for m in schemes) else None
    for idx in _batches(len(frames), batch_size, 0, 0, shuffle=False):
        sub = [frames[i] for i in idx]
        b = collate(sub, device, dtype)
        gas = predict(model, b, None)["energy"].detach()
        for mode, scheme in schemes.items():
            net = model
            if mode in fixed:
                q = np.concatenate([q_fixed[i] for i in idx])
                net = _FixedCharges(model, torch.as_tensor(q, dtype=torch.float64, device=device))
            p = predict(net, b, scheme)
            e_int = (p["energy"].detach() - gas)
            for k, f in enumerate(sub):
                a0, a1, m0, m1 = b.ml_off[k], b.ml_off[k + 1], b.mm_off[k], b.mm_off[k + 1]
                de = (float(p["energy"][k].detach()) - float(f["energy"])) * KCALMOL_PER_EV
                signed.setdefault(mode, {}).setdefault(f.get("solute", "?"), []).append(de)
                row = {
                    "energy": abs(de),
                    "forces": (p["forces"][a0:a1] - b.forces[a0:a1]).abs().detach().cpu().numpy().ravel(),
                    "mm_forces": (p["mm_forces"][m0:m1] - b.mm_forces[m0:m1]).abs().detach().cpu().numpy().ravel(),
                    "dipole": (p["dipole"][k] - b.dipole[k]).abs().detach().cpu().numpy(),
                }
                if gas_energy is not None and f["index"] in gas_energy and m1 > m0:
                    ref = float(f["energy"]) - gas_energy[f["index"]]
                    row["e_int"] = abs(float(e_int[k]) - ref) * KCALMOL_PER_EV
                for key in (f.get("solute", "?"), "all"):
                    slot = acc.setdefault(mode, {}).setdefault(key, {m: [] for m in METRICS})
                    slot.setdefault("n", 0)
                    slot["n"] += 1
                    for m, v in row.items():
                        slot[m].append(np.atleast_1d(v))
    out: dict = {}
    for mode, per in acc.items():
        out[mode] = {}
        for solute, slot in per.items():
            r = {"n": slot["n"]}
            for m in METRICS:
                v = np.concatenate(slot[m]) if slot[m] else np.zeros(0)
                if v.size:                   # e.g. no MM forces in a gas-phase-only subset
                    scale = 1.0 if m in ("energy", "e_int", "dipole") else KCALMOL_PER_EV
                    r[m] = float(v.mean()) * scale
            sets = signed[mode] if solute == "all" else {solute: signed[mode][solute]}
            r["energy_offset_removed"] = offset_removed_mae(sets.values())
            out[mode][solute] = r
    return out


def format_table(res: dict, fixed: tuple[str, ...] = FIXED_CHARGE_SCHEMES) -> str:
    """Markdown table: one row per solute and embedding mode (in the order of ``res``), and below it which
    charges the mechanical baseline used (when ``res`` has a scheme of ``fixed``)."""
    head = ("| solute | embedding | frames | energy MAE (kcal/mol) | ML force MAE (kcal/mol/Å) | "
            "MM force MAE (kcal/mol/Å) | dipole MAE (e·Å) | E_int MAE (kcal/mol) |")
    lines = [head, "|" + "---|" * 8]
    solutes = sorted(k for k in next(iter(res.values())) if k != "all") + ["all"]
    for s in solutes:
        for mode in res:
            r = res[mode][s]
            cells = [f"{r[m]:.3f}" if m in r else "–" for m in METRICS]
            lines.append(f"| {s} | {mode} | {r['n']} | " + " | ".join(cells) + " |")
    first = next(iter(res))
    lines += ["", f"energy MAE with each solute's mean error removed ({first}, kcal/mol): " + ", ".join(
        f"{s} {res[first][s]['energy_offset_removed']:.3f}" for s in solutes)]
    if any(mode in fixed for mode in res):
        lines += ["", BASELINE_NOTE]
    return "\n".join(lines)


def read_gas_energies(path: str | Path) -> dict[int, float] | None:
    """Optional paired vacuum energies: a variable ``gas_energy`` (eV, NaN where absent) in the dataset."""
    import netCDF4

    with netCDF4.Dataset(str(path)) as nc:
        if "gas_energy" not in nc.variables:
            return None
        e = np.ma.filled(nc.variables["gas_energy"][:].astype(float), np.nan)
    return {i: float(v) for i, v in enumerate(e) if np.isfinite(v)}


def label_gas_energies(frames: list[dict], attrs: dict | None = None) -> dict[int, float]:
    """QM vacuum energy (eV) of each frame's ML geometry, at the dataset's level of theory (PySCF).

    The reference ML–MM interaction energy of a frame is then E_QM/MM − E_QM(vacuum, same geometry).
    Gas-phase frames are their own vacuum energy.
    """
    from tqdm import tqdm

    from potentials.qmmm_reference import LevelOfTheory, label_frame

    attrs = attrs or {}
    level = LevelOfTheory(**{k: type(getattr(LevelOfTheory(), k))(attrs[f"qm_{k}"])
                             for k in ("xc", "basis", "auxbasis", "grid_level") if f"qm_{k}" in attrs})
    out = {}
    for f in tqdm(frames, desc="vacuum labels", mininterval=10.0):
        if len(f["mm_charges"]) == 0:
            out[f["index"]] = float(f["energy"])
        else:
            out[f["index"]] = label_frame(f["numbers"], f["positions"], int(f["total_charge"]), level=level).energy
    return out


def write_subset(src: str | Path, dst: str | Path, indices: list[int],
                 gas_energy: dict[int, float] | None = None) -> None:
    """Copy frames ``indices`` of dataset ``src`` into a new compressed dataset ``dst`` (same layout), adding
    the variable ``gas_energy`` (eV, NaN where unknown) from ``gas_energy`` keyed by the index in ``src``."""
    import netCDF4

    from potentials.dataset import Dataset, DatasetWriter, compact

    dst = Path(dst)
    tmp = dst.with_suffix(".tmp.nc")
    tmp.unlink(missing_ok=True)
    with Dataset.open(src) as ds:
        writer = DatasetWriter(tmp, {k: v for k, v in ds.attrs.items() if k != "Conventions"})
        for i in indices:
            writer.append(ds.frame(int(i)))
    compact(tmp, dst)
    tmp.unlink()
    if gas_energy is not None:
        with netCDF4.Dataset(dst, "a") as nc:
            v = nc.createVariable("gas_energy", "f8", ("frame",), fill_value=np.nan)
            v.units = "eV"
            v.description = ("QM energy of the same ML geometry in vacuum (same level of theory); "
                             "energy - gas_energy is the reference ML-MM interaction energy")
            v[:] = np.array([gas_energy.get(int(i), np.nan) for i in indices])


def make_test_set(src: str | Path, dst: str | Path, split: str = "test", per_solute: int | None = None,
                  seed: int = 0) -> None:
    """Frames of ``split`` (all, or ``per_solute`` picked at random per solute and frame kind, balanced)
    with their vacuum QM energies, written to ``dst`` for :func:`evaluate` (E_int column)."""
    from potentials.dataset import Dataset

    with Dataset.open(src) as ds:
        idx = ds.indices(split)
        attrs = dict(ds.attrs)
        if per_solute is not None:
            rng = np.random.default_rng(seed)
            chosen = []
            for s in sorted(set(ds.meta["solute"][idx])):
                mine = idx[ds.meta["solute"][idx] == s]
                kinds = ds.meta["kind"][mine]
                # round-robin over frame kinds so each solute's slice covers periodic/droplet/displaced/gas
                pools = [list(rng.permutation(mine[kinds == k])) for k in sorted(set(kinds))]
                picked = []
                while len(picked) < per_solute and any(pools):
                    for p in pools:
                        if p and len(picked) < per_solute:
                            picked.append(p.pop())
                chosen += sorted(picked)
            idx = np.array(sorted(chosen))
    frames = load_frames(src, indices=[int(i) for i in idx])
    gas = read_gas_energies(src) or {}                    # reuse vacuum labels src already has
    gas.update(label_gas_energies([f for f in frames if f["index"] not in gas], attrs))
    write_subset(src, dst, [int(i) for i in idx], gas)


if __name__ == "__main__":          # maintenance helper, not part of the `mlmm` CLI
    p = argparse.ArgumentParser(prog="python -m potentials.evaluate",
                                description="write a held-out set with paired vacuum QM energies (E_int column)")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--split", default="test")
    p.add_argument("--per-solute", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO)
    make_test_set(a.src, a.dst, a.split, a.per_solute, a.seed)

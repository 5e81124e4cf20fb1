"""On demand (not part of the test suite): is a model's energy error on a QM/MM dataset a missing simple term?
(issue #17; the numbers are in PERFORMANCE.md §12 and the zones model card, *Where the error is*.)

Predicts every train/val/test frame of DATASET with MODEL (electrostatic embedding, as `mlmm evaluate`), removes each
zone's mean signed energy error, and fits the training frames' errors by ridge regression on

* ``mm``: Σ_j q_j exp(−(r_ij − c)²/2σ²) over the MM charges j around the zone's atoms i, summed per element
  (c = 1.25–4 Å, σ = 0.2 Å): a short-range ML–MM (charge-penetration) term, which φ and E at the nuclei do not give;
* ``pairs``: the same Gaussians (1–5 Å, σ = 0.15 Å) of the zone's own atom-pair distances, per element pair;

then prints the offset-removed energy MAE of each split before → after each fit. A term the network lacks would
lower the held-out error, not only the training error. It also prints the correlation of the errors of an MD frame
and of its displaced copy (same trajectory, block and frame index) and of consecutive MD frames of a block.

    OMP_NUM_THREADS=1 python tests/bench/energy_residuals.py inputs/models/small_b3lyp_svp_zones.pt \\
        inputs/data/qmmm_clusters_b3lyp_svp.nc
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from potentials.core.units import KCALMOL_PER_EV  # noqa: E402  (after the path insert)

SPLITS = ("train", "val", "test")
MM_CENTERS, MM_SIGMA = np.array([1.25, 1.5, 1.75, 2.0, 2.25, 2.5, 3.0, 3.5, 4.0]), 0.2
PAIR_CENTERS, PAIR_SIGMA = np.arange(1.0, 5.01, 0.25), 0.15


def energy_errors(model_path: str, frames: list[dict], batch: int = 16) -> np.ndarray:
    """Predicted − reference energy (kcal/mol) of each frame."""
    import torch

    from coupling.schemes import SCHEMES
    from driver.pipeline import evaluated_model
    from potentials.batches import collate
    from potentials.train import predict

    model = evaluated_model(model_path, "cpu")[0]
    model.eval()
    dtype, scheme = next(model.parameters()).dtype, SCHEMES.get("electrostatic")()
    out = []
    for s in range(0, len(frames), batch):
        sub = frames[s:s + batch]
        pred = predict(model, collate(sub, "cpu", dtype), scheme)["energy"].detach().to(torch.float64).numpy()
        out += [(p - float(f["energy"])) * KCALMOL_PER_EV for p, f in zip(pred, sub)]
    return np.array(out)


def _gauss(r: np.ndarray, centers: np.ndarray, sigma: float) -> np.ndarray:
    return np.exp(-(r[..., None] - centers) ** 2 / (2 * sigma ** 2))


def mm_features(f: dict, elements: list[int]) -> np.ndarray:
    r = np.linalg.norm(f["positions"][:, None] - f["mm_positions"][None], axis=-1)
    per_atom = np.einsum("nmk,m->nk", _gauss(r, MM_CENTERS, MM_SIGMA), f["mm_charges"])
    return np.concatenate([per_atom[f["numbers"] == z].sum(0) for z in elements])


def pair_features(f: dict, pairs: list[tuple[int, int]]) -> np.ndarray:
    n = f["numbers"]
    iu = np.triu_indices(len(n), 1)
    g = _gauss(np.linalg.norm(f["positions"][:, None] - f["positions"][None], axis=-1)[iu], PAIR_CENTERS, PAIR_SIGMA)
    lo, hi = np.minimum(n[iu[0]], n[iu[1]]), np.maximum(n[iu[0]], n[iu[1]])
    return np.concatenate([g[(lo == a) & (hi == b)].sum(0) for a, b in pairs])


def offset_mae(err: np.ndarray, zone: np.ndarray) -> float:
    """Energy MAE after removing each zone's mean signed error (`mlmm evaluate`'s "offset removed")."""
    from potentials.evaluate import offset_removed_mae

    return offset_removed_mae(err[zone == z] for z in np.unique(zone))


def ridge_residuals(x: dict, err: dict, zone: dict, lam: float) -> dict:
    """Fit err ~ x + one intercept per zone on the training split; the residuals of every split."""
    zones = np.unique(zone["train"])

    def design(s):
        return np.hstack([x[s], (zone[s][:, None] == zones[None]).astype(float)])

    d = design("train")
    mu, sd = d.mean(0), d.std(0) + 1e-12
    mu[-len(zones):], sd[-len(zones):] = 0.0, 1.0
    z = (d - mu) / sd
    w = np.linalg.solve(z.T @ z + lam * len(z) * np.eye(z.shape[1]), z.T @ err["train"])
    return {s: err[s] - ((design(s) - mu) / sd) @ w for s in x}


def pair_correlations(frames: list[dict], err: np.ndarray) -> tuple[float, float]:
    """corr(MD frame, its displaced copy) and corr(consecutive MD frames of a block), zone means removed."""
    key = {}
    for f, e in zip(frames, err):
        key[(str(f["trajectory"]), int(f["block"]), int(f["index_in_block"]), int(f["displaced"]))] = e
    copies = [(e, key[k[:3] + (1,)]) for k, e in key.items() if k[3] == 0 and k[:3] + (1,) in key]
    nexts = [(e, key[(k[0], k[1], k[2] + 1, 0)]) for k, e in key.items()
             if k[3] == 0 and (k[0], k[1], k[2] + 1, 0) in key]
    corr = [float(np.corrcoef(np.array(p).T)[0, 1]) if len(p) > 2 else float("nan") for p in (copies, nexts)]
    return corr[0], corr[1]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("dataset")
    ap.add_argument("--lam", type=float, default=1e-3, help="ridge strength per frame (standardised features)")
    args = ap.parse_args(argv)
    from potentials.batches import load_frames

    frames = {s: load_frames(args.dataset, s) for s in SPLITS}
    err, zone = {}, {}
    for s in SPLITS:
        e = energy_errors(args.model, frames[s])
        zone[s] = np.array([str(f["solute"]) for f in frames[s]])
        err[s] = e - np.array([e[zone[s] == z].mean() for z in zone[s]])      # each zone's offset removed
    numbers = np.concatenate([f["numbers"] for f in frames["train"]])
    elements = sorted({int(z) for z in numbers})
    pairs = [(a, b) for i, a in enumerate(elements) for b in elements[i:]]
    feats = {"mm": {s: np.array([mm_features(f, elements) for f in frames[s]]) for s in SPLITS},
             "pairs": {s: np.array([pair_features(f, pairs) for f in frames[s]]) for s in SPLITS}}
    print("split  frames  offset-removed energy MAE (kcal/mol)")
    for s in SPLITS:
        print(f"{s:5s}  {len(err[s]):6d}  {offset_mae(err[s], zone[s]):.3f}")
    for name, x in feats.items():
        res = ridge_residuals(x, err, zone, args.lam)
        print(f"fit {name:5s} ({x['train'].shape[1]} features): " + "  ".join(
            f"{s} {offset_mae(err[s], zone[s]):.3f} -> {offset_mae(res[s], zone[s]):.3f}" for s in SPLITS))
    for s in ("train", "test"):
        c_copy, c_next = pair_correlations(frames[s], err[s])
        print(f"{s}: corr(MD frame, its displaced copy) {c_copy:.2f}; corr(consecutive MD frames) {c_next:.2f}")


if __name__ == "__main__":
    main()

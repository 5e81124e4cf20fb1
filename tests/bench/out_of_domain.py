"""On demand (not part of the test suite): does the committee's uncertainty flag a run that leaves the training
domain *before* its forces go wrong? (issue #19; the numbers are in PERFORMANCE.md §12.)

Takes a finished ``mlmm run`` of a committee model whose XML writes positions (``<trajectory filename='pos'>``) and
the committee's spread (``nvt_bussi_committee.xml``'s ``sim.uncertainty_0``), labels every ``--every``-th saved
frame with the same PySCF QM/MM labeller ``mlmm learn`` uses (the system's embedded point charges, the level of
theory of the model's ``mlmm learn`` folder), and prints per frame: step, the committee's force_std_max, the force
MAE of the committee mean on the ML atoms against QM/MM, the largest ML-atom force error and the ML zone's
largest bond stretch. Writes ``OUT/ood.csv`` and ``OUT/ood.png``.

    python tests/bench/out_of_domain.py RUN_DIR --learn LEARN_DIR [--every 5] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def read_xyz_steps(path: Path) -> tuple[list[int], list[np.ndarray]]:
    """Steps and positions (Å) of an i-PI xyz trajectory."""
    steps, frames = [], []
    with open(path) as fh:
        while True:
            head = fh.readline()
            if not head.strip():
                break
            n = int(head)
            comment = fh.readline()
            steps.append(int(comment.split("Step:")[1].split()[0]))
            frames.append(np.array([[float(x) for x in fh.readline().split()[1:4]] for _ in range(n)]))
    return steps, frames


def uncertainty(path: Path) -> dict[int, float]:
    out, step = {}, None
    for line in open(path):
        if line.lstrip().startswith("#"):
            step = int(line.split("Step:")[1].split()[0])
        elif step is not None and line.strip():
            out[step] = float(line.split()[1])
    return out


def main(argv=None) -> int:
    from coupling.schemes import SCHEMES
    from driver.learn import Learner
    from driver.learn_config import LearnConfig
    from driver.learn_label import label_frames
    from driver.pipeline import evaluated_model
    from potentials.batches import load_frames
    from potentials.core.units import KCALMOL_PER_EV
    from potentials.train import predict
    from potentials.batches import collate

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--learn", type=Path, required=True, help="the mlmm learn folder of the run's model")
    ap.add_argument("--every", type=int, default=5, help="label every N-th saved frame")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args(argv)
    run = json.loads((a.run / "run.json").read_text())
    meta = json.loads((a.learn / "learn.json").read_text())
    cfg = LearnConfig.from_dict(meta["config"] | {"validate": {"frames": 0}}, where=str(a.learn / "learn.json"))
    out = a.out or a.run / "ood"
    learner = Learner(run["system"], out, cfg)          # its own folder: data.nc, frames.npz
    steps, pos = read_xyz_steps(next(a.run.glob("sim.pos_0.xyz")))
    spread = uncertainty(a.run / "sim.uncertainty_0")
    keep = list(range(0, len(steps), a.every))
    frames = out / "frames.npz"
    n = len(keep)
    np.savez(frames, frame_id=np.array([f"ood/step{steps[i]:06d}" for i in keep]),
             trajectory=np.array(["ood"] * n), split=np.array(["test"] * n), temperature=np.zeros(n),
             displaced=np.zeros(n, int), block=np.zeros(n, int), index=np.array(keep),
             positions=np.array([pos[i] / 10.0 for i in keep], np.float32))
    label_frames(learner, frames, out / "data.nc", "out-of-domain frames")
    model, _ = evaluated_model(str(a.learn / "model.pt"), "cpu")
    scheme = SCHEMES.get("electrostatic")()
    rows = []
    for f in load_frames(out / "data.nc", "test"):
        step = int(str(f["frame_id"]).split("step")[1])
        p = predict(model, collate([f], "cpu", next(model.parameters()).dtype), scheme)
        err = np.abs(p["forces"].detach().numpy() - f["forces"]) * KCALMOL_PER_EV
        x = f["positions"]
        bonds = [np.linalg.norm(x[0] - x[k]) for k in range(1, len(x))]      # C to O, H, H (formaldehyde)
        ref = [1.21, 1.10, 1.10][:len(bonds)]
        rows.append((step, spread.get(step, np.nan), float(err.mean()), float(err.max()),
                     float(max(b - r for b, r in zip(bonds, ref)))))
    rows.sort()
    text = "step,force_std_max_kjmol_nm,force_mae_kcalmol_A,force_max_err_kcalmol_A,max_bond_stretch_A\n" + "".join(
        f"{s},{u:.1f},{m:.3f},{e:.3f},{b:.3f}\n" for s, u, m, e, b in rows)
    (out / "ood.csv").write_text(text)
    print(text)
    from scipy.stats import spearmanr
    r = np.array(rows)
    ok = np.isfinite(r[:, 1])
    print(f"Spearman rank correlation of force_std_max with the force MAE: {spearmanr(r[ok, 1], r[ok, 2])[0]:.2f}, "
          f"with the largest force error: {spearmanr(r[ok, 1], r[ok, 3])[0]:.2f} ({int(ok.sum())} frames)")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(r[:, 0], r[:, 1] / 41.84, "o-", label="committee force_std_max (kcal/mol/Å)")
    ax.plot(r[:, 0], r[:, 2], "s-", label="force MAE vs QM/MM (kcal/mol/Å)")
    ax.plot(r[:, 0], r[:, 3], "^-", label="largest force error vs QM/MM (kcal/mol/Å)")
    ax.set_xlabel("step")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "ood.png", dpi=100)
    return 0


if __name__ == "__main__":
    sys.exit(main())

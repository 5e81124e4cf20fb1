"""On demand (not part of the test suite): which training recipe gives the lowest error on independent QM/MM clusters
for the data an ``mlmm learn`` loop labelled? (issue #19; the numbers are in PERFORMANCE.md section 12.)

Trains one network per recipe (member 0's split: the loop's train/val frames, its test trajectories untouched)
on ``LEARN_DIR/data.nc`` with ``mlmm train``, then evaluates each on the loop's independent validation clusters
(``LEARN_DIR/validation_rNNN/data.nc``, which no recipe trains on) with ``mlmm evaluate``. Recipes, side by side
in one run: the loop's own settings (force weight 1, quick plateau schedule), force weights 4 and 10, a wider
network, and fine-tuning the shipped network (``[final] init_model = "auto"``). Writes ``OUT/recipes.csv``.

    python tests/bench/learn_recipes.py LEARN_DIR [--validation DIR/validation_r007/data.nc] [--minutes 12]
        [--out DIR] [--only NAME ...]
"""
from __future__ import annotations

import argparse
import csv
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MEDIUM = """elements = [1, 6, 7, 8]
nfeature = 16
nshifts = 16
ncomb_v = 12
cutoff = 5.0
rmin = 0.8
hidden = [[256, 192], [256, 192], [256, 192, 192]]
aim_size = 128
out_hidden = [96, 96]
coulomb_cutoff = 4.6
embedding = true
field_channels = 8
"""
SHIPPED_MODEL = """d3 = true
d3_params = { s6 = 1.0, s8 = 1.9889, a1 = 0.3981, a2 = 4.4211 }
pol_damping = 1.18
"""
# name: (preset, w_forces, lr, plateau_patience, min_lr, init_model)
RECIPES = {
    "loop": ("small", 1.0, 1e-3, 5, 1e-5, ""),
    "f1": ("small", 1.0, 1e-3, 20, 1e-6, ""),
    "f4": ("small", 4.0, 1e-3, 20, 1e-6, ""),
    "f10": ("small", 10.0, 1e-3, 20, 1e-6, ""),
    "medium-f4": ("medium", 4.0, 1e-3, 20, 1e-6, ""),
    "medium-f10": ("medium", 10.0, 1e-3, 20, 1e-6, ""),
    "shipped-f4": ("small", 4.0, 3e-4, 20, 1e-6, str(ROOT / "inputs" / "models" / "small_b3lyp_svp.pt")),
}


def config(name: str, data: Path, out: Path, minutes: float) -> Path:
    preset, w_f, lr, patience, min_lr, init = RECIPES[name]
    if preset == "medium":
        (out / "medium.toml").write_text(MEDIUM)
        preset = str(out / "medium.toml")
    text = (f'[model]\npreset = "{preset}"\n[model.config]\nelements = [1, 6, 7, 8]\n'
            + (SHIPPED_MODEL if init else "")
            + f'[data]\npath = "{data}"\n[loss]\nenergy = 30.0\nforces = {w_f}\nmm_forces = 10.0\ndipole = 0.1\n'
            f'[optim]\nlr = {lr}\nplateau_patience = {patience}\nmin_lr = {min_lr}\nearly_stopping = 60\n'
            f'[train]\nseed = 0\nepochs = 500\nbatch_size = 8\nthreads = 1\nmax_minutes = {minutes}\n'
            f'embedding = "electrostatic"\nprogress = false\n' + (f'init_model = "{init}"\n' if init else "")
            + f'[output]\nmodel = "{out / name}.pt"\n')
    path = out / f"{name}.toml"
    path.write_text(text)
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("learn", type=Path)
    ap.add_argument("--validation", type=Path, default=None)
    ap.add_argument("--minutes", type=float, default=12.0)
    ap.add_argument("--out", type=Path, default=Path("learn_recipes"))
    ap.add_argument("--only", nargs="*", default=None, choices=sorted(RECIPES))
    args = ap.parse_args()
    val = args.validation or sorted(args.learn.glob("validation_r*/data.nc"))[-1]
    args.out.mkdir(parents=True, exist_ok=True)
    mlmm = str(Path(sys.executable).parent / "mlmm")
    rows = []
    for name in args.only or RECIPES:
        cfg = config(name, args.learn / "data.nc", args.out, args.minutes)
        subprocess.run([mlmm, "train", str(cfg)], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        table = subprocess.run([mlmm, "evaluate", str(args.out / f"{name}.pt"), str(val), "--split", "all"],
                               check=True, capture_output=True, text=True).stdout
        row = next(line for line in table.splitlines() if re.match(r"\| all \| electrostatic", line))
        e, f, mm = [float(x) for x in row.split("|")[4:7]]
        rows.append({"recipe": name, "energy_kcalmol": e, "ml_forces": f, "mm_forces": mm})
        print(f"{name:12s} E {e:.3f} kcal/mol  ML F {f:.3f}  MM F {mm:.3f} kcal/mol/Å", flush=True)
    with open(args.out / "recipes.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())

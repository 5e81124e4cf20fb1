"""Benchmark (issue 16.3): kinetic_cv and step time of PIMD water with the MM force uncontracted, with only its
slow part (PME reciprocal space, client kind mm-slow) contracted to 2 beads, and with all of it contracted.

Pure-MM flexible TIP3P (default 1.86 nm box, ~650 atoms, PME 0.8 nm cutoff), 8 beads, PILE-L 300 K, 0.25 fs, through
`mlmm run` (the XML variants and helpers of tests/driver/test_rpc_split.py). Per mode: mean kinetic_cv over the
run after ``--skip`` printed rows, its standard error from 10 block averages, and the wall time per step
(mlmm run's own timing, start-up included: use enough steps).

    python tests/bench/bench_rpc_split.py [--steps 4000] [--box 1.86] [--cutoff 0.8] [--seeds 11 12]
        [--out tests/bench/results/rpc_split_cpu.md]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "driver"))

from common import cpu_name, write_report  # noqa: E402
from test_rpc_split import MODES, kinetic_cv, run_mode, water_box  # noqa: E402


def block_sem(x: np.ndarray, blocks: int = 10) -> float:
    means = np.array([b.mean() for b in np.array_split(x, blocks)])
    return float(means.std(ddof=1) / np.sqrt(blocks))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--skip", type=int, default=20, help="printed rows (every 10 steps) left out at the start")
    ap.add_argument("--box", type=float, default=1.86)
    ap.add_argument("--cutoff", type=float, default=0.8)
    ap.add_argument("--seeds", type=int, nargs="+", default=[11])
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    rows = [f"PIMD flexible TIP3P, {args.box} nm box, PME {args.cutoff} nm, 8 beads, {args.steps} steps of "
            f"0.25 fs per run, seeds {args.seeds}; {cpu_name()}\n",
            "| mode | kinetic_cv (kJ/mol) | ± SEM | vs full | wall s/step |", "|---|---:|---:|---:|---:|"]
    with tempfile.TemporaryDirectory() as tmp:
        system = water_box(Path(tmp) / "box", box_nm=args.box, cutoff_nm=args.cutoff)
        ref = None
        for mode in MODES:
            k, wall = [], 0.0
            for seed in args.seeds:
                res = run_mode(system, mode, Path(tmp) / f"s{seed}", args.steps, seed=seed)
                k.append(kinetic_cv(res.folder, skip=args.skip))
                wall += res.wall_s / args.steps / len(args.seeds)
            k = np.concatenate(k)
            mean, sem = float(k.mean()), block_sem(k, 10 * len(args.seeds))
            ref = mean if ref is None else ref
            rows.append(f"| {mode} | {mean:.1f} | {sem:.1f} | {100 * (mean / ref - 1):+.2f} % | {wall:.4f} |")
            print(rows[-1], flush=True)
    text = "\n".join(rows) + "\n"
    print(text)
    if args.out:
        write_report(args.out, text)


if __name__ == "__main__":
    main()

"""Benchmark: one ML-client request (embedding selection + phi/E + network + forces) vs MM system size.

A small ML zone (a 21-atom water cluster, the tiny network preset with random weights, float32) sits in a
periodic box of TIP3P-like water at liquid density with 3e3 .. 1e5 MM atoms; the embedding cutoff is 1.2 nm.
Reports the time per request (best of ``reps`` after a warm-up) for B = 1 and B = 8 structures, and the
number of embedded MM atoms. The cost should be nearly flat in the MM size: the neighbour search is a KD-tree
over residue centres and only embedded atoms enter the Coulomb sums (the dense (N, 3) force array is the
only O(N) part).

    python tests/bench/bench_ml_engine.py [--sizes 3000 10000 100000] [--device cpu|cuda] [--threads 2]

Not a test: nothing is asserted.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
OH = np.array([[0.0, 0.0, 0.0], [0.0957, 0.0, 0.0], [-0.024, 0.0927, 0.0]])      # nm


def water_box(n_atoms: int, seed: int = 0):
    """Waters on a jittered cubic lattice at 33.4 nm^-3; the first 7 waters form the ML zone."""
    rng = np.random.default_rng(seed)
    side = max(int(round((n_atoms / 3) ** (1 / 3))), 11)        # >= 3.4 nm: room for the 1.2 nm cutoff
    n_w = side ** 3
    a = (1 / 33.4) ** (1 / 3)
    grid = (np.stack(np.meshgrid(*[np.arange(side)] * 3, indexing="ij"), -1).reshape(-1, 3) + 0.5) * a
    centre = grid.mean(0)
    grid = grid[np.argsort(np.linalg.norm(grid - centre, axis=1))]          # ML waters first, at the centre
    pos = []
    for o in grid:
        rot, _ = np.linalg.qr(rng.normal(size=(3, 3)))
        pos.append(o + OH @ rot.T)
    pos = np.concatenate(pos)
    box = np.eye(3) * side * a
    q = np.tile([-0.834, 0.417, 0.417], n_w)
    res = np.repeat(np.arange(n_w), 3)
    return pos, box, q, res, np.tile([8, 1, 1], 7)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", type=int, nargs="+", default=[3000, 10000, 100000])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from coupling.embedding import MMEnvironment
    from coupling.ml_engine import MLEngine
    from potentials.network import EmbeddedAIMNet2, ModelConfig

    model = EmbeddedAIMNet2(ModelConfig.from_toml(ROOT / "inputs/models/configs/tiny.toml"))
    print(f"| MM atoms | B | ms / request | ms / structure | embedded MM atoms |  device {args.device}")
    print("|---:|---:|---:|---:|---:|")
    for n in args.sizes:
        pos, box, q, res, numbers = water_box(n)
        env = MMEnvironment(q, res, np.arange(21), cutoff=1.2, switch_width=0.2)
        engine = MLEngine(model, numbers, 0, env, device=args.device, dtype=torch.float64)
        for b in (1, 8):
            frames = pos[None] + np.random.default_rng(1).normal(0, 0.002, (b, *pos.shape))
            boxes = np.broadcast_to(box, (b, 3, 3))
            engine.compute(frames, boxes)
            best = np.inf
            for _ in range(args.reps):
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                t = time.perf_counter()
                out = engine.compute(frames, boxes)
                best = min(best, time.perf_counter() - t)
            print(f"| {len(pos)} | {b} | {1e3 * best:.1f} | {1e3 * best / b:.1f} | {out[0].extras['ml.n_embedded']} |")


if __name__ == "__main__":
    main()

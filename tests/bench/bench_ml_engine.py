"""Benchmark: the ML client's request vs MM-zone size and vs ML-zone size, split into field inputs and network.

Water boxes (TIP3P charges, liquid density, periodic) whose central waters are the ML zone; the network is
a random-weight preset (``--preset``, default ``small`` = the shipped model's size; timing does not depend on
the weights); embedding cutoff 1.2 nm, neighbour-list skin 0.1 nm. Each request moves every atom by a small
random step (about one 0.5 fs MD step), so the neighbour list is reused and rebuilt as in a run.

* request: :meth:`MLEngine.compute` per structure, electrostatic embedding
* mechanical request: the same engine in mechanical mode (phi = E = 0, no MM atoms involved) on the same frames
* network: the network alone, forward + backward, phi/E given as constants
* field inputs = request − mechanical request, per frame: neighbour-list check, embedded charges, phi/E and
  their backward, the network's extra backward into phi/E, forces on the embedded atoms, i.e. everything the
  electrostatic embedding adds. The three are timed interleaved (drifts of the machine hit all alike);
  medians over ``--reps`` x ``--calls`` requests.
* builds: neighbour-list rebuilds per request (few: the moves of ``--calls`` requests rarely reach skin/2);
  a rebuild (one list build, timed on its own) happens every ~6-30 MD steps of 0.5 fs (bench_step.py), so
  the last column adds a twentieth of it to the field inputs

Table 1 (MM scaling): a 21-atom ML zone in 3e3 .. 1e5 atoms. Table 2 (ML scaling): 9 .. 3000 ML atoms
(``--ml-sizes``; 1e4 runs too, given time and memory) in a box just large enough for the cutoff.

    python tests/bench/bench_ml_engine.py [--mm-sizes 3000 10000 30000 100000] [--ml-sizes 9 99 999 3000]
        [--device cpu|cuda] [--threads 1] [--out tests/bench/results/ml_engine_cpu.md]

Not a test: nothing is asserted.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from common import cpu_name, write_report  # noqa: E402
OH = np.array([[0.0, 0.0, 0.0], [0.0957, 0.0, 0.0], [-0.024, 0.0927, 0.0]])      # nm
DENSITY = 33.4                                                                    # waters / nm^3
CUTOFF = 1.2


def water_box(n_atoms: int, n_ml_waters: int = 7, seed: int = 0):
    """Waters on a jittered cubic lattice; the ``n_ml_waters`` nearest the centre come first (the ML zone).
    The box is at least 2 (cutoff + zone radius) + 0.4 nm wide. Returns pos, box, charges, residues, numbers."""
    rng = np.random.default_rng(seed)
    a = (1 / DENSITY) ** (1 / 3)
    radius = (3 * n_ml_waters / (4 * np.pi * DENSITY)) ** (1 / 3) + 0.15
    side = max(int(round((n_atoms / 3) ** (1 / 3))), int(np.ceil((2 * (CUTOFF + radius) + 0.4) / a)))
    n_w = side ** 3
    grid = (np.stack(np.meshgrid(*[np.arange(side)] * 3, indexing="ij"), -1).reshape(-1, 3) + 0.5) * a
    grid = grid[np.argsort(np.linalg.norm(grid - grid.mean(0), axis=1), kind="stable")]
    rots = np.linalg.qr(rng.normal(size=(n_w, 3, 3)))[0]
    pos = (grid[:, None, :] + np.einsum("jk,wlk->wjl", OH, rots)).reshape(-1, 3)
    q = np.tile([-0.834, 0.417, 0.417], n_w)
    res = np.repeat(np.arange(n_w), 3)
    return pos, np.eye(3) * side * a, q, res, np.tile([8, 1, 1], n_ml_waters)


def measure(model, n_atoms: int, n_ml_waters: int, device: str, calls: int, reps: int) -> dict[str, float]:
    from coupling.embedding import MMEnvironment, select_environment
    from coupling.ml_engine import MLEngine

    pos, box, q, res, numbers = water_box(n_atoms, n_ml_waters)
    n_ml = len(numbers)
    env = MMEnvironment(q, res, np.arange(n_ml), cutoff=CUTOFF, switch_width=0.2)
    engines = {mode: MLEngine(model, numbers, 0, env, mode=mode, device=device, dtype=torch.float64, skin=0.1)
               for mode in ("electrostatic", "mechanical")}
    rng = np.random.default_rng(1)
    frames = pos + np.cumsum(rng.normal(0, 0.0015, (calls, *pos.shape)), axis=0)
    sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)
    dev = torch.device(device)
    args = (torch.as_tensor(numbers, device=dev), torch.zeros(n_ml, dtype=torch.long, device=dev),
            torch.zeros(1, dtype=torch.float64, device=dev))
    phi = torch.randn(n_ml, dtype=torch.float64, device=dev)
    field = torch.randn(n_ml, 3, dtype=torch.float64, device=dev) * 0.1

    def network(f):             # the network alone: phi/E given, forces w.r.t. the ML positions only
        x = torch.tensor(f[:n_ml] * 10.0, device=dev, requires_grad=True)
        torch.autograd.grad(model(args[0], x, args[1], args[2], phi, field)["energy"].sum(), x)

    def timed(fn, f):
        f = f * 1.0             # a fresh array, as the client's bohr -> nm conversion hands over (warm in cache)
        t0 = time.perf_counter()
        fn(f)
        sync()
        return time.perf_counter() - t0

    for e in engines.values():
        e.compute(frames[:1], box[None])
    # interleaved, so that drifts of the machine hit all three alike; medians (a list rebuild is an outlier
    # here and reported on its own)
    t = {"request": [], "mechanical": [], "network": []}
    builds0, out0 = engines["electrostatic"].list_builds, engines["electrostatic"].timings["output"]
    for _ in range(reps):
        for f in frames:
            t["request"].append(timed(lambda f: engines["electrostatic"].compute(f[None], box[None]), f))
            t["mechanical"].append(timed(lambda f: engines["mechanical"].compute(f[None], box[None]), f))
            t["network"].append(timed(network, f))
    builds = (engines["electrostatic"].list_builds - builds0) / (reps * calls)
    out = engines["electrostatic"].compute(frames[-1][None], box[None])
    med = {k: float(np.median(v)) for k, v in t.items()}
    build = min(timed(lambda f: select_environment(env, f, box, 0.1), frames[-1]) for _ in range(reps + 1))
    return {**med, "field": float(np.median(np.subtract(t["request"], t["mechanical"]))),
            "builds": builds,
            "output": (engines["electrostatic"].timings["output"] - out0) / (reps * calls + 1),
            "atoms": len(pos), "ml": n_ml, "embedded": out[0].extras["ml.n_embedded"], "build": build}


def table(title: str, rows: list[dict[str, float]]) -> list[str]:
    lines = [f"### {title}", "",
             "| atoms | ML atoms | embedded MM atoms | request ms | mechanical request ms | network ms | "
             "field inputs ms | field / network | list builds / request | one list build ms | "
             "field + build/20, / network |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        amortised = (r["field"] + r["build"] / 20) / r["network"]
        lines.append(f"| {r['atoms']} | {r['ml']} | {r['embedded']} | {1e3 * r['request']:.2f} | "
                     f"{1e3 * r['mechanical']:.2f} | {1e3 * r['network']:.2f} | {1e3 * r['field']:.2f} | "
                     f"{100 * r['field'] / r['network']:.0f}% | {r['builds']:.2f} | {1e3 * r['build']:.2f} | "
                     f"{100 * amortised:.0f}% |")
    return lines + [""]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mm-sizes", type=int, nargs="*", default=[3000, 10000, 30000, 100000])
    p.add_argument("--ml-sizes", type=int, nargs="*", default=[9, 99, 999, 3000])
    p.add_argument("--preset", default="small", help="inputs/models/configs/PRESET.toml")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--calls", type=int, default=20)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", type=Path, default=ROOT / "tests/bench/results/ml_engine_cpu.md")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from potentials.network import EmbeddedAIMNet2, ModelConfig

    model = EmbeddedAIMNet2(ModelConfig.from_toml(ROOT / f"inputs/models/configs/{args.preset}.toml"))
    model = model.to(args.device).eval()
    for q in model.parameters():
        q.requires_grad_(False)
    mm_rows, ml_rows = [], []
    for n in args.mm_sizes:
        mm_rows.append(measure(model, n, 7, args.device, args.calls, args.reps))
        print(mm_rows[-1], flush=True)
    for n in args.ml_sizes:
        ml_rows.append(measure(model, 3000, max(1, n // 3), args.device, max(3, args.calls // (1 + n // 300)),
                               args.reps))
        print(ml_rows[-1], flush=True)
    cpu = cpu_name()
    lines = ["# ML client request: field inputs vs network (`python tests/bench/bench_ml_engine.py`)", "",
             f"Network preset `{args.preset}` (random weights; float64 inputs as in the ML client), device "
             f"{args.device}, {args.threads} torch "
             f"thread(s), embedding cutoff {CUTOFF} nm, skin 0.1 nm, MD-like moves between requests.",
             f"Machine: {cpu}, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}.", ""]
    if mm_rows:
        lines += table("MM-zone scaling (21 ML atoms)", mm_rows)
    if ml_rows:
        lines += table("ML-zone scaling", ml_rows)
    write_report(args.out, "\n".join(lines))


if __name__ == "__main__":
    main()

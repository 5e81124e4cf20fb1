"""Benchmark: what D3(BJ) dispersion and the damped polarisation field cost the ML client (issues 15, 16).

The shipped model on the shipped example (methanol in water, 6 ML atoms) and on DHFR with the 10 waters nearest
the bulk-most water as ML zone (30 atoms, as in bench_step.py), through :class:`coupling.ml_engine.MLEngine`
with the shipped file's weights and four settings of its weight-free terms, timed interleaved on the same
frames (each request moves every atom by ~one MD step): neither term, D3 only, damping only, both (the shipped
model). Medians of ``--calls`` requests; one torch thread.

    python tests/bench/bench_terms.py [--cases example dhfr-30] [--calls 30] [--out tests/bench/results/terms_cpu.md]

Not a test: nothing is asserted.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench_lr import case_spec  # noqa: E402
from common import cpu_name, write_report  # noqa: E402
from coupling.ml_engine import MLEngine  # noqa: E402
from potentials.adapters import EmbeddedAIMNet2Adapter  # noqa: E402
from potentials.model_io import load_model  # noqa: E402
from potentials.network import EmbeddedAIMNet2, ModelConfig  # noqa: E402
from potentials.network_parts import D3_B3LYP  # noqa: E402
from potentials.openmm_system import load_system  # noqa: E402

MODEL = ROOT / "inputs/models/small_b3lyp_svp.pt"
SETTINGS = {"neither": (False, 0.0), "D3": (True, 0.0), "damping": (False, 1.18), "both": (True, 1.18)}


def variant(d3: bool, damping: float) -> EmbeddedAIMNet2:
    """The shipped weights with D3 and the polarisation damping set as asked."""
    base = load_model(MODEL)
    cfg = {**base.config.to_dict(), "d3": d3, "pol_damping": damping}
    if d3:
        cfg["d3_params"] = dict(D3_B3LYP)
    model = EmbeddedAIMNet2(ModelConfig.from_dict(cfg))
    model.load_state_dict(base.state_dict())
    model.metadata = base.metadata
    return model.eval()


def time_case(spec, calls: int, seed: int = 0) -> dict[str, float]:
    _, _, pos = load_system(spec)
    box = np.asarray(spec.structure.box_nm)
    engines = {}
    for name, (d3, damping) in SETTINGS.items():
        engine = MLEngine.from_spec(spec, MODEL)
        engines[name] = MLEngine(EmbeddedAIMNet2Adapter(variant(d3, damping)), engine.zone.numbers, spec.ml.charge,
                                 engine.env, mode=engine.scheme, periodic=spec.structure.periodic,
                                 skin=spec.coupling.skin_nm, zone=engine.zone)
    rng = np.random.default_rng(seed)
    times = {name: [] for name in engines}
    frame = np.array(pos)
    for i in range(calls + 2):
        frame = frame + rng.normal(0.0, 0.002, frame.shape)
        for name, engine in engines.items():
            t0 = time.perf_counter()
            engine.compute(frame[None], box[None])
            if i >= 2:
                times[name].append(time.perf_counter() - t0)
    return {name: 1e3 * float(np.median(t)) for name, t in times.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", nargs="+", default=["example", "dhfr-30"], choices=["example", "dhfr-30"])
    p.add_argument("--calls", type=int, default=30)
    p.add_argument("--out", default=str(ROOT / "tests/bench/results/terms_cpu.md"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    lines = [f"# D3 and damped polarisation field: ML client request time (CPU: {cpu_name()}, 1 thread, load "
             f"average {os.getloadavg()[0]:.1f} at the start)", "",
             "| case | neither ms | D3 ms | damping ms | both (shipped) ms | D3 adds | damping adds |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.cases:
            r = time_case(case_spec(name, Path(tmp)), args.calls)
            lines.append(f"| {name} | {r['neither']:.1f} | {r['D3']:.1f} | {r['damping']:.1f} | {r['both']:.1f} | "
                         f"{100 * (r['D3'] / r['neither'] - 1):+.0f}% | "
                         f"{100 * (r['damping'] / r['neither'] - 1):+.0f}% |")
            print(lines[-1], flush=True)
    write_report(Path(args.out), "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

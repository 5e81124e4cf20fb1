"""Benchmark: what the long-range ML–MM electrostatics (``electrostatic-lr``) cost the ML client.

Cases (``--cases``): the shipped example (methanol in water, 2637 atoms, 6 ML atoms), DHFR in water (JAC, 23 558
atoms) with the 10 waters nearest the bulk-most water as ML zone (30 atoms; ``dhfr-30``, as in bench_step.py)
or the 167 nearest (501 atoms, embedding cutoff 1.0 nm; ``dhfr-500``). The shipped model, one torch thread.

Two ML engines on the same frames, timed interleaved: ``electrostatic`` (cutoff only) and ``electrostatic-lr``.
Each request moves every atom by a small random step (about one 0.5 fs MD step), so the Verlet lists are
reused and rebuilt as in a run. Per request (medians):

* network: the cutoff-only engine's network time (forward + backward, its own timer);
* long-range term: the lr engine's coupling time minus the cutoff-only engine's (the term's forward is all
  it adds: Ewald/SPME sums with their derivatives, the real-space list check);
* request: the whole :meth:`MLEngine.compute` of each engine;
* CPU ms: the same from the process's CPU time (``time.process_time``: on a machine shared with other jobs the
  wall-clock figures above grow with the load, CPU time much less); the cutoff-only request is the network
  plus the embedding (4-8% of it, PERFORMANCE.md section 2).

    python tests/bench/bench_lr.py [--cases example dhfr-30 dhfr-500] [--calls 30]
        [--out tests/bench/results/lr_cpu.md]

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

from bench_step import dhfr_system  # noqa: E402
from common import cpu_name, write_report  # noqa: E402
from coupling.ml_engine import MLEngine  # noqa: E402
from potentials.core.spec import SystemSpec  # noqa: E402
from potentials.openmm_system import load_system  # noqa: E402

MODEL = ROOT / "inputs/models/small_b3lyp_svp.pt"
CASES = {"example": None, "dhfr-30": (10, 1.2), "dhfr-500": (167, 1.0)}


def case_spec(name: str, work: Path) -> SystemSpec:
    n = CASES[name]
    path = ROOT / "inputs/examples/methanol/prepared/system.toml" if n is None else dhfr_system(work, *n)
    return SystemSpec.load(path)


def time_case(spec: SystemSpec, calls: int, seed: int = 0) -> dict:
    _, _, pos = load_system(spec)
    box = np.asarray(spec.structure.box_nm)
    engines = {}
    for mode in ("electrostatic", "electrostatic-lr"):
        spec.coupling.embedding = mode
        engines[mode] = MLEngine.from_spec(spec, MODEL)
    rng = np.random.default_rng(seed)
    rows = {mode: {"request": [], "cpu": [], "coupling": [], "network": []} for mode in engines}
    frame = np.array(pos)
    for i in range(calls + 2):
        frame = frame + rng.normal(0.0, 0.002, frame.shape)
        for mode, engine in engines.items():
            before = dict(engine.timings)
            t0, c0 = time.perf_counter(), time.process_time()
            engine.compute(frame[None], box[None])
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            if i >= 2:                                          # first calls: compilation, caches
                rows[mode]["request"].append(dt)
                rows[mode]["cpu"].append(dc)
                for key in ("coupling", "network"):
                    rows[mode][key].append(engine.timings[key] - before[key])
    lr = engines["electrostatic-lr"]._sources[0]
    med = {mode: {k: 1e3 * float(np.median(v)) for k, v in r.items()} for mode, r in rows.items()}
    diff = lambda key: 1e3 * float(np.median(np.subtract(rows["electrostatic-lr"][key],  # noqa: E731
                                                         rows["electrostatic"][key])))
    return {"atoms": len(pos), "ml": len(spec.ml.indices), "charged_mm": len(lr.mm_atoms),
            "mesh": "×".join(map(str, lr.coulomb.params.mesh)), "pairs": len(lr.coulomb.pairs.pairs[0]),
            "network": med["electrostatic"]["network"], "term": diff("coupling"),
            "cpu_cut": med["electrostatic"]["cpu"], "cpu_term": diff("cpu"),
            "request_cut": med["electrostatic"]["request"], "request_lr": med["electrostatic-lr"]["request"],
            "builds": lr.coulomb.pairs.builds}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--calls", type=int, default=30)
    p.add_argument("--out", default=str(ROOT / "tests/bench/results/lr_cpu.md"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    lines = [f"# Long-range ML–MM electrostatics: cost in the ML client (CPU: {cpu_name()}, 1 thread, "
             f"load average {os.getloadavg()[0]:.1f} at the start)", "",
             "| case | atoms | ML atoms | charged MM atoms | mesh | real-space pairs | network ms | long-range term ms "
             "| term / network | request ms cutoff-only | request ms lr | CPU ms cutoff-only request | CPU ms of "
             "the term | term / cutoff-only request (CPU) | list builds |",
             "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.cases:
            r = time_case(case_spec(name, Path(tmp)), args.calls)
            lines.append(f"| {name} | {r['atoms']} | {r['ml']} | {r['charged_mm']} | {r['mesh']} | {r['pairs']} | "
                         f"{r['network']:.1f} | {r['term']:.1f} | {100 * r['term'] / r['network']:.0f}% | "
                         f"{r['request_cut']:.1f} | {r['request_lr']:.1f} | {r['cpu_cut']:.1f} | {r['cpu_term']:.1f} | "
                         f"{100 * r['cpu_term'] / r['cpu_cut']:.0f}% | {r['builds']} |")
            print(lines[-1], flush=True)
    write_report(Path(args.out), "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

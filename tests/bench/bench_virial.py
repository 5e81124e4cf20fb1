"""Benchmark: what the MM client's periodic virial costs (potentials/openmm_engine.py), per ``virial`` mode.

One :class:`potentials.openmm_engine.OpenMMEngine` per mode ("none": energy + forces only; "isotropic": + 2
strained energies; "full": + 12) on the MM client's system of a prepared ``system.toml`` (default: the shipped
example, 2637 atoms, PME 1 nm), the structure's own positions, ``--repeat`` calls each (the first is dropped:
context warm-up). Reports the median ms per ``compute`` call and the ratio to "none", and the trace of W.

    python tests/bench/bench_virial.py [--system inputs/examples/methanol/prepared/system.toml]
        [--platform CPU] [--threads 1 2] [--repeat 10] [--out tests/bench/results/virial_cpu.md]

Not a test: nothing is asserted.
"""
from __future__ import annotations

import argparse
import copy
import os
import time
from pathlib import Path

import numpy as np
from common import cpu_name, write_report

ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--system", default=str(ROOT / "inputs/examples/methanol/prepared/system.toml"))
    ap.add_argument("--platform", default="CPU")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--out", default=str(ROOT / "tests/bench/results/virial_cpu.md"))
    args = ap.parse_args()

    from coupling.engines import EngineOptions, build_mm_engine
    from potentials.core.spec import SystemSpec
    from potentials.openmm_engine import VIRIAL_MODES, OpenMMEngine
    from potentials.openmm_system import load_system

    spec = SystemSpec.load(args.system)
    _, _, pos = load_system(spec)
    pos = np.asarray(pos)
    box = np.array(spec.structure.box_nm, dtype=np.float64)
    client = build_mm_engine(spec, EngineOptions(platform=args.platform))
    system = copy.deepcopy(client.context.getSystem())
    rows = []
    for threads in args.threads:
        base = None
        for mode in reversed(VIRIAL_MODES):                   # none first: the reference time
            engine = OpenMMEngine(system, platform=args.platform, threads=threads, virial=mode)
            times, trace = [], 0.0
            for k in range(args.repeat + 1):
                t = time.perf_counter()
                res = engine.compute(pos + 1e-6 * k, box)[0]
                times.append(time.perf_counter() - t)
                trace = float(np.trace(res.virial))
            ms = 1e3 * float(np.median(times[1:]))
            base = base or ms
            rows.append(f"| {threads} | {mode} | {ms:.1f} | {ms / base:.1f}x | {trace:.0f} |")
    try:
        name = Path(args.system).resolve().relative_to(ROOT)
    except ValueError:
        name = Path(args.system)
    text = "\n".join([
        "# MM client: cost of the periodic virial (`python tests/bench/bench_virial.py`)",
        "",
        f"System: {name} ({engine.natoms} atoms), OpenMM platform {engine.platform}, CPU: {cpu_name()} "
        f"({os.cpu_count()} cores, shared); median of {args.repeat} `compute` calls at the structure's own "
        "positions (a plain call with unchanged cell keeps OpenMM's neighbour list; every strained cell rebuilds it).",
        "",
        "| threads | virial mode | ms / call | vs none | tr W (kJ/mol) |",
        "|---:|---|---:|---:|---:|",
        *rows,
    ])
    write_report(Path(args.out), text)


if __name__ == "__main__":
    main()

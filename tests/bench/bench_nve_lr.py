"""Benchmark: energy conservation (NVE) with the long-range ML–MM electrostatics, charged vs neutral ML zone.

Real i-PI (``inputs/templates/nve.xml``: 0.5 fs, velocities at 300 K, no COM removal), the real MM client and the
ML client with the shipped model, through ``mlmm run``'s launcher:

* ``acetate``: the acetate example (ML zone -1 e) solvated by ``mlmm prepare --solvate 1.5`` (TIP3P, one
  neutralising Na+), with the defaults prepare writes (``electrostatic-lr``);
* ``acetate-cutoff``: the same with ``embedding = "electrostatic"`` (cutoff only);
* ``methanol``: the shipped example (neutral zone, ``electrostatic-lr``).

Drift = slope of a linear fit of i-PI's conserved energy against time, per atom of the system, over the whole run
and over its last 75% (flexible water at 0.5 fs swings the conserved energy by O(10) kJ/mol while the O–H
vibrations fill up, most in a freshly prepared, minimised box: a run of a few ps is needed for a slope that means
something).

    python tests/bench/bench_nve_lr.py [--steps 4000] [--cases acetate acetate-cutoff methanol]
        [--out tests/bench/results/nve_lr_cpu.md]

Not a test: nothing is asserted (tests/coupling/test_nve_lr.py is the short version that is).
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from common import cpu_name, write_report  # noqa: E402

MODEL = ROOT / "inputs/models/small_b3lyp_svp.pt"
CASES = ("acetate", "acetate-cutoff", "methanol")


def prepared_acetate(work: Path, embedding: str | None = None) -> Path:
    """The acetate example solvated (1.5 nm padding), written by `mlmm prepare`; ``embedding`` overrides the
    scheme it wrote."""
    from driver.cli import main as cli
    from potentials.core.spec import SystemSpec

    out = work / "acetate"
    if not (out / "system.toml").exists():
        assert cli(["prepare", str(ROOT / "inputs/examples/acetate/input.pdb"), "--ml", "resname ACT",
                    "--solvate", "1.5", "--out", str(out)]) == 0
    if embedding is None:
        return out / "system.toml"
    spec = SystemSpec.load(out / "system.toml")
    spec.coupling.embedding = embedding
    path = out / f"system-{embedding}.toml"
    spec.save(path)
    return path


def case_system(name: str, work: Path) -> Path:
    if name == "methanol":
        return ROOT / "inputs/examples/methanol/prepared/system.toml"
    return prepared_acetate(work, "electrostatic" if name == "acetate-cutoff" else None)


def read_properties(path: Path) -> dict[str, np.ndarray]:
    with open(path) as fh:
        rows = list(csv.DictReader(fh))
    return {k: np.array([float(r[k]) for r in rows]) for k in rows[0]}


def nve_drift(system: Path, steps: int, out: Path, seed: int = 7) -> dict:
    """Run NVE; conserved-energy drift (kJ/mol/ps, and per atom), its swing, the ML charge and step time."""
    from driver import launch
    from potentials.core.spec import SystemSpec
    from potentials.openmm_system import load_system

    spec = SystemSpec.load(system)
    natoms = load_system(spec)[0].getNumAtoms()
    res = launch.run_simulation(ROOT / "inputs/templates/nve.xml", system, out=out, model=MODEL, steps=steps,
                                seed=seed, progress=False)
    p = read_properties(res.properties_csv)
    temperature = next(v for k, v in p.items() if k.startswith("temperature"))
    slope = float(np.polyfit(p["time_ps"], p["conserved_kjmol"], 1)[0])
    late = p["time_ps"] >= 0.25 * p["time_ps"][-1]              # without the O–H vibrations filling up
    slope_late = float(np.polyfit(p["time_ps"][late], p["conserved_kjmol"][late], 1)[0])
    return {"embedding": spec.coupling.embedding, "charge": spec.ml.charge, "atoms": natoms,
            "steps": res.steps_done, "ps": float(p["time_ps"][-1]), "drift": slope, "per_atom": slope / natoms,
            "late_per_atom": slope_late / natoms,
            "swing": float(np.ptp(p["conserved_kjmol"])), "temperature": float(np.mean(temperature))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    ap.add_argument("--out", default=str(ROOT / "tests/bench/results/nve_lr_cpu.md"))
    args = ap.parse_args(argv)
    lines = [f"# NVE with long-range ML–MM electrostatics (CPU: {cpu_name()}, load average "
             f"{os.getloadavg()[0]:.1f} at the start; 0.5 fs, i-PI nve.xml, shipped model)", "",
             "| case | embedding | ML charge | atoms | ps | drift kJ/mol/ps | drift per atom kJ/mol/ps | "
             "per atom, last 75% of the run | conserved swing kJ/mol | mean T K |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name in args.cases:
            r = nve_drift(case_system(name, work), args.steps, work / f"run-{name}")
            lines.append(f"| {name} | {r['embedding']} | {r['charge']:+d} | {r['atoms']} | {r['ps']:.2f} | "
                         f"{r['drift']:+.3f} | {r['per_atom']:+.2e} | {r['late_per_atom']:+.2e} | {r['swing']:.1f} | "
                         f"{r['temperature']:.0f} |")
            print(lines[-1], flush=True)
    write_report(Path(args.out), "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

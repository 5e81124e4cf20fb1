"""Benchmark: other packages' potentials, `mlmm run` vs openmm-ml's in-process route, side by side.

System: alanine dipeptide (the ML zone, 22 atoms) in 232 TIP3P waters, 2 nm box, PME (MM cutoff 0.7 nm),
mechanical embedding with the force field's charges on the ML atoms (what openmm-ml's ``createMixedSystem``
does). Models: a fresh MACE (mace-torch ScaleShiftMACE, 2 interactions, ``--mace-channels`` x 0e+1o, r_max 5 Å,
float64 unless ``--dtype float32``) and a fresh AIMNet2 (the ``aimnet`` package's architecture, small hidden
layers), both with random weights (the step time does not depend on the weights).

Route 1, ``mlmm run``: real i-PI + ``mlmm client ml`` (the model file) + ``mlmm client mm`` over unix sockets,
Langevin thermostat, 0.5 fs, ``--threads 1+2``; step time = median of i-PI's ``t/step``.
Route 2, openmm-ml: ``MLPotential('mace'|'aimnet', modelPath=FILE).createMixedSystem(...)`` in one OpenMM
Context (the model in an ``openmm.PythonForce``), ``LangevinMiddleIntegrator`` 0.5 fs, CPU platform with all
threads, torch with 1 thread; step time = wall time of ``--steps`` steps / steps.

    python tests/bench/bench_foreign.py [--models mace aimnet2] [--steps 30] [--out tests/bench/results/foreign_cpu.md]

Not a test: nothing is asserted.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from bench_step import DT_FS, T_K, TAU_FS, langevin_input, ns_per_day  # noqa: E402
from common import cpu_name, ipi_step_time, write_report  # noqa: E402
from driver import launch  # noqa: E402
from model_builders import build_aimnet2, build_mace  # noqa: E402


def dipeptide_system(work: Path) -> Path:
    import tomllib

    import tomli_w

    from driver.cli import main as cli

    out = work / "ala"
    assert cli(["prepare", str(ROOT / "inputs/examples/alanine-dipeptide/input.pdb"), "--ml", "chain A",
                "--solvate", "1.0", "--mm-cutoff", "0.7", "--embedding-cutoff", "0.4", "--out", str(out)]) == 0
    data = tomllib.loads((out / "system.toml").read_text())
    data["coupling"].update(embedding="mechanical", mechanical_charges="mm")
    (out / "system.toml").write_text(tomli_w.dumps(data))
    return out / "system.toml"


def via_mlmm_run(system: Path, model: Path, steps: int, skip: int, work: Path, tag: str, dtype: str | None) -> float:
    res = launch.run_simulation(langevin_input(work / "bench.xml"), system, out=work / tag, model=model,
                                steps=steps, seed=1, progress=False, threads="1+2",
                                model_options={"dtype": dtype})
    return ipi_step_time(res.folder, skip)


def via_openmm_ml(system: Path, model: Path, family: str, steps: int, threads: int, dtype: str | None) -> float:
    import numpy as np
    import openmm
    import torch
    from openmm import unit
    from openmmml import MLPotential

    from potentials.core.spec import SystemSpec
    from potentials.openmm_system import load_system

    torch.set_num_threads(1)
    spec = SystemSpec.load(system)
    topology, mm, positions = load_system(spec)
    ml = list(spec.ml.indices)
    if family == "mace":
        os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = "1"         # openmm-ml's bare torch.load of the pickle
        precision = {"float64": "double", "float32": "single"}.get(dtype or "", None)
        mixed = MLPotential("mace", modelPath=str(model)).createMixedSystem(topology, mm, ml, precision=precision,
                                                                             mlLongRange=False)
    else:
        mixed = MLPotential("aimnet", modelPath=str(model)).createMixedSystem(topology, mm, ml)
    integrator = openmm.LangevinMiddleIntegrator(T_K * unit.kelvin, 1000.0 / TAU_FS / unit.picosecond,
                                                DT_FS * unit.femtosecond)
    integrator.setRandomNumberSeed(1)
    context = openmm.Context(mixed, integrator, openmm.Platform.getPlatformByName("CPU"),
                             {"Threads": str(threads)})
    context.setPositions(np.asarray(positions))
    context.setVelocitiesToTemperature(T_K * unit.kelvin, 1)
    integrator.step(3)
    t0 = time.perf_counter()
    integrator.step(steps)
    context.getState(getEnergy=True)
    return (time.perf_counter() - t0) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["mace", "aimnet2"], choices=["mace", "aimnet2"])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--skip", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=2, help="runs of each route, alternated; the fastest counts")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--mace-channels", type=int, default=16)
    ap.add_argument("--dtype", default="float64", choices=["float32", "float64"], help="MACE precision")
    ap.add_argument("--out", type=Path, default=ROOT / "tests/bench/results/foreign_cpu.md")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_foreign_") as tmp:
        work = Path(tmp)
        system = dipeptide_system(work)
        for family in args.models:
            if family == "mace":
                model = build_mace(work / "mace.model", channels=args.mace_channels)
                label, dtype = f"MACE ({args.mace_channels}x0e+{args.mace_channels}x1o, {args.dtype})", args.dtype
            else:
                model, label, dtype = build_aimnet2(work / "aimnet"), "AIMNet2 (small, float32)", None
            ours, theirs = [], []
            for k in range(args.repeats):            # alternated: a shared machine's load hits both routes alike
                ours.append(via_mlmm_run(system, model, args.steps, args.skip, work, f"{family}{k}", dtype))
                theirs.append(via_openmm_ml(system, model, family, args.steps, args.threads, dtype))
            ours, theirs = min(ours), min(theirs)
            rows.append(f"| {label} | {ours * 1e3:.1f} | {ns_per_day(ours):.2f} | {theirs * 1e3:.1f} | "
                        f"{ns_per_day(theirs):.2f} | {theirs / ours:.2f}x |")
    text = "\n".join([
        f"# Other packages' potentials: `mlmm run` vs openmm-ml ({cpu_name()}, {os.cpu_count()} cores)",
        "",
        "Alanine dipeptide (22 ML atoms) in 232 TIP3P waters (718 atoms), PME, mechanical embedding with MM "
        f"charges on the ML atoms, Langevin 0.5 fs, {args.steps} steps, best of {args.repeats} alternated runs per route "
        "(`python tests/bench/bench_foreign.py`).",
        "",
        "| model | `mlmm run` ms/step | ns/day | openmm-ml ms/step | ns/day | speed-up of `mlmm run` |",
        "|---|---:|---:|---:|---:|---:|",
        *rows])
    write_report(args.out, text)


if __name__ == "__main__":
    main()

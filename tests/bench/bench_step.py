"""Benchmark: where an ML/MM MD step goes, and `mlmm run` vs the same model inside OpenMM (PythonForce).

Cases (``--cases``):

* ``example``   the shipped methanol-in-water example (2637 atoms, 6 ML atoms, PME)
* ``dhfr-30``   DHFR in water, the JAC benchmark (23 558 atoms, PME): ML zone = the 10 waters nearest the
                water farthest from protein and ions, 30 atoms
* ``dhfr-500``  the same with the 167 nearest waters, 501 ML atoms (embedding cutoff 1.0 nm: the zone's 2.0 nm
                radius leaves no room for 1.2 nm in the 6.2 nm box)

(Whole molecules only here; zones that cut the protein use link atoms, coupling/link_atoms.py.)

Route 1, ``mlmm run``: real i-PI + the ML client + the OpenMM client over unix sockets, NVT Langevin (i-PI
``<thermostat mode='langevin'>``, tau 100 fs), 0.5 fs. The step time is i-PI's own ``t/step`` (median after
``--skip`` steps); the breakdown comes from the clients' ``summary:`` lines: ML = coupling (embedding
selection, phi/E and their chain rule back to the atoms) + network (forward + backward) + output (force array,
extras), MM = OpenMM, wire = reading positions + sending forces (both clients), i-PI = step −
max(ML + its wire, MM + its wire). Driver overhead = step − max(ML, MM): what the sockets and i-PI add to the
slower engine.

Route 2, in-process: one OpenMM Context with the same MM system plus an ``openmm.PythonForce`` whose callback
runs the same :class:`coupling.ml_engine.MLEngine` (electrostatic embedding included) — the openmm-ml way —
with ``LangevinMiddleIntegrator`` (friction 10/ps = 1/tau), 0.5 fs. Step time = wall time of ``--steps`` steps.

Threads: each route gets the whole machine. ``mlmm run --threads ML+MM`` for each split in ``--splits``
(default: half+half, all+all, 1+all; the clients run concurrently), ``--compile`` adds a run with the network
compiled; in-process: OpenMM gets all ``--threads``, torch 1 or all of them (they run one after the other;
both are run and the faster counts).

    python tests/bench/bench_step.py [--cases example dhfr-30 dhfr-500] [--steps 40] [--model M] [--compile]
        [--splits 1+1 2+2] [--device cpu|cuda] [--platform CPU|CUDA] [--threads 2]
        [--out tests/bench/results/step_cpu.md]

Default model: the shipped ``inputs/models/small_b3lyp_svp.pt``. Not a test: nothing is asserted.
"""
from __future__ import annotations

import argparse
import gzip
import os
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
from scipy.spatial import cKDTree

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from common import (client_summary, cpu_name, ipi_step_time,  # noqa: E402
                    write_report)
from driver import launch, xmlinput  # noqa: E402
from potentials.core.spec import CouplingSpec, MLSpec, MMSpec, StructureSpec, SystemSpec  # noqa: E402

# case -> (ML waters, embedding cutoff nm); None: the shipped example. The 167 waters of the big zone span 2.0 nm from
# their centroid, so in the 6.2 nm box the embedding cutoff must drop to 1.0 nm (cutoff + radius < half the box)
CASES = {"example": None, "dhfr-30": (10, 1.2), "dhfr-500": (167, 1.0)}
TAU_FS, DT_FS, T_K = 100.0, 0.5, 300.0


# ---------------------------------------------------------------------------------------------- systems
def dhfr_system(work: Path, n_waters: int, embedding_cutoff: float = 1.2) -> Path:
    """system.toml for the JAC DHFR box with the ``n_waters`` waters nearest the bulk-most water (the one
    farthest from protein and ions) as the ML zone.

    Not the active site: next to Asp27's carboxylate the shipped model (trained on neutral solutes in water)
    is out of its domain, and in-process runs collapsed within 30 steps (ML energy falling ~2000 kJ/mol)."""
    from openmm import app

    pdb = work / "dhfr.pdb"
    if not pdb.exists():
        pdb.write_bytes(gzip.decompress((ROOT / "inputs/examples/dhfr/dhfr_jac.pdb.gz").read_bytes()))
    structure = app.PDBFile(str(pdb))
    pos = np.asarray(structure.getPositions(asNumpy=True)._value)
    box = np.asarray([[v.x, v.y, v.z] for v in structure.topology.getPeriodicBoxVectors()])
    waters = [r for r in structure.topology.residues() if r.name == "HOH"]
    oxygens = np.array([pos[next(a.index for a in r.atoms() if a.element.symbol == "O")] for r in waters])
    solute = pos[[a.index for a in structure.topology.atoms() if a.residue.name != "HOH"]]
    side = np.diag(box)                                                     # the JAC box is rectangular
    far, _ = cKDTree(solute % side, boxsize=side).query(oxygens % side)
    d = oxygens - oxygens[np.argmax(far)]
    d -= np.round(d @ np.linalg.inv(box)) @ box
    chosen = [waters[i] for i in np.argsort(np.linalg.norm(d, axis=1))[:n_waters]]
    indices = sorted(a.index for r in chosen for a in r.atoms())
    spec = SystemSpec(StructureSpec(file=pdb.name, box_nm=box.tolist()),
                      MLSpec(selection="index " + " ".join(f"{a.index}-{a.index + 2}" for a in          # waters
                                                           sorted((next(r.atoms()) for r in chosen),
                                                                  key=lambda a: a.index)),
                             indices=indices, charge=0),
                      MMSpec(cutoff_nm=1.0), CouplingSpec(cutoff_nm=embedding_cutoff))
    path = work / f"dhfr-{3 * n_waters}.toml"
    spec.save(path)
    return path


def case_system(name: str, work: Path) -> Path:
    n = CASES[name]
    return ROOT / "inputs/examples/methanol/prepared/system.toml" if n is None else dhfr_system(work, *n)


# ---------------------------------------------------------------------------------------------- route 1
def langevin_input(dst: Path) -> Path:
    """nvt_bussi.xml with a Langevin thermostat, t/step printed every step and no trajectory output."""
    tree = xmlinput.load(ROOT / "inputs/templates/nvt_bussi.xml")
    root = tree.getroot()
    root.set("verbosity", "high")
    out = root.find("output")
    for el in list(out):
        if el.tag in ("trajectory", "checkpoint"):
            out.remove(el)
    thermo = root.find(".//thermostat")
    thermo.set("mode", "langevin")
    thermo.find("tau").text = f" {TAU_FS:g} "
    root.find(".//timestep").text = f" {DT_FS:g} "
    xmlinput.write(tree, dst)
    return dst


def via_sockets(system: Path, model: Path, steps: int, skip: int, threads: tuple[int, int], compile: bool,
                device: str, mm_platform: str | None, work: Path, tag: str) -> dict[str, float]:
    res = launch.run_simulation(langevin_input(work / "bench.xml"), system, out=work / tag, model=model,
                                steps=steps, seed=1, device=device, platform=mm_platform, progress=False,
                                threads=f"{threads[0]}+{threads[1]}", compile=compile)
    step = ipi_step_time(res.folder, skip)
    # per step: the initial force evaluation is left out (compilation, caches; its wire time is kept)
    ml, mm = client_summary(res.folder / "client_ml.log"), client_summary(res.folder / "client_mm.log")
    per = {k: v / steps for k, v in ml.items() if k.endswith("_s")}
    per["compute_s"] -= ml["first_s"] / steps                 # (the ML engine's split leaves it out itself)
    t_mm, w_mm = (mm["compute_s"] - mm["first_s"]) / steps, mm["wire_s"] / steps
    return {"step": step, "ml": per["compute_s"], "coupling": per.get("coupling_s", np.nan),
            "network": per.get("network_s", np.nan), "output": per.get("output_s", np.nan), "mm": t_mm,
            "wire": per["wire_s"] + w_mm, "ipi": step - max(per["compute_s"] + per["wire_s"], t_mm + w_mm),
            "overhead": step - max(per["compute_s"], t_mm)}


# ---------------------------------------------------------------------------------------------- route 2
def in_process(system: Path, model: Path, steps: int, threads: int, device: str,
               mm_platform: str | None, torch_threads: int | None = None) -> dict[str, float]:
    """The same MM system + the ML engine as an openmm.PythonForce, LangevinMiddleIntegrator."""
    import openmm
    import torch
    from openmm import unit

    from coupling.engines import mm_system_from_spec
    from coupling.engines import EngineOptions, build_ml_engine
    from potentials.openmm_system import load_system

    torch.set_num_threads(torch_threads or threads)
    spec = SystemSpec.load(system)
    topology, mm, positions = load_system(spec)
    mm = mm_system_from_spec(spec, topology, mm, positions, model_path=str(model), device=device)
    engine = build_ml_engine(spec, EngineOptions(model=str(model), device=device))
    calls = {"n": 0, "s": 0.0}

    def ml_force(state):
        t = time.perf_counter()
        pos = state.getPositions(asNumpy=True).value_in_unit(unit.nanometer)
        box = state.getPeriodicBoxVectors(asNumpy=True).value_in_unit(unit.nanometer) \
            if spec.structure.periodic else None
        r = engine.compute(np.asarray(pos)[None], None if box is None else np.asarray(box)[None])[0]
        calls["n"], calls["s"] = calls["n"] + 1, calls["s"] + time.perf_counter() - t
        return r.energy, r.forces

    force = openmm.PythonForce(ml_force)
    force.setUsesPeriodicBoundaryConditions(spec.structure.periodic)
    mm.addForce(force)
    integrator = openmm.LangevinMiddleIntegrator(T_K * unit.kelvin, 1000.0 / TAU_FS / unit.picosecond,
                                                DT_FS * unit.femtosecond)
    integrator.setRandomNumberSeed(1)                            # reproducible (i-PI runs with seed 1 too)
    name = mm_platform or "CPU"
    props = {"Threads": str(threads)} if name == "CPU" else {}
    context = openmm.Context(mm, integrator, openmm.Platform.getPlatformByName(name), props)
    context.setPositions(positions)
    context.setVelocitiesToTemperature(T_K * unit.kelvin, 1)
    integrator.step(3)                                           # warm-up (first calls build caches)
    builds0, calls["n"], calls["s"] = engine.list_builds, 0, 0.0
    t0 = time.perf_counter()
    integrator.step(steps)
    context.getState(getEnergy=True)                             # wait for the last step
    wall = time.perf_counter() - t0
    return {"step": wall / steps, "ml": calls["s"] / max(calls["n"], 1),
            "mm": (wall - calls["s"]) / steps, "rebuilds": (engine.list_builds - builds0) / steps}


# ---------------------------------------------------------------------------------------------- report
def ns_per_day(step_s: float) -> float:
    return DT_FS * 1e-6 * 86400.0 / step_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--model", type=Path, default=ROOT / "inputs/models/small_b3lyp_svp.pt")
    ap.add_argument("--steps", type=int, default=None, help="MD steps per run (default: 40 for the example, 20 "
                    "for DHFR, whose multi-water ML zones leave the shipped model's domain after ~25 steps)")
    ap.add_argument("--skip", type=int, default=3, help="first i-PI steps left out of the median")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="in-process: OpenMM and torch threads")
    ap.add_argument("--splits", nargs="+", default=None, metavar="ML+MM",
                    help="mlmm run: threads of the ML client + the MM client, one run each (default: half+half and "
                         "all+all of --threads)")
    ap.add_argument("--compile", action="store_true", help="mlmm run: one more run with the network compiled "
                    "(torch.compile, 1 ML thread)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--platform", default=None, help="OpenMM platform (default CPU)")
    ap.add_argument("--out", type=Path, default=ROOT / "tests/bench/results/step_cpu.md")
    args = ap.parse_args()
    half = max(1, args.threads // 2)
    splits = [(tuple(int(x) for x in sp.split("+")), False) for sp in args.splits] if args.splits else \
        [(sp, False) for sp in dict.fromkeys([(half, max(1, args.threads - half)), (args.threads, args.threads),
                                              (1, args.threads)])]
    if args.compile:
        splits.append(((1, max(1, args.threads - 1)), True))

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_step_") as tmp:
        work = Path(tmp)
        for name in args.cases:
            system = case_system(name, work)
            spec = SystemSpec.load(system)
            natoms = sum(1 for ln in open(spec.structure_path) if ln.startswith(("ATOM", "HETATM")))
            t0 = time.monotonic()
            steps = args.steps or (40 if name == "example" else 20)
            # the in-process route at its best: torch with 1 thread or all (small zones prefer 1)
            runs = [in_process(system, args.model, steps, args.threads, args.device, args.platform, t)
                    for t in dict.fromkeys((1, args.threads))]
            p = min(runs, key=lambda r: r["step"])
            each = "  ".join(f"{1e3 * r['step']:.1f}" for r in runs)
            print(f"{name:9s} in-process {each} ms/step "
                  f"(1/{args.threads} torch threads; best: ML {1e3 * p['ml']:.1f}, rest "
                  f"{1e3 * p['mm']:.1f}, {p['rebuilds']:.2f} list builds/step)", flush=True)
            for split, compile in splits:
                s = via_sockets(system, args.model, steps, args.skip, split, compile, args.device,
                                args.platform, work, f"{name}-{split[0]}-{split[1]}{'-c' * compile}")
                label = f"{split[0]}+{split[1]}{' compiled' if compile else ''}"
                rows.append((name, natoms, len(spec.ml.indices), label, s, p))
                print(f"{name:9s} mlmm run {label} {1e3 * s['step']:7.1f} ms/step (ML "
                      f"{1e3 * s['ml']:.1f} = coupling {1e3 * s['coupling']:.1f} + network {1e3 * s['network']:.1f} "
                      f"+ output {1e3 * s['output']:.1f}; MM {1e3 * s['mm']:.1f}; wire {1e3 * s['wire']:.2f}; i-PI "
                      f"{1e3 * s['ipi']:.1f}) | {p['step'] / s['step']:.2f}x in-process  "
                      f"({time.monotonic() - t0:.0f} s)", flush=True)

    cpu = cpu_name()
    lines = [
        "# ML/MM step: breakdown and `mlmm run` vs in-process OpenMM (`python tests/bench/bench_step.py`)", "",
        f"Model `{args.model.relative_to(ROOT) if args.model.is_relative_to(ROOT) else args.model}`, device "
        f"{args.device}, OpenMM platform {args.platform or 'CPU'}, NVT Langevin (tau {TAU_FS:g} fs), {DT_FS:g} fs, "
        f"{args.steps or '40 (example) / 20 (DHFR)'} steps (i-PI: median t/step after {args.skip}). "
        f"In-process: {args.threads} OpenMM + 1 or {args.threads} torch threads, the faster (sequential); "
        "mlmm run: ML client + MM client threads as in the column (concurrent).",
        f"Machine: {cpu}, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}.", "",
        "Per step, ms. ML = coupling (neighbour list, φ/E and their chain rule) + network (forward + backward) + "
        "output; wire: both clients; i-PI = step − max(ML + wire, MM + wire); overhead = step − max(ML, MM). "
        "In-process: ML = the PythonForce callback, rest = OpenMM (MM forces, integrator, state transfer).", "",
        "| case | atoms | ML atoms | threads ML+MM | ML | coupling | network | output | MM | wire | i-PI | **step** "
        "| overhead | in-process ML | in-process rest | **in-process step** | ns/day mlmm run | ns/day in-process "
        "| speed-up |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, natoms, nml, split, s, p in rows:
        ms = lambda x: f"{1e3 * x:.1f}"                                          # noqa: E731
        lines.append(
            f"| {name} | {natoms} | {nml} | {split} | {ms(s['ml'])} | {ms(s['coupling'])} | "
            f"{ms(s['network'])} | {ms(s['output'])} | {ms(s['mm'])} | {1e3 * s['wire']:.2f} | {ms(s['ipi'])} | "
            f"**{ms(s['step'])}** | {100 * s['overhead'] / s['step']:.0f}% | {ms(p['ml'])} | {ms(p['mm'])} | "
            f"**{ms(p['step'])}** | {ns_per_day(s['step']):.2f} | {ns_per_day(p['step']):.2f} | "
            f"{p['step'] / s['step']:.2f}× |")
    write_report(args.out, "\n".join(lines))


if __name__ == "__main__":
    main()

"""Benchmark: path-integral ML/MM step time vs number of beads, with and without batching and contraction.

Runs `mlmm run` (real i-PI, the ML client, the OpenMM client) on a system (default: the methanol-in-water
example, 2637 atoms, PME) with ``inputs/templates/pimd_pile_l.xml`` variants:

* ``unbatched``  every bead is its own request (batch_size 1)
* ``batched``    one request per forcefield per step (batch_size = beads; one network call for all beads)
* ``rpc-ml``     batched, the ML force contracted to ``--contract`` beads (``<force nbeads>``)
* ``rpc-mm``     batched, the MM force contracted to ``--contract`` beads

Per-step time is i-PI's own ``t/step`` (verbosity high prints it every step; the first ``--skip`` steps are
dropped). The breakdown comes from the clients' closing ``summary:`` lines (driver/client.py): ML and MM =
engine time per force evaluation, wire = time reading positions and sending forces (both clients), i-PI = the
rest of the step (integrator, normal modes, thermostat, socket polling; the ML and MM clients run
concurrently, so i-PI = step − max(ML + its wire, MM + its wire)).

    python tests/bench/bench_pimd.py [--system S] [--model M] [--beads 1 4 8 16] [--steps 20] [--device cpu]
        [--threads 1] [--out tests/bench/results/pimd_cpu.md]

Default model: a random-weight tiny network (inputs/models/configs/tiny.toml): the timing of a trained model
of the same preset is the same. Not a test: nothing is asserted.
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

from common import (client_summary, cpu_name, ipi_step_time,  # noqa: E402
                    write_report)
from driver import launch, xmlinput  # noqa: E402

MODES = ("unbatched", "batched", "rpc-ml", "rpc-mm")


def variant(dst: Path, mode: str, beads: int, contract: int) -> Path:
    tree = xmlinput.load(ROOT / "inputs/templates/pimd_pile_l.xml")
    root = tree.getroot()
    root.set("verbosity", "high")                       # t/step on every step
    for el in root.iter("ffsocket"):
        el.find("batch_size").text = "1" if mode == "unbatched" else str(beads)
    for name in ("pos", "xc", "ml_dipole"):             # no trajectory I/O in the timing
        for t in root.findall("output/trajectory"):
            if t.get("filename") == name:
                root.find("output").remove(t)
    for force in root.iter("force"):
        if mode == f"rpc-{force.get('forcefield')}":
            force.set("nbeads", str(contract))
    xmlinput.write(tree, dst)
    return dst


def measure(system: Path, model: Path, mode: str, beads: int, steps: int, skip: int, contract: int,
            device: str, work: Path) -> dict[str, float]:
    tag = f"{mode}-{beads}"
    xml = variant(work / f"{tag}.xml", mode, beads, contract)
    res = launch.run_simulation(xml, system, out=work / tag, model=model, steps=steps, seed=1, beads=beads,
                                device=device, progress=False)
    step = ipi_step_time(res.folder, skip)
    # per step; the initial force evaluation (warm-up: caches, neighbour lists) is left out of the compute times
    ml, mm = client_summary(res.folder / "client_ml.log"), client_summary(res.folder / "client_mm.log")
    t_ml, t_mm = (ml["compute_s"] - ml["first_s"]) / steps, (mm["compute_s"] - mm["first_s"]) / steps
    w_ml, w_mm = ml["wire_s"] / steps, mm["wire_s"] / steps
    return {"step": step, "ml": t_ml, "mm": t_mm, "wire": w_ml + w_mm,
            "ipi": step - max(t_ml + w_ml, t_mm + w_mm),
            "ml_structs": ml["computed"] / (steps + 1), "mm_structs": mm["computed"] / (steps + 1)}


def tiny_model(path: Path) -> Path:
    from potentials.model_io import save_model
    from potentials.network import EmbeddedAIMNet2, ModelConfig

    save_model(path, EmbeddedAIMNet2(ModelConfig.from_toml(ROOT / "inputs/models/configs/tiny.toml"), seed=1))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--system", type=Path, default=ROOT / "inputs/examples/methanol/prepared/system.toml")
    ap.add_argument("--model", type=Path, default=None, help="default: random-weight tiny network")
    ap.add_argument("--beads", type=int, nargs="+", default=[1, 4, 8, 16])
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--skip", type=int, default=3, help="first steps left out of the median")
    ap.add_argument("--contract", type=int, default=2, help="beads of the contracted force (rpc-*)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="OMP/torch threads per client")
    ap.add_argument("--out", type=Path, default=ROOT / "tests/bench/results/pimd_cpu.md")
    args = ap.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)       # inherited by i-PI and the clients

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_pimd_") as tmp:
        work = Path(tmp)
        model = args.model or tiny_model(work / "tiny.pt")
        for beads in args.beads:
            for mode in args.modes:
                if beads == 1 and mode != "batched":         # nothing to batch or contract with one bead
                    continue
                if mode.startswith("rpc") and args.contract >= beads:
                    continue
                t0 = time.monotonic()
                r = measure(args.system, model, mode, beads, args.steps, args.skip, args.contract, args.device,
                            work)
                rows.append((beads, mode, r))
                print(f"{beads:3d} beads {mode:10s} {1e3 * r['step']:8.1f} ms/step  ML {1e3 * r['ml']:6.1f}  "
                      f"MM {1e3 * r['mm']:6.1f}  wire {1e3 * r['wire']:5.1f}  i-PI {1e3 * r['ipi']:6.1f}  "
                      f"({time.monotonic() - t0:.0f} s)", flush=True)

    base = next((r["step"] for b, m, r in rows if b == 1), None)
    natoms = sum(1 for ln in open(launch.SystemSpec.load(args.system).structure_path)
                 if ln.startswith(("ATOM", "HETATM")))
    lines = [
        "# PIMD ML/MM: step time vs beads (`python tests/bench/bench_pimd.py`)", "",
        f"System `{args.system.relative_to(ROOT) if args.system.is_relative_to(ROOT) else args.system}` "
        f"({natoms} atoms), model {'`' + str(args.model) + '`' if args.model else 'tiny preset (random weights)'},"
        f" device {args.device}, {args.threads} thread(s) per process, template pimd_pile_l.xml, "
        f"{args.steps} steps (median i-PI t/step after {args.skip}); contraction to {args.contract} beads.",
        f"Machine: {cpu_name()}, {os.cpu_count()} cores, "
        f"{time.strftime('%Y-%m-%d')}.", "",
        "ML, MM: engine time per force evaluation (all beads of the step); wire: reading positions + sending "
        "forces, both clients; i-PI: step − max(ML + wire, MM + wire) (integrator, normal modes, thermostat, "
        "polling). ML/MM structures: computed per step (batch padding skipped).", "",
        "| beads | mode | ms/step | steps/s | × 1 bead | ML ms | MM ms | wire ms | i-PI ms | ML structs | MM structs |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for beads, mode, r in rows:
        rel = f"{r['step'] / base:.2f}" if base else "–"
        lines.append(f"| {beads} | {mode} | {1e3 * r['step']:.1f} | {1 / r['step']:.2f} | {rel} | "
                     f"{1e3 * r['ml']:.1f} | {1e3 * r['mm']:.1f} | {1e3 * r['wire']:.2f} | {1e3 * r['ipi']:.1f} | "
                     f"{r['ml_structs']:.2f} | {r['mm_structs']:.2f} |")
    write_report(args.out, "\n".join(lines))


if __name__ == "__main__":
    main()

"""On demand (not part of the test suite): the two link-atom runs of the README's enzyme tutorial with a zones
model, side by side, and what the zones model card and PERFORMANCE.md §12 report of them (issue #17).

Prepares (once, into ``--work``) and runs, through the documented CLI and at the same time:

* step 6, the DHFR pocket: Asp27's side chain cut at CA–CB plus its three hydrogen-bonded waters, 23 558 atoms,
  ``--dhfr-steps`` (1000) steps of 0.5 fs;
* step 7, the alanine dipeptide with both peptide groups in the zone (two cuts) in a 1 nm water droplet,
  ``--dip-steps`` (2000) steps.

Then reads the trajectories back with MDTraj and prints, per run: the wall time, whether a client warned or the
force guard stopped it, and

* DHFR: the ranges of each pocket water's O···OD (nearest carboxylate O), O–H, H–H, the carboxylate C–O and CB–CG;
* dipeptide: the range of every zone bond's length over its prepared length, and the temperature of the second
  half (``mlmm analyze --skip``).

    OMP_NUM_THREADS=1 python tests/bench/zones_runs.py inputs/models/small_b3lyp_svp_zones.pt --json runs.json
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

TEMPLATE = ROOT / "inputs" / "templates" / "nvt_bussi.xml"


def readme_prepare(out: str) -> list[str]:
    """The arguments of the README's ``mlmm prepare ... --out OUT`` command, without ``--out``, the input path made
    absolute: the bench runs the tutorial's own commands, so the two cannot drift apart."""
    import shlex

    text = (ROOT / "README.md").read_text().replace("\\\n", " ")
    for line in text.splitlines():
        words = shlex.split(line) if line.startswith("mlmm prepare ") else []
        i = words.index("--out") if "--out" in words else -1
        if i > 0 and words[i + 1] == out:
            args = words[2:i] + words[i + 2:]
            return [str(ROOT / args[0]), *args[1:]]
    sys.exit(f"zones_runs: README.md has no `mlmm prepare ... --out {out}` command")


# the README's `mlmm prepare` commands of tutorial steps 6 (pocket waters) and 7
PREPARE = {"dhfr-pocket": readme_prepare("dhfr-pocket/"), "dip": readme_prepare("dip/")}


def mlmm(args: list[str], log: Path) -> tuple[int, float]:
    """Run ``mlmm ARGS`` (one thread each, as two runs share the machine); (exit code, wall s), output in LOG."""
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        rc = subprocess.run([sys.executable, "-m", "driver.cli", *args], stdout=fh, stderr=subprocess.STDOUT,
                            env=env, cwd=ROOT).returncode
    return rc, time.perf_counter() - t0


def prepare(work: Path, name: str) -> Path:
    """``WORK/NAME/system.toml``, prepared with the README's command unless it is there already."""
    system = work / name / "system.toml"
    if not system.is_file():
        rc, _ = mlmm(["prepare", *PREPARE[name], "--out", str(work / name)], work / f"prepare.{name}.log")
        if rc != 0:
            sys.exit(f"zones_runs: mlmm prepare {name} failed (exit {rc}); see {work}/prepare.{name}.log")
    return system


def trajectory(run: Path, system: Path):
    """(MDTraj trajectory of the run, the ML indices, the prepared structure)."""
    import mdtraj as md

    from potentials.core.spec import SystemSpec

    spec = SystemSpec.load(system)
    pdb = str(spec.structure_path)
    return md.load(str(run / "sim.pos_0.nc"), top=pdb), spec.ml.indices, md.load(pdb)


def span(d: np.ndarray) -> list[float]:
    return [round(float(d.min()), 3), round(float(d.max()), 3)]


def dhfr_ranges(run: Path, system: Path) -> dict:
    """Å ranges of the pocket zone: each water's O···OD (nearer carboxylate O), O–H, H–H, C–O, CB–CG."""
    import mdtraj as md

    t, ml, _ = trajectory(run, system)
    atoms = [t.topology.atom(i) for i in ml]
    asp = {a.name: a.index for a in atoms if a.residue.name == "ASP"}
    waters: dict[int, dict[str, int]] = {}
    for a in atoms:
        if a.residue.name == "HOH":
            waters.setdefault(a.residue.index, {})[a.name] = a.index
    w = list(waters.values())

    def dist(pairs):
        return 10.0 * md.compute_distances(t, np.array(pairs))

    oo = dist([(x["O"], asp[o]) for x in w for o in ("OD1", "OD2")]).reshape(t.n_frames, len(w), 2).min(-1)
    return {"frames": t.n_frames, "waters": len(w), "O..OD": span(oo),
            "O-H": span(dist([(x["O"], x[h]) for x in w for h in ("H1", "H2")])),
            "H-H": span(dist([(x["H1"], x["H2"]) for x in w])),
            "C-O": span(dist([(asp["CG"], asp["OD1"]), (asp["CG"], asp["OD2"])])),
            "C-C": span(dist([(asp["CB"], asp["CG"])]))}


def dipeptide_ranges(run: Path, system: Path, skip_ps: float) -> dict:
    """Range of the zone bonds' length / prepared length, and the temperature after ``skip_ps``."""
    import mdtraj as md

    from driver.analyze import analyze

    t, ml, ref = trajectory(run, system)
    zone = set(ml)
    bonds = np.array([(a.index, b.index) for a, b in t.topology.bonds if a.index in zone and b.index in zone])
    ratio = md.compute_distances(t, bonds) / md.compute_distances(ref, bonds)
    s = analyze(run, skip_ps=skip_ps).values
    return {"frames": t.n_frames, "bonds": len(bonds), "ratio": span(ratio),
            "T_K": round(float(s["mean temperature"][0]), 1), "T_std_K": round(float(s["temperature std"][0]), 1)}


def flagged(log: Path) -> list[str]:
    """Lines of a run's log that warn or report the force guard."""
    return [ln for ln in log.read_text().splitlines() if re.search(r"warn|guard", ln, re.I)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path, help="the zones model (.pt)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/zones_runs"),
                    help="prepared systems (kept and reused) and the runs (default /tmp/zones_runs)")
    ap.add_argument("--dhfr-steps", type=int, default=1000)
    ap.add_argument("--dip-steps", type=int, default=2000)
    ap.add_argument("--skip", type=float, default=0.5, help="ps left out of the dipeptide's temperature (0.5)")
    ap.add_argument("--json", type=Path, help="write every number here")
    a = ap.parse_args()
    work, model = a.work.resolve(), a.model.resolve()
    work.mkdir(parents=True, exist_ok=True)
    systems = {name: prepare(work, name) for name in PREPARE}
    steps = {"dhfr-pocket": a.dhfr_steps, "dip": a.dip_steps}

    def run(name: str) -> tuple[int, float]:
        out = work / f"{name}-run"
        if out.exists():
            shutil.rmtree(out)
        return mlmm(["run", str(TEMPLATE), "--system", str(systems[name]), "--model", str(model),
                     "--steps", str(steps[name]), "--out", str(out)], work / f"run.{name}.log")

    with ThreadPoolExecutor(2) as pool:                           # side by side, as the docs report them
        done = dict(zip(PREPARE, pool.map(run, PREPARE)))
    res: dict = {"model": str(model)}
    for name, (rc, wall) in done.items():
        log = work / f"run.{name}.log"
        res[name] = {"exit": rc, "wall_s": round(wall, 1), "steps": steps[name], "flagged": flagged(log)}
        print(f"{name}: exit {rc}, {steps[name]} steps in {wall:.0f} s" +
              ("".join(f"\n  ! {ln}" for ln in res[name]["flagged"])), flush=True)
        if rc != 0:
            print(f"  (see {log})")
    if done["dhfr-pocket"][0] == 0:
        r = res["dhfr-pocket"]["ranges"] = dhfr_ranges(work / "dhfr-pocket-run", systems["dhfr-pocket"])
        print(f"DHFR {r['frames']} frames, {r['waters']} waters: " +
              "  ".join(f"{k} {r[k][0]:.2f}-{r[k][1]:.2f}" for k in ("O..OD", "O-H", "H-H", "C-O", "C-C")) + " Å")
    if done["dip"][0] == 0:
        r = res["dip"]["ranges"] = dipeptide_ranges(work / "dip-run", systems["dip"], a.skip)
        print(f"dipeptide {r['frames']} frames, {r['bonds']} zone bonds: ratio {r['ratio'][0]:.2f}-"
              f"{r['ratio'][1]:.2f}; T {r['T_K']:.1f} ± {r['T_std_K']:.1f} K after {a.skip:g} ps")
    if a.json:
        a.json.write_text(json.dumps(res, indent=1))
    sys.exit(0 if all(rc == 0 for rc, _ in done.values()) else 1)


if __name__ == "__main__":
    main()

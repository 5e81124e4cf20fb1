"""Benchmark: the NPT density of flexible TIP3P from i-PI's barostat + the MM client's strain virial, against
OpenMM's own MonteCarloBarostat on the same system (same force field, PME, cutoff, dispersion correction).

Both sample the isothermal-isobaric ensemble of the same energy, so the densities must agree within the error
bars. A pair-force virial (no energy jumps at the cutoff) would miss the LJ truncation's impulsive term,
about -180 bar with a 0.8 nm cutoff, i.e. ~0.8 % too dense a liquid: the MM client's energy differences include
it, as OpenMM's Monte Carlo moves do.

* Start: a Modeller box of TIP3P (``--box`` nm cube), flexible (no constraints), minimised, then ``--pre-ps`` of
  NVT in OpenMM; both routes start from that state.
* OpenMM: LangevinMiddleIntegrator (300 K, 1/ps), 0.5 fs, MonteCarloBarostat (1 bar, every 25 steps).
* i-PI: ``inputs/templates/npt_bussi_mm.xml`` as shipped (SVR thermostat, isotropic BZP barostat, 0.5 fs), with
  ``i-pi`` as a subprocess and the MM client (:class:`potentials.openmm_engine.OpenMMEngine`, ``--virial`` mode)
  served in this process on the template's unix socket.
* After ``--equil-ps`` of each, the density over ``--prod-ps`` is averaged in ``--blocks`` blocks: mean ±
  the standard error of the block means.

    python tests/bench/bench_npt_density.py [--box 1.8] [--cutoff 0.8] [--pre-ps 2] [--equil-ps 10]
        [--prod-ps 40] [--blocks 5] [--virial isotropic] [--threads 1] [--seed 1]
        [--out tests/bench/results/npt_density.md]

Not a test: nothing is asserted.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
from common import cpu_name, write_report

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = ROOT / "inputs/templates/npt_bussi_mm.xml"
AMU_PER_NM3_TO_G_CM3 = 1.66053906660e-3   # 1 amu/nm^3 = 1.6605e-24 g / 1e-21 cm^3


def build(box_nm: float, cutoff: float):
    import openmm
    from openmm import app, unit

    ff = app.ForceField("amber14/tip3p.xml")
    m = app.Modeller(app.Topology(), [])
    m.addSolvent(ff, boxSize=openmm.Vec3(box_nm, box_nm, box_nm) * unit.nanometer)
    system = ff.createSystem(m.topology, nonbondedMethod=app.PME, nonbondedCutoff=cutoff * unit.nanometer,
                             constraints=None, rigidWater=False, ewaldErrorTolerance=5e-4)
    return m.topology, m.positions, system


def blocks(x: np.ndarray, n: int) -> tuple[float, float]:
    means = np.array([b.mean() for b in np.array_split(x, n)])
    return float(means.mean()), float(means.std(ddof=1) / np.sqrt(n))


def total_mass_amu(system) -> float:
    from openmm import unit
    return sum(system.getParticleMass(i).value_in_unit(unit.dalton) for i in range(system.getNumParticles()))


def openmm_npt(system, positions, velocities, box, args) -> np.ndarray:
    """Densities (g/cm^3) every 25 fs of the production part of an OpenMM MonteCarloBarostat run."""
    import copy

    import openmm
    from openmm import unit

    system = copy.deepcopy(system)
    system.addForce(openmm.MonteCarloBarostat(1.0 * unit.bar, 300.0 * unit.kelvin, 25))
    integ = openmm.LangevinMiddleIntegrator(300.0 * unit.kelvin, 1.0 / unit.picosecond, 0.0005 * unit.picosecond)
    integ.setRandomNumberSeed(args.seed)
    ctx = openmm.Context(system, integ, openmm.Platform.getPlatformByName("CPU"), {"Threads": str(args.threads)})
    ctx.setPeriodicBoxVectors(*box)
    ctx.setPositions(positions)
    ctx.setVelocities(velocities)
    integ.step(int(args.equil_ps / 0.0005))
    mass = total_mass_amu(system)
    out = []
    for _ in range(int(args.prod_ps / 0.025)):
        integ.step(50)
        vol = ctx.getState().getPeriodicBoxVolume().value_in_unit(unit.nanometer ** 3)
        out.append(mass / vol * AMU_PER_NM3_TO_G_CM3)
    return np.array(out)


def ipi_npt(system, topology, positions, box, args, workdir: Path) -> tuple[np.ndarray, float]:
    """Densities (g/cm^3) of the production part of an i-PI run of the NPT template, and ms per step."""
    import ase
    import ase.io
    from openmm import unit

    from driver import xmlinput
    from driver.client import serve
    from potentials.openmm_engine import OpenMMEngine

    pos_a = np.array(positions.value_in_unit(unit.angstrom))
    atoms = ase.Atoms([a.element.symbol for a in topology.atoms()], positions=pos_a,
                      cell=np.array([v.value_in_unit(unit.angstrom) for v in box]), pbc=True)
    atoms.set_masses([system.getParticleMass(i).value_in_unit(unit.dalton) for i in range(len(atoms))])
    ase.io.write(str(workdir / "init.extxyz"), atoms, format="extxyz")
    tree = ET.parse(TEMPLATE)
    root = tree.getroot()
    nsteps = int((args.equil_ps + args.prod_ps) / 0.0005)
    xmlinput.patch(root, init_file="init.extxyz", sockets_prefix=f"{workdir}/", steps=nsteps, seed=args.seed)
    xmlinput.write(tree, workdir / "input.xml")
    engine = OpenMMEngine(system, platform="CPU", threads=args.threads, virial=args.virial)
    ipi = subprocess.Popen([str(Path(sys.executable).parent / "i-pi"), "input.xml"], cwd=workdir,
                           stdout=open(workdir / "ipi.log", "w"), stderr=subprocess.STDOUT)
    client = threading.Thread(target=serve, args=(engine, f"unix:{workdir}/mm"), kwargs={"timeout": 120.0},
                              daemon=True)
    t0 = time.perf_counter()
    client.start()
    try:
        rc = ipi.wait()
    finally:
        if ipi.poll() is None:
            ipi.terminate()
    elapsed = time.perf_counter() - t0
    client.join(30)
    if rc != 0:
        raise RuntimeError(f"i-PI failed (rc {rc}); see {workdir / 'ipi.log'}")
    from ipi import read_output

    values, _ = read_output(str(workdir / "sim.out"))
    step, dens = np.asarray(values["step"]), np.asarray(values["density"])
    keep = step > args.equil_ps / 0.0005
    # i-PI's density is in g/cm^3 as the template asks; keep one value every 25 fs like the OpenMM route
    return dens[keep][::5], 1e3 * elapsed / nsteps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--box", type=float, default=1.8)
    ap.add_argument("--cutoff", type=float, default=0.8)
    ap.add_argument("--pre-ps", type=float, default=2.0)
    ap.add_argument("--equil-ps", type=float, default=10.0)
    ap.add_argument("--prod-ps", type=float, default=40.0)
    ap.add_argument("--blocks", type=int, default=5)
    ap.add_argument("--virial", default="isotropic", choices=("isotropic", "full"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "tests/bench/results/npt_density.md"))
    args = ap.parse_args()

    import openmm
    from openmm import unit

    topology, positions, system = build(args.box, args.cutoff)
    ctx = openmm.Context(system, openmm.LangevinMiddleIntegrator(300 * unit.kelvin, 5 / unit.picosecond,
                                                                 0.0005 * unit.picosecond),
                         openmm.Platform.getPlatformByName("CPU"), {"Threads": str(args.threads)})
    ctx.setPositions(positions)
    openmm.LocalEnergyMinimizer.minimize(ctx, 10.0, 500)
    ctx.setVelocitiesToTemperature(300 * unit.kelvin, args.seed)
    ctx.getIntegrator().step(int(args.pre_ps / 0.0005))
    st = ctx.getState(getPositions=True, getVelocities=True)
    box = st.getPeriodicBoxVectors()
    start_pos, start_vel = st.getPositions(), st.getVelocities()
    natoms = system.getNumParticles()
    print(f"{natoms} atoms; OpenMM MonteCarloBarostat run ...", flush=True)

    t = time.perf_counter()
    d_omm = openmm_npt(system, start_pos, start_vel, box, args)
    omm_ms = 1e3 * (time.perf_counter() - t) / ((args.equil_ps + args.prod_ps) / 0.0005)
    print(f"OpenMM: {blocks(d_omm, args.blocks)}; i-PI run ...", flush=True)
    with tempfile.TemporaryDirectory(prefix="npt_density_") as tmp:
        d_ipi, ipi_ms = ipi_npt(system, topology, start_pos, box, args, Path(tmp))
    m_omm, e_omm = blocks(d_omm, args.blocks)
    m_ipi, e_ipi = blocks(d_ipi, args.blocks)
    diff = m_ipi - m_omm
    text = "\n".join([
        "# NPT density of flexible TIP3P: i-PI barostat + MM-client virial vs OpenMM MonteCarloBarostat",
        "",
        f"`python tests/bench/bench_npt_density.py --box {args.box} --cutoff {args.cutoff} --equil-ps "
        f"{args.equil_ps} --prod-ps {args.prod_ps} --virial {args.virial} --threads {args.threads} --seed {args.seed}`",
        "",
        f"{natoms} atoms, PME (tolerance 5e-4), cutoff {args.cutoff} nm, dispersion correction, 300 K, 1 bar, 0.5 fs; "
        f"{args.blocks} blocks over {args.prod_ps} ps after {args.equil_ps} ps; CPU: {cpu_name()}.",
        "",
        "| route | density (g/cm³) | ms / step |",
        "|---|---:|---:|",
        f"| OpenMM LangevinMiddle + MonteCarloBarostat | {m_omm:.4f} ± {e_omm:.4f} | {omm_ms:.1f} |",
        f"| i-PI SVR + isotropic BZP barostat, MM virial '{args.virial}' | {m_ipi:.4f} ± {e_ipi:.4f} | "
        f"{ipi_ms:.1f} |",
        "",
        f"difference i-PI − OpenMM: {diff:+.4f} ± {np.hypot(e_omm, e_ipi):.4f} g/cm³ "
        f"({diff / np.hypot(e_omm, e_ipi):+.1f} σ)",
    ])
    write_report(Path(args.out), text)


if __name__ == "__main__":
    main()

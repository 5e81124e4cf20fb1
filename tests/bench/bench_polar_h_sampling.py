"""Issue 16.1: how much the polar-H LJ of the sampling force field (inputs/forcefields/solutes.xml) moves the
solvation shell the QM/MM training frames were drawn from.

MM MD exactly as potentials/sampling.py does it (flexible TIP3P, 3 nm PME box, Langevin 1/ps, 1 fs, 300 K),
methanol and methylammonium, with the polar hydrogens' LJ set to
  eps0  sigma 0.100 nm, eps 0        (solutes.xml before: what the shipped data were sampled with)
  polar CHARMM polar H, 0.0400 nm, 0.1925 kJ/mol (solutes.xml now, = the ML/MM production typing)
  hc    GAFF hc, 0.2650 nm, 0.0657 kJ/mol (the old production typing of template-less ML hydrogens)
and prints per variant the mean shortest H…O(water) distance over polar H, the mean number of water O within
0.25 nm of a polar H.

    .venv/bin/python tests/bench/bench_polar_h_sampling.py [--ps 10] [--seed 1] [--solutes MOH MAM]
        [--variants eps0 polar hc]
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import openmm
from openmm import unit

from potentials.lj_typing import sigma_eps
from potentials.sampling import ChainSpec, build

VARIANTS = {"eps0": (0.100, 0.0), "polar": sigma_eps("hgp1"), "hc": sigma_eps("hc")}
POLAR_H = {"MOH": ["HO"], "MAM": ["HN1", "HN2", "HN3"]}


def run(solute: str, variant: str, ps: float, seed: int = 1) -> tuple[float, float]:
    top, system, pos = build(ChainSpec(solute=solute, kind="periodic", temperature=300.0, seed=seed))
    atoms = list(top.atoms())
    hs = [a.index for a in atoms if a.residue.index == 0 and a.name in POLAR_H[solute]]
    ow = np.array([a.index for a in atoms if a.residue.name == "HOH" and a.element.symbol == "O"])
    nb = next(f for f in system.getForces() if isinstance(f, openmm.NonbondedForce))
    for i in hs:
        q, _, _ = nb.getParticleParameters(i)
        nb.setParticleParameters(i, q, *VARIANTS[variant])
    integ = openmm.LangevinMiddleIntegrator(300 * unit.kelvin, 1 / unit.picosecond, 1 * unit.femtosecond)
    ctx = openmm.Context(system, integ, openmm.Platform.getPlatformByName("CPU"), {"Threads": "1"})
    ctx.setPositions(pos)
    openmm.LocalEnergyMinimizer.minimize(ctx, 10.0, 500)
    ctx.setVelocitiesToTemperature(300 * unit.kelvin, seed)
    integ.step(2000)                                           # 2 ps equilibration
    box = np.diag(ctx.getState().getPeriodicBoxVectors(asNumpy=True).value_in_unit(unit.nanometer))
    dmin, count = [], []
    for _ in range(int(ps * 20)):                              # frames every 50 fs
        integ.step(50)
        x = ctx.getState(getPositions=True).getPositions(asNumpy=True).value_in_unit(unit.nanometer)
        d = x[ow][None] - x[hs][:, None]
        r = np.linalg.norm(d - box * np.round(d / box), axis=-1)
        dmin.append(r.min(axis=1).mean())
        count.append((r < 0.25).sum(axis=1).mean())
    return float(np.mean(dmin)), float(np.mean(count))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ps", type=float, default=10.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--solutes", nargs="+", default=list(POLAR_H), choices=list(POLAR_H))
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = ap.parse_args()
    print(f"| solute | polar-H LJ | <min r(H…Ow)> nm | <n(Ow < 0.25 nm)> | wall s |\n|---|---|---:|---:|---:|")
    for solute in args.solutes:
        for variant in args.variants:
            t = time.perf_counter()
            d, n = run(solute, variant, args.ps, args.seed)
            print(f"| {solute} | {variant} (seed {args.seed}) | {d:.3f} | {n:.2f} | {time.perf_counter() - t:.0f} |", flush=True)


if __name__ == "__main__":
    main()

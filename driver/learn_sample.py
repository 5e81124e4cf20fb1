"""Configurations for ``mlmm learn`` (:mod:`driver.learn`): seed sampling (round 0: MM, or ML/MM MD with a given
model, :func:`model_segments`) and ML/MM exploration with the committee (rounds >= 1).

**Seed sampling (OpenMM, the prepared system, an elastic ML zone).** ``mlmm prepare`` gives a molecule without an
MM template (a ligand) only Lennard-Jones parameters and zero charge, and no bonded terms: MM alone cannot keep
it together. For *sampling only*, :func:`sampling_system` adds to a copy of the prepared system

* harmonic bonds over the ML zone's covalent bonds (r0 = the prepared distance, ``[seed] bond_k``), harmonic
  angles over every bonded triple (theta0 = the prepared angle, ``angle_k``) and, at a planar centre with three
  neighbours, a harmonic improper (``improper_k``): an elastic stand-in of the molecule's own force field, so
  bond lengths and angles fluctuate around the prepared geometry and torsions rotate freely;
* partial charges on ML atoms that have none (template-less molecules): RDKit's Gasteiger charges after bond-order
  perception (the molecule's total charge), else the zone charge spread evenly, so the solvent shell forms
  around a polar molecule as it should (hydrogen bonds);
* for a cluster (no box), a flat-bottom restraint between the ML zone's centre and each MM residue beyond its
  prepared distance + 0.2 nm (``droplet_k``), so the droplet does not evaporate at the hot temperature.

None of this reaches the labels (the QM/MM labeller sees only positions and the force-field charges of the MM
atoms) or the ML/MM runs. ML residues *with* an MM template keep their own charges and bonded terms.

Each temperature is one MD chain (LangevinMiddle), cut into segments of ``frames_per_trajectory`` frames: a segment
is one *trajectory* of the dataset (the unit of the train/val/test split). Segments are cached as
``seg_NNN.npz`` (frames + final state, written atomically), so a killed run continues the chain where it stopped.

**Exploration** (:func:`explore_run`): ASE Langevin MD on the in-process ML/MM potential
(:class:`coupling.ase_calculator.MLMMCalculator`, the committee as the model): a candidate frame with its
committee spread (``ml.committee`` force_std_max, kJ/mol/nm) every ``stride`` steps; a run ends early after
``stop_after`` consecutive candidates above the ceiling (or on a failed force call).
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np
import openmm
from openmm import app, unit

from potentials.core.units import FS_PER_PS

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ the elastic system
def zone_bonds(topology: app.Topology, ml) -> list[tuple[int, int]]:
    """Covalent bonds between ML atoms (the topology's; ``load_system`` infers them for template-less residues)."""
    inside = set(int(i) for i in ml)
    return sorted({tuple(sorted((b[0].index, b[1].index))) for b in topology.bonds()
                   if b[0].index in inside and b[1].index in inside})


def _angle(a, b, c) -> float:
    u, v = a - b, c - b
    return float(np.arccos(np.clip(u @ v / (np.linalg.norm(u) * np.linalg.norm(v)), -1.0, 1.0)))


def _dihedral(p0, p1, p2, p3) -> float:
    b0, b1, b2 = p0 - p1, p2 - p1, p3 - p2
    b1 = b1 / np.linalg.norm(b1)
    v, w = b0 - (b0 @ b1) * b1, b2 - (b2 @ b1) * b1
    return float(np.arctan2(np.cross(b1, v) @ w, v @ w))


def gasteiger_charges(numbers, bonds: list[tuple[int, int]], charge: int) -> np.ndarray | None:
    """Gasteiger charges (e) of one molecule (atomic numbers, bonds by local index), after RDKit's bond-order
    perception at the given total charge; None when RDKit is missing or cannot perceive the molecule."""
    try:
        from rdkit import Chem, RDLogger
        from rdkit.Chem import AllChem, rdDetermineBonds
    except ImportError:
        return None
    RDLogger.DisableLog("rdApp.*")
    mol = Chem.RWMol()
    for z in numbers:
        mol.AddAtom(Chem.Atom(int(z)))
    for a, b in bonds:
        mol.AddBond(int(a), int(b), Chem.BondType.SINGLE)
    mol.AddConformer(Chem.Conformer(len(numbers)), assignId=True)
    mol = mol.GetMol()
    try:
        rdDetermineBonds.DetermineBondOrders(mol, charge=int(charge))
        AllChem.ComputeGasteigerCharges(mol)
        q = np.array([float(a.GetProp("_GasteigerCharge")) for a in mol.GetAtoms()])
    except Exception:          # RDKit raises ValueError / RuntimeError for molecules it cannot perceive
        return None
    if not np.all(np.isfinite(q)) or any(a.GetNumRadicalElectrons() for a in mol.GetAtoms()):
        return None
    return q + (charge - q.sum()) / len(q)          # exactly the molecule's charge


def _molecules(n: int, bonds: list[tuple[int, int]]) -> list[list[int]]:
    parent = list(range(n))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i
    for a, b in bonds:
        parent[find(a)] = find(b)
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(find(i), []).append(i)
    return list(groups.values())


def sampling_charges(numbers, bonds_local: list[tuple[int, int]], zone_charge: int) -> tuple[np.ndarray, str]:
    """Charges (e) for the template-less ML atoms (local indices): Gasteiger per molecule when RDKit perceives
    every molecule at charges summing to ``zone_charge`` (each molecule tried at 0, -1, +1, -2, +2), else the zone
    charge spread evenly; returns the charges and how they were made."""
    n = len(numbers)
    mols = _molecules(n, bonds_local)
    q = np.zeros(n)
    total = 0
    for m in mols:
        index = {a: k for k, a in enumerate(m)}
        local = [(index[a], index[b]) for a, b in bonds_local if a in index]
        want = zone_charge if len(mols) == 1 else None
        for c in ((want,) if want is not None else (0, -1, 1, -2, 2)):
            g = gasteiger_charges(np.asarray(numbers)[m], local, c)
            if g is not None:
                q[m], total = g, total + c
                break
        else:
            return np.full(n, zone_charge / n), "zone charge spread evenly (RDKit could not perceive the molecule)"
    if total != zone_charge:
        return np.full(n, zone_charge / n), "zone charge spread evenly (molecule charges did not add up)"
    return q, "Gasteiger (RDKit, after bond-order perception)"


def sampling_system(topology: app.Topology, system: openmm.System, positions_nm: np.ndarray, ml, zone_charge: int,
                    cfg) -> tuple[openmm.System, dict]:
    """A copy of the prepared full system with the elastic ML zone of the module docstring (``cfg``:
    :class:`driver.learn_config.SeedConfig`); returns it and a record of what was added."""
    from potentials.openmm_params import nonbonded_force

    out = openmm.XmlSerializer.deserialize(openmm.XmlSerializer.serialize(system))
    ml = np.asarray(ml, dtype=int)
    x = np.asarray(positions_nm, dtype=np.float64)
    bonds = zone_bonds(topology, ml)
    nb = nonbonded_force(out)
    q = np.array([nb.getParticleParameters(int(i))[0].value_in_unit(unit.elementary_charge) for i in ml])
    record = {"bonds": len(bonds), "angles": 0, "impropers": 0, "charges": "force field"}
    if np.allclose(q, 0.0):
        local = {int(a): k for k, a in enumerate(ml)}
        every = list(topology.atoms())
        numbers = [every[int(i)].element.atomic_number for i in ml]
        new_q, how = sampling_charges(numbers, [(local[a], local[b]) for a, b in bonds], zone_charge)
        for k, i in enumerate(ml):
            _, sig, eps = nb.getParticleParameters(int(i))
            nb.setParticleParameters(int(i), float(new_q[k]), sig, eps)
        record["charges"] = how
    covered = _force_field_bonds(system)
    bonds = [(a, b) for a, b in bonds if (a, b) not in covered]   # residues with a template keep their own terms
    record["bonds"] = len(bonds)
    neighbours: dict[int, list[int]] = {}
    for a, b in bonds:
        neighbours.setdefault(a, []).append(b)
        neighbours.setdefault(b, []).append(a)
    hb = openmm.HarmonicBondForce()
    for a, b in bonds:
        hb.addBond(a, b, float(np.linalg.norm(x[a] - x[b])), cfg.bond_k)
    ha = openmm.HarmonicAngleForce()
    imp = openmm.CustomTorsionForce("0.5*k*d^2; d = min(dt, 2*pi - dt); dt = abs(theta - theta0); "
                                    "pi = 3.141592653589793")
    imp.addPerTorsionParameter("theta0")
    imp.addPerTorsionParameter("k")
    for j, nbrs in neighbours.items():
        for u in range(len(nbrs)):
            for v in range(u + 1, len(nbrs)):
                ha.addAngle(nbrs[u], j, nbrs[v], _angle(x[nbrs[u]], x[j], x[nbrs[v]]), cfg.angle_k)
        if len(nbrs) == 3:
            i, k, l = nbrs
            phi = _dihedral(x[i], x[j], x[k], x[l])
            if min(abs(phi), np.pi - abs(phi)) < np.radians(15.0):       # a planar centre (sp2)
                imp.addTorsion(i, j, k, l, [phi, cfg.improper_k])
    record["angles"], record["impropers"] = ha.getNumAngles(), imp.getNumTorsions()
    for f, n in ((hb, hb.getNumBonds()), (ha, ha.getNumAngles()), (imp, imp.getNumTorsions())):
        if n:
            out.addForce(f)
    if not out.usesPeriodicBoundaryConditions():
        centre = x[ml].mean(axis=0)
        restraint = openmm.CustomCentroidBondForce(2, "k*step(d-r0)*(d-r0)^2; d=distance(g1,g2)")
        restraint.addGlobalParameter("k", cfg.droplet_k)
        restraint.addPerBondParameter("r0")
        restraint.addGroup([int(i) for i in ml])
        inside = set(ml.tolist())
        for res in topology.residues():
            atoms = [a.index for a in res.atoms() if a.index not in inside]
            if atoms:
                g = restraint.addGroup(atoms)
                r0 = float(np.linalg.norm(x[atoms].mean(axis=0) - centre)) + 0.2
                restraint.addBond([0, g], [r0])
        out.addForce(restraint)
        record["droplet_restraint"] = restraint.getNumBonds()
    return out, record


def _force_field_bonds(system: openmm.System) -> set[tuple[int, int]]:
    """The bonds the force field itself gives a harmonic term (sorted atom pairs)."""
    out = set()
    for f in system.getForces():
        if isinstance(f, openmm.HarmonicBondForce):
            for k in range(f.getNumBonds()):
                i, j = f.getBondParameters(k)[:2]
                out.add((min(i, j), max(i, j)))
    return out


# ------------------------------------------------------------------------------------------ MM seed chains
def _platform() -> tuple[openmm.Platform, dict]:
    return openmm.Platform.getPlatformByName("CPU"), {"Threads": os.environ.get("OMP_NUM_THREADS", "1")}


def _atomic_savez(path: Path, **arrays) -> None:
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def _run_segments(paths: list[Path], s0: Path, cfg, steps, equilibrate, restore, *, advance, positions, state,
                  what: str, fix: str) -> list[np.ndarray]:
    """The cached-segment loop of :func:`seed_segments` and :func:`model_segments`: equilibrate once into ``s0``
    (the state after equilibration), then sample each missing segment from the previous one's final state
    (``cfg.gap_ps`` before its first frame, ``cfg.spacing_ps`` between frames) and save it atomically. A
    non-finite frame is a CalculationFailed naming the segment and ``fix``."""
    from potentials.core.errors import CalculationFailed

    if not s0.exists():
        t0 = time.perf_counter()
        equilibrate()
        _atomic_savez(s0, **state())
        log.info("%s: equilibrated %.1f ps (%.0f s)", what, cfg.equil_ps, time.perf_counter() - t0)
    for s, path in enumerate(paths):
        if path.exists():
            continue
        restore(paths[s - 1] if s else s0)
        t0 = time.perf_counter()
        frames = []
        for k in range(cfg.frames_per_trajectory):
            n = steps(cfg.gap_ps if k == 0 and s > 0 else (0.0 if k == 0 else cfg.spacing_ps))
            if n:
                advance(n, f"segment {s}")
            frames.append(positions())
        frames = np.asarray(frames, dtype=np.float32)
        if not np.all(np.isfinite(frames)):
            raise CalculationFailed(f"{what} blew up in segment {s}; {fix}")
        _atomic_savez(path, positions=frames, **state())
        log.info("%s: segment %d/%d, %d frames (%.0f s)", what, s + 1, cfg.trajectories, len(frames),
                 time.perf_counter() - t0)
    return [np.load(p)["positions"] for p in paths]


def seed_segments(system: openmm.System, positions_nm: np.ndarray, box_nm, temperature: float, seed: int,
                  cfg, folder: Path) -> list[np.ndarray]:
    """The ``cfg.trajectories`` segments (each (frames, n_atoms, 3) nm, float32) of one MM chain at
    ``temperature``, sampled as needed and cached in ``folder`` (``state0.npz``: after minimisation and
    equilibration; ``seg_NNN.npz``: frames + final state)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"seg_{s:03d}.npz" for s in range(cfg.trajectories)]
    if all(p.exists() for p in paths):
        return [np.load(p)["positions"] for p in paths]
    integ = openmm.LangevinMiddleIntegrator(temperature * unit.kelvin, cfg.friction_per_ps / unit.picosecond,
                                            cfg.timestep_fs * unit.femtosecond)
    integ.setRandomNumberSeed(int(seed))
    ctx = openmm.Context(system, integ, *_platform())
    if box_nm is not None:
        ctx.setPeriodicBoxVectors(*[openmm.Vec3(*row) for row in np.asarray(box_nm)])
    steps = lambda ps: int(round(ps * FS_PER_PS / cfg.timestep_fs))          # noqa: E731

    def state() -> dict:
        st = ctx.getState(getPositions=True, getVelocities=True)
        return dict(final_positions=st.getPositions(asNumpy=True).value_in_unit(unit.nanometer),
                    final_velocities=st.getVelocities(asNumpy=True).value_in_unit(unit.nanometer / unit.picosecond))

    def equilibrate() -> None:
        ctx.setPositions(np.asarray(positions_nm))
        openmm.LocalEnergyMinimizer.minimize(ctx, 10.0, 1000)
        ctx.setVelocitiesToTemperature(temperature * unit.kelvin, int(seed))
        integ.step(steps(cfg.equil_ps))

    def restore(path: Path) -> None:
        with np.load(path) as z:
            ctx.setPositions(z["final_positions"])
            ctx.setVelocities(z["final_velocities"])

    return _run_segments(paths, folder / "state0.npz", cfg, steps, equilibrate, restore,
                         advance=lambda n, where: integ.step(n),
                         positions=lambda: ctx.getState(getPositions=True).getPositions(asNumpy=True).value_in_unit(
                             unit.nanometer),
                         state=state, what=f"seed MD {temperature:g} K",
                         fix="lower [seed] timestep_fs or raise bond_k")


def model_segments(system_toml: Path, model: Path, positions_nm: np.ndarray, temperature: float, seed: int, cfg,
                   md, folder: Path, device: str = "cpu") -> list[np.ndarray]:
    """:func:`seed_segments` with a given model instead of MM: ASE Langevin ML/MM MD (``md``: the
    :class:`driver.learn_config.ExploreConfig`, its timestep and friction) on the in-process potential
    (:class:`coupling.ase_calculator.MLMMCalculator`); no elastic zone, the model holds the molecule together.
    Cached in ``folder`` like :func:`seed_segments` (``state0.npz``, ``seg_NNN.npz`` with positions + momenta in
    ASE units), so a killed run continues the chain. A failed force call or non-finite frame is a
    CalculationFailed naming the segment: the model does not hold this system at ``temperature``."""
    from ase import units as U
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import thermalize_momenta

    from coupling.ase_calculator import MLMMCalculator
    from potentials.core.errors import CalculationFailed, MLMMError
    from potentials.core.units import ANGSTROM_PER_NM

    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"seg_{s:03d}.npz" for s in range(cfg.trajectories)]
    if all(p.exists() for p in paths):
        return [np.load(p)["positions"] for p in paths]
    calc = MLMMCalculator(system_toml, model, device=device)
    atoms = calc.initial_atoms()
    atoms.calc = calc
    rng = np.random.default_rng(seed)
    dyn = Langevin(atoms, timestep=md.timestep_fs * U.fs, temperature_K=temperature,
                   friction=md.friction_per_ps / (1000.0 * U.fs), fixcm=False, rng=rng)
    steps = lambda ps: int(round(ps * FS_PER_PS / md.timestep_fs))          # noqa: E731

    def advance(n: int, where: str) -> None:
        try:
            dyn.run(n)
            atoms.get_forces()
        except (MLMMError, FloatingPointError, ValueError) as exc:
            raise CalculationFailed(f"ML/MM seed MD with {model} at {temperature:g} K failed in {where}: "
                                    f"{str(exc).splitlines()[0][:200]}; seed by MM ([seed] model = \"\") or lower the "
                                    "temperature") from None
        if not np.all(np.isfinite(atoms.get_positions())):
            raise CalculationFailed(f"ML/MM seed MD with {model} at {temperature:g} K blew up in {where}")

    def state() -> dict:
        return dict(final_positions=atoms.get_positions(), final_momenta=atoms.get_momenta())

    def restore(path: Path) -> None:
        with np.load(path) as z:
            atoms.set_positions(z["final_positions"])
            atoms.set_momenta(z["final_momenta"])

    def equilibrate() -> None:
        atoms.set_positions(np.asarray(positions_nm, dtype=np.float64) * ANGSTROM_PER_NM)
        thermalize_momenta(atoms, temperature, rng=rng)
        advance(steps(cfg.equil_ps), "equilibration")

    return _run_segments(paths, folder / "state0.npz", cfg, steps, equilibrate, restore,
                         advance=advance,
                         positions=lambda: atoms.get_positions() / ANGSTROM_PER_NM,
                         state=state, what=f"seed ML/MM MD {temperature:g} K",
                         fix="seed by MM ([seed] model = \"\") or lower the temperature")


# ------------------------------------------------------------------------------------------ ML/MM exploration
def explore_run(system_toml: Path, model: Path, start_nm: np.ndarray, temperature: float, seed: int, cfg,
                device: str = "cpu") -> dict:
    """One ML/MM Langevin run with the committee ``model`` from ``start_nm`` (all atoms, nm) at ``temperature``
    (``cfg``: :class:`driver.learn_config.ExploreConfig`). Returns ``positions`` (candidates, n_atoms, 3) nm
    float32, ``force_std_max`` and ``energy_std`` per candidate (kJ/mol/nm, kJ/mol), ``step`` of each candidate,
    ``steps_run`` and ``stopped`` (why the run ended early, "" if it did not)."""
    from ase import units as U
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import thermalize_momenta

    from coupling.ase_calculator import MLMMCalculator
    from potentials.core.errors import MLMMError
    from potentials.core.units import ANGSTROM_PER_NM

    calc = MLMMCalculator(system_toml, model, device=device)
    atoms = calc.initial_atoms()
    atoms.set_positions(np.asarray(start_nm, dtype=np.float64) * ANGSTROM_PER_NM)
    atoms.calc = calc
    rng = np.random.default_rng(seed)
    thermalize_momenta(atoms, temperature, rng=rng)
    dyn = Langevin(atoms, timestep=cfg.timestep_fs * U.fs, temperature_K=temperature,
                   friction=cfg.friction_per_ps / (1000.0 * U.fs), fixcm=False, rng=rng)
    pos, f_std, e_std, steps = [], [], [], []
    stopped, over, done = "", 0, 0
    t0 = time.perf_counter()
    while done < cfg.steps:
        try:
            dyn.run(cfg.stride)
            atoms.get_forces()
        except (MLMMError, FloatingPointError, ValueError) as exc:
            stopped = f"force call failed at step {done + cfg.stride}: {str(exc).splitlines()[0][:200]}"
            break
        done += cfg.stride
        c = calc.results.get("ml_extras", {}).get("ml.committee")
        if c is None:
            from potentials.core.errors import SetupError
            raise SetupError(f"{model} is not a committee model (no ml.committee extra)")
        pos.append((atoms.get_positions() / ANGSTROM_PER_NM).astype(np.float32))
        f_std.append(float(c["force_std_max"]))
        e_std.append(float(c["energy_std"]))
        steps.append(done)
        over = over + 1 if f_std[-1] > cfg.ceiling_kjmol_nm else 0
        if over >= cfg.stop_after:
            stopped = (f"{over} consecutive candidates above the ceiling {cfg.ceiling_kjmol_nm:g} kJ/mol/nm at step "
                       f"{done}")
            break
    n_atoms = len(atoms)
    log.info("explore %g K: %d steps in %.0f s, %d candidates, force_std_max median %.1f max %.1f kJ/mol/nm%s",
             temperature, done, time.perf_counter() - t0, len(pos), float(np.median(f_std)) if f_std else 0.0,
             max(f_std, default=0.0), f"; stopped: {stopped}" if stopped else "")
    return {"positions": np.asarray(pos, dtype=np.float32).reshape(-1, n_atoms, 3),
            "force_std_max": np.asarray(f_std), "energy_std": np.asarray(e_std), "step": np.asarray(steps, int),
            "steps_run": done, "stopped": stopped}


def select(force_std: np.ndarray, run: np.ndarray, floor: float, ceiling: float, n: int,
           min_separation: int = 1, per_run: int | None = None, fill_floor: float | None = None) -> np.ndarray:
    """Indices of up to ``n`` candidates with ``floor <= force_std <= ceiling``, largest spread first, no two of
    the same ``run`` closer than ``min_separation`` candidates (index distance within the run's order). With
    ``per_run``, a first pass takes at most that many from each run (so every run, and with it every split,
    gets its share), a second pass fills up from the rest. With ``fill_floor``, candidates down to that spread
    then fill what the window left empty (the same rules, still largest first)."""
    force_std, run = np.asarray(force_std, dtype=float), np.asarray(run)
    order = np.argsort(-force_std, kind="stable")
    chosen: list[int] = []
    position = np.zeros(len(run), dtype=int)
    for r in np.unique(run):
        idx = np.flatnonzero(run == r)
        position[idx] = np.arange(len(idx))
    caps = (per_run, None) if per_run else (None,)
    passes = [(cap, floor) for cap in caps] + ([(cap, fill_floor) for cap in caps] if fill_floor is not None else [])
    for cap, low in passes:
        for i in order:
            if len(chosen) >= n:
                break
            if i in chosen or not low <= force_std[i] <= ceiling:
                continue
            if cap is not None and sum(run[j] == run[i] for j in chosen) >= cap:
                continue
            if any(run[j] == run[i] and abs(position[j] - position[i]) < min_separation for j in chosen):
                continue
            chosen.append(int(i))
    return np.asarray(chosen, dtype=int)

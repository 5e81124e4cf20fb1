"""MD sampling of solute configurations for the QM/MM reference data (OpenMM, flexible TIP3P).

A *chain* is one continuous Langevin MD run of one solute in one setting (periodic box, droplet or gas
phase) at one temperature. It is cut into *blocks*: each block starts after a decorrelation gap (the
equilibration for block 0) and holds ``n_frames`` frames spaced ``spacing_ps`` apart. A block is the unit
the dataset calls a trajectory, so the train/validation/test split by trajectory never puts two frames of
the same stretch of MD on both sides (consecutive blocks are ``gap_ps`` apart, so the last frame of one and
the first of the next are still weakly correlated through the slow solvent motions).

Chains are cached on disk (``cache/<chain id>/``: the serialized System, metadata, the equilibrated state and
one ``block_NNNN.npz`` per block with its frames and final state), so a restarted labeller continues the MD
where it stopped and reuses every block already sampled.

Choices (documented here because the dataset depends on them):

* Periodic boxes are cubes 3.0 nm wide (PME, 0.9 nm cutoff, NVT at the density of OpenMM's water box), the
  smallest box in which the embedding cutoff (1.2 nm) plus the solute radius (< 0.3 nm) stays below half the
  box width, which ``coupling.embedding.select_environment`` requires. (A truncated octahedron does not help:
  that check uses the shortest plane spacing of the reduced cell.) Charged solutes get one counter-ion
  (Na+ for acetate, Cl- for methylammonium), which then appears among the MM charges when it comes near.
* Droplets: waters whose oxygen lies within ``droplet_radius`` of the solute centroid, no cutoff, no
  counter-ion, and a flat-bottom restraint (k = 500 kJ/mol/nm^2 beyond the radius) between the solute
  centre of mass and each water oxygen that keeps the droplet from evaporating at 400 K.
* Clusters (kind ``cluster``): a droplet of exactly ``cluster_waters`` waters, the ones whose oxygen is nearest
  the solute centroid in a solvated cube, with the same flat-bottom restraint at the distance of the farthest
  kept oxygen + 0.02 nm (0.87–0.88 nm for 80 waters around methanol or acetate). Its chain id names the
  size (``MOH-cluster80-300K-s...``).
* Pairs (solute ``"MAM+ACT"``, a salt bridge; ``"MGU+ACT"``, the Arg-Asp one; any two or more solutes joined by
  ``+``): the molecules are built one after the other, each next one mirrored and 0.55 nm further along +x (polar
  ends facing; further for long ones, so the two ends start ``PAIR_GAP_NM`` apart), minimised together, and
  kept in contact by a flat-bottom restraint (k = 500 kJ/mol/nm^2 beyond ``PAIR_RADIUS_NM``) on the distance of
  each one's centroid from the first's, in every kind; the pair is one QM zone, its charge the sum.
* QM zones with waters (``qm_zone``): the solute plus its ``n`` nearest waters, by the minimum-image
  distance of each water oxygen to the nearest solute atom, chosen per frame. Waters are recognised by
  their TIP3P charges (-0.834, 0.417, 0.417; O is the negative atom), so MD caches written before this
  existed work unchanged.
* Solute parameters come from ``inputs/forcefields/solutes.xml`` (OPLS-like, for sampling only). Its polar
  hydrogens (O–H, N–H) carry the CHARMM polar-H LJ (σ = 0.0400 nm, ε = 0.1925 kJ/mol), the same as the ML/MM
  production typing of template-less ML atoms (``potentials.lj_typing``), so that the frames are drawn from the
  shells production samples. The shipped data (inputs/data) were sampled with ε = 0 on them; the shells differ
  little (tests/bench/bench_polar_h_sampling.py, PERFORMANCE.md). A chain cached before the change keeps the
  System it was built with (``cache/<chain id>/system.xml``): delete the cache to sample with the new one.

Units: nm, ps, kJ/mol, K (internal); the hand-built starting geometries are in Å.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import openmm
from openmm import app, unit

from potentials.core.errors import SetupError
from potentials.core.units import FS_PER_PS, NM_PER_ANGSTROM

log = logging.getLogger(__name__)

SOLUTES_XML = Path(__file__).resolve().parent.parent / "inputs" / "forcefields" / "solutes.xml"
KINDS = ("periodic", "droplet", "gas", "cluster")
BOX_WIDTH_NM = 3.0
MM_CUTOFF_NM = 0.9
DROPLET_K = 500.0            # kJ/mol/nm^2, flat-bottom restraint on water oxygens
WATER_NM3 = 0.0299           # volume per water molecule in liquid water at 300 K (nm^3)
TIP3P_CHARGES = (-0.834, 0.417, 0.417)
PAIR_RADIUS_NM = 0.6         # flat-bottom radius of the pair restraint (centroid distance; contact ~0.4 nm)
PAIR_STEP_NM = 0.55          # start: the next molecule of a pair, mirrored, this far along +x (polar ends facing)
PAIR_GAP_NM = 0.16           # ... or further, so that the two polar ends start this far apart along x (MGU+ACT)


def _methyl(center: np.ndarray, axis: np.ndarray, bond: float, phase: float = 0.0) -> list[np.ndarray]:
    """Three tetrahedral substituents of ``center`` pointing away from ``axis`` (unit vector), Å."""
    u = np.cross(axis, [0.0, 0.0, 1.0] if abs(axis[2]) < 0.9 else [1.0, 0.0, 0.0])
    u /= np.linalg.norm(u)
    v = np.cross(axis, u)
    return [center + bond * (-axis / 3.0 + np.sqrt(8.0) / 3.0 * (np.cos(t) * u + np.sin(t) * v))
            for t in phase + np.arange(3) * 2.0 * np.pi / 3.0]


def _solute_atoms(name: str) -> list[tuple[str, str, np.ndarray]]:
    """Rough starting geometry (atom name, element, xyz Å); minimised with solutes.xml before MD."""
    x = np.array([1.0, 0.0, 0.0])
    o = np.zeros(3)
    if name == "HOH":
        return [("O", "O", o), ("H1", "H", 0.9572 * x), ("H2", "H", np.array([-0.240, 0.927, 0.0]))]
    if name == "MOH":
        h = _methyl(o, -x, 1.09)
        return [("C", "C", o), ("H1", "H", h[0]), ("H2", "H", h[1]), ("H3", "H", h[2]),
                ("O", "O", 1.41 * x), ("HO", "H", np.array([1.71, -0.896, 0.0]))]
    if name == "ACT":
        h = _methyl(o, -x, 1.09)
        return [("C1", "C", o), ("H1", "H", h[0]), ("H2", "H", h[1]), ("H3", "H", h[2]),
                ("C2", "C", 1.52 * x), ("O1", "O", np.array([2.087, 1.114, 0.0])),
                ("O2", "O", np.array([2.087, -1.114, 0.0]))]
    if name == "MAM":
        h = _methyl(o, -x, 1.09)
        hn = _methyl(1.471 * x, x, 1.01, phase=np.pi / 3.0)
        return [("C", "C", o), ("H1", "H", h[0]), ("H2", "H", h[1]), ("H3", "H", h[2]),
                ("N", "N", 1.471 * x), ("HN1", "H", hn[0]), ("HN2", "H", hn[1]), ("HN3", "H", hn[2])]
    if name == "MGU":           # methylguanidinium, planar (xy): C-NE along +x, the guanidinium at +x
        return [("C", "C", o)] + [(f"H{k + 1}", "H", h) for k, h in enumerate(_methyl(o, -x, 1.09))] + [
            (n, e, np.array([px, py, 0.0])) for n, e, px, py in (
                ("NE", "N", 1.460, 0.0), ("HE", "H", 1.942, -0.888), ("CZ", "C", 2.185, 1.116),
                ("NH1", "N", 3.514, 1.047), ("HH11", "H", 3.973, 0.147), ("HH12", "H", 4.064, 1.894),
                ("NH2", "N", 1.581, 2.301), ("HH21", "H", 2.131, 3.148), ("HH22", "H", 0.572, 2.354))]
    raise SetupError(f"unknown solute {name!r}; choose one of {sorted(SOLUTE_CHARGE)}")


SOLUTE_CHARGE = {"HOH": 0, "MOH": 0, "ACT": -1, "MAM": 1, "MGU": 1}


def solute_parts(name: str) -> list[str]:
    """The molecules of a solute name: ``"MAM+ACT"`` (an ion pair in one QM zone) -> ``["MAM", "ACT"]``."""
    parts = name.split("+")
    bad = [p for p in parts if p not in SOLUTE_CHARGE]
    if bad:
        raise SetupError(f"unknown solute {bad[0]!r} in {name!r}; choose one of {sorted(SOLUTE_CHARGE)}, or a pair "
                         "of them joined by '+' (e.g. 'MAM+ACT')")
    return parts


def solute_charge(name: str) -> int:
    """Total charge (e) of a solute or of a pair (``"MAM+ACT"``: 0)."""
    return sum(SOLUTE_CHARGE[p] for p in solute_parts(name))


@dataclass(frozen=True)
class ChainSpec:
    """One MD chain: solute residue name, kind ('periodic' | 'droplet' | 'gas' | 'cluster'), temperature (K),
    seed. ``cluster_waters`` is used by the 'cluster' kind only, and only then part of the repr (which the MD
    cache checks) and of the chain id, so the chains of the other kinds keep their ids and caches."""

    solute: str
    kind: str
    temperature: float
    seed: int
    timestep_fs: float = 1.0
    friction_per_ps: float = 1.0
    equil_ps: float = 3.0
    gap_ps: float = 1.0
    spacing_ps: float = 0.5
    droplet_radius_nm: float = 1.6
    cluster_waters: int = 80

    def __post_init__(self):
        solute_parts(self.solute)
        if self.kind not in KINDS:
            raise SetupError(f"unknown sampling kind {self.kind!r}; choose one of {KINDS}")
        if self.kind == "cluster" and self.cluster_waters < 1:
            raise SetupError(f"cluster_waters must be at least 1, not {self.cluster_waters}")

    def __repr__(self) -> str:
        names = [f.name for f in dataclasses.fields(self) if f.name != "cluster_waters" or self.kind == "cluster"]
        return f"{type(self).__qualname__}(" + ", ".join(f"{n}={getattr(self, n)!r}" for n in names) + ")"

    @property
    def kind_label(self) -> str:
        """The kind as chain ids and seeds name it: 'cluster80' for a cluster of 80 waters, else the kind."""
        return f"cluster{self.cluster_waters}" if self.kind == "cluster" else self.kind

    @property
    def chain_id(self) -> str:
        return f"{self.solute}-{self.kind_label}-{int(round(self.temperature))}K-s{self.seed}"


@dataclass
class ChainSystem:
    """Static data of a chain's system (everything the embedding and the labeller need besides positions).

    numbers: (n_ml,) atomic numbers of the solute (= ML zone); ml_indices: (n_ml,) its atom indices;
    charges: (n_atoms,) MM partial charges (e); residue: (n_atoms,) residue ids; box: (3,3) nm rows or None;
    solute_charge: total charge of the solute (e).
    """

    numbers: np.ndarray
    ml_indices: np.ndarray
    charges: np.ndarray
    residue: np.ndarray
    box: np.ndarray | None
    solute_charge: int


def _platform() -> tuple[openmm.Platform, dict]:
    threads = os.environ.get("OMP_NUM_THREADS", "1")
    return openmm.Platform.getPlatformByName("CPU"), {"Threads": threads}


def build(spec: ChainSpec) -> tuple[app.Topology, openmm.System, np.ndarray]:
    """Topology, OpenMM System and starting positions (nm) for one chain (the solute's molecules are residues
    0, 1, ...: one, or a pair)."""
    ff = app.ForceField("amber14/tip3p.xml", str(SOLUTES_XML))
    top = app.Topology()
    chain = top.addChain()
    xyz, groups, offset, reach = [], [], 0.0, 0.0
    for k, part in enumerate(solute_parts(spec.solute)):
        res = top.addResidue(part, chain)
        atoms = [top.addAtom(name, app.Element.getBySymbol(element), res) for name, element, _ in _solute_atoms(part)]
        for a, b in _bonds(part):
            top.addBond(atoms[a], atoms[b])
        local = np.array([pos for _, _, pos in _solute_atoms(part)]) * NM_PER_ANGSTROM
        if k:                   # mirrored, so that its polar end (+x in _solute_atoms) faces the one before
            offset += max(PAIR_STEP_NM, reach + local[:, 0].max() + PAIR_GAP_NM)
            local = local * [-1.0, 1.0, 1.0] + [offset, 0.0, 0.0]
        reach = local[:, 0].max() - offset         # how far this one extends past its own origin along +x
        xyz.extend(local)
        groups.append([a.index for a in atoms])
    positions = np.array(xyz)
    n_solute = len(positions)
    # minimise the solute alone so the solvent is placed around a sensible geometry (the gas phase's own system)
    vacuum = _with_pair_restraint(ff.createSystem(top, nonbondedMethod=app.NoCutoff, rigidWater=False), groups)
    positions = _minimise(top, vacuum, positions)
    positions -= positions.mean(axis=0)
    if spec.kind == "gas":
        return top, vacuum, positions
    modeller = app.Modeller(top, positions * unit.nanometer)
    if spec.kind == "periodic":
        modeller.addSolvent(ff, model="tip3p", boxSize=openmm.Vec3(1, 1, 1) * BOX_WIDTH_NM * unit.nanometer,
                            neutralize=True)
        system = ff.createSystem(modeller.topology, nonbondedMethod=app.PME, rigidWater=False,
                                 nonbondedCutoff=MM_CUTOFF_NM * unit.nanometer)
        return modeller.topology, _with_pair_restraint(system, groups, True), _positions_nm(modeller.positions)
    if spec.kind == "cluster":
        # cluster: solvate a cube big enough for the requested number of waters, keep the nearest ones
        n = spec.cluster_waters
        r_est = (3.0 * n * WATER_NM3 / (4.0 * np.pi)) ** (1.0 / 3.0) + 0.3
        width = 2.0 * r_est + 0.6
        modeller.addSolvent(ff, model="tip3p", boxSize=openmm.Vec3(1, 1, 1) * width * unit.nanometer,
                            neutralize=False)
        pos = _positions_nm(modeller.positions)
        centre = pos[:n_solute].mean(axis=0)
        waters = [res for res in modeller.topology.residues() if res.name == "HOH" and res.index >= len(groups)]
        oxygens = [[a.index for a in res.atoms() if a.element.symbol == "O"][0] for res in waters]
        dist = np.linalg.norm(pos[oxygens] - centre, axis=1)
        if len(waters) < n:
            raise SetupError(f"cluster of {n} waters: only {len(waters)} waters in the solvated cube")
        order = np.argsort(dist, kind="stable")
        r = float(dist[order[n - 1]]) + 0.02
        modeller.delete([waters[i] for i in order[n:]])
    else:
        # droplet: solvate a cube, keep the waters whose oxygen is inside the radius, drop the box
        r = spec.droplet_radius_nm
        modeller.addSolvent(ff, model="tip3p", boxSize=openmm.Vec3(1, 1, 1) * (2.0 * r + 0.6) * unit.nanometer,
                            neutralize=False)
        pos = _positions_nm(modeller.positions)
        centre = pos[:n_solute].mean(axis=0)
        far = [res for res in modeller.topology.residues() if res.name == "HOH"
               and np.linalg.norm(pos[[a.index for a in res.atoms() if a.element.symbol == "O"][0]] - centre) > r]
        modeller.delete(far)
    modeller.topology.setPeriodicBoxVectors(None)
    system = ff.createSystem(modeller.topology, nonbondedMethod=app.NoCutoff, rigidWater=False)
    restraint = openmm.CustomCentroidBondForce(2, "k*step(d-r0)*(d-r0)^2; d=distance(g1,g2)")
    restraint.addGlobalParameter("k", DROPLET_K)
    restraint.addGlobalParameter("r0", r)
    restraint.addGroup(list(range(n_solute)))
    for res in modeller.topology.residues():
        if res.name == "HOH":
            oxygen = [a.index for a in res.atoms() if a.element.symbol == "O"][0]
            g = restraint.addGroup([oxygen])
            restraint.addBond([0, g], [])
    system.addForce(restraint)
    return modeller.topology, _with_pair_restraint(system, groups), _positions_nm(modeller.positions)


def _with_pair_restraint(system: openmm.System, groups: list[list[int]], periodic: bool = False) -> openmm.System:
    """Add the flat-bottom restraint that keeps the molecules of a pair together (module docstring); a single
    solute's system is returned unchanged."""
    if len(groups) > 1:
        pair = openmm.CustomCentroidBondForce(2, "k_pair*step(d-r_pair)*(d-r_pair)^2; d=distance(g1,g2)")
        pair.addGlobalParameter("k_pair", DROPLET_K)
        pair.addGlobalParameter("r_pair", PAIR_RADIUS_NM)
        pair.setUsesPeriodicBoundaryConditions(periodic)
        for g in groups:
            pair.addGroup(g)
        for k in range(1, len(groups)):
            pair.addBond([0, k], [])
        system.addForce(pair)
    return system


def _bonds(name: str) -> list[tuple[int, int]]:
    """Bonds (atom-index pairs, into :func:`_solute_atoms`) of a solute: its residue template's, in the template's
    order (``inputs/forcefields/solutes.xml``; water: TIP3P's two O-H bonds)."""
    if name == "HOH":
        return [(0, 1), (0, 2)]
    import xml.etree.ElementTree as ET

    index = {atom: k for k, (atom, _, _) in enumerate(_solute_atoms(name))}
    residue = ET.parse(SOLUTES_XML).getroot().find(f"Residues/Residue[@name='{name}']")
    return [(index[b.get("atomName1")], index[b.get("atomName2")]) for b in residue.iter("Bond")]


def _positions_nm(positions) -> np.ndarray:
    return np.array(positions.value_in_unit(unit.nanometer))


def _minimise(top: app.Topology, system: openmm.System, positions: np.ndarray) -> np.ndarray:
    ctx = openmm.Context(system, openmm.VerletIntegrator(0.001), *_platform())
    ctx.setPositions(positions)
    openmm.LocalEnergyMinimizer.minimize(ctx, 1.0, 500)
    return ctx.getState(getPositions=True).getPositions(asNumpy=True).value_in_unit(unit.nanometer)


def system_data(top: app.Topology, system: openmm.System, solute_charge: int, n_molecules: int = 1) -> ChainSystem:
    """The :class:`ChainSystem` of a built system whose solute is its first ``n_molecules`` residues."""
    nb = next(f for f in system.getForces() if isinstance(f, openmm.NonbondedForce))
    charges = np.array([nb.getParticleParameters(i)[0].value_in_unit(unit.elementary_charge)
                        for i in range(system.getNumParticles())])
    residue = np.array([a.residue.index for a in top.atoms()])
    ml = np.flatnonzero(residue < n_molecules)
    numbers = np.array([a.element.atomic_number for a in top.atoms()])[ml]
    box = None
    if top.getPeriodicBoxVectors() is not None:
        box = np.array(top.getPeriodicBoxVectors().value_in_unit(unit.nanometer))
    return ChainSystem(numbers=numbers, ml_indices=ml, charges=charges, residue=residue, box=box,
                       solute_charge=solute_charge)


def water_residues(data: ChainSystem) -> tuple[np.ndarray, np.ndarray]:
    """The waters of a chain's system: (oxygen indices (W,), atom indices (W, 3) with the oxygen first), in
    residue order. A water is a residue other than the solute's with three atoms carrying the TIP3P charges."""
    solute_res = set(np.unique(data.residue[data.ml_indices]).tolist())
    order = np.argsort(data.residue, kind="stable")
    res_sorted = data.residue[order]
    starts = np.flatnonzero(np.r_[True, res_sorted[1:] != res_sorted[:-1]])
    counts = np.diff(np.r_[starts, len(order)])
    oxygens, atoms = [], []
    for s, c in zip(starts, counts):
        if c != 3 or int(res_sorted[s]) in solute_res:
            continue
        idx = order[s:s + 3]
        q = data.charges[idx]
        k = int(np.argmin(q))
        if not np.allclose(np.sort(q), sorted(TIP3P_CHARGES), atol=1e-4):
            continue
        idx = np.r_[idx[k], np.delete(idx, k)]
        oxygens.append(idx[0])
        atoms.append(idx)
    return np.array(oxygens, dtype=np.int64), np.array(atoms, dtype=np.int64).reshape(-1, 3)


def nearest_waters(data: ChainSystem, positions_nm: np.ndarray, n: int) -> np.ndarray:
    """Atom indices (n, 3) (oxygen first) of the ``n`` waters nearest the solute in this frame, nearest first:
    distance = the minimum-image distance (``data.box``; plain without one) of the water oxygen to the nearest
    solute atom. Ties go to the lower residue."""
    oxygens, atoms = water_residues(data)
    if n > len(oxygens):
        raise SetupError(f"the QM zone asks for {n} waters, the system has {len(oxygens)}")
    pos = np.asarray(positions_nm, dtype=np.float64)
    d = pos[oxygens][:, None, :] - pos[data.ml_indices][None, :, :]         # (W, n_solute, 3)
    if data.box is not None:
        box = np.asarray(data.box, dtype=np.float64)
        frac = d @ np.linalg.inv(box)
        d = (frac - np.round(frac)) @ box
    dist = np.sqrt(np.einsum("wax,wax->wa", d, d)).min(axis=1)
    return atoms[np.argsort(dist, kind="stable")[:n]]


def qm_zone(data: ChainSystem, positions_nm: np.ndarray, n_waters: int) -> tuple[np.ndarray, np.ndarray]:
    """(atom indices, atomic numbers) of the QM zone of a frame: the solute atoms, then the atoms (O, H, H) of
    its ``n_waters`` nearest waters (:func:`nearest_waters`) in increasing atom-index order, so the same set
    of waters always gives the same zone."""
    if n_waters <= 0:
        return np.asarray(data.ml_indices), np.asarray(data.numbers)
    waters = nearest_waters(data, positions_nm, n_waters)
    waters = waters[np.argsort(waters[:, 0])]
    idx = np.concatenate([np.asarray(data.ml_indices), waters.ravel()])
    numbers = np.concatenate([np.asarray(data.numbers), np.tile([8, 1, 1], len(waters))])
    return idx, numbers


class Chain:
    """A cached MD chain; :meth:`block` returns (and samples on demand) the frames of one block."""

    def __init__(self, spec: ChainSpec, cache_dir: str | os.PathLike):
        self.spec = spec
        self.dir = Path(cache_dir) / spec.chain_id
        self._sim: app.Simulation | None = None
        self._next = -1                     # block the live simulation would sample next
        self._data: ChainSystem | None = None

    # -- static data ------------------------------------------------------------------------------
    @property
    def data(self) -> ChainSystem:
        if self._data is None:
            meta = self.dir / "meta.npz"
            if not meta.exists():
                self._initialise()
            with np.load(meta) as z:
                if str(z["spec"]) != repr(self.spec):
                    raise SetupError(f"MD cache {self.dir} was sampled with {z['spec']}, the config asks for "
                                     f"{self.spec!r}; use another cache folder")
                box = z["box"] if z["box"].size else None
                self._data = ChainSystem(numbers=z["numbers"], ml_indices=z["ml_indices"], charges=z["charges"],
                                         residue=z["residue"], box=box, solute_charge=int(z["solute_charge"]))
        return self._data

    def _initialise(self) -> None:
        """Build, minimise and equilibrate; write system.xml, topology.pdb, state0.npz and (last) meta.npz."""
        self.dir.mkdir(parents=True, exist_ok=True)
        top, system, pos = build(self.spec)
        d = system_data(top, system, solute_charge(self.spec.solute), len(solute_parts(self.spec.solute)))
        sim = self._simulation(top, system)
        sim.context.setPositions(pos)
        sim.minimizeEnergy(maxIterations=1000)
        sim.context.setVelocitiesToTemperature(self.spec.temperature * unit.kelvin, self.spec.seed)
        self._run(sim, self.spec.equil_ps)
        state = sim.context.getState(getPositions=True, getVelocities=True)
        with open(self.dir / "topology.pdb", "w") as fh:
            app.PDBFile.writeFile(top, state.getPositions(), fh)
        _atomic_write(self.dir / "system.xml", openmm.XmlSerializer.serialize(system))
        _atomic_savez(self.dir / "state0.npz", **_state_arrays(sim))
        _atomic_savez(self.dir / "meta.npz", numbers=d.numbers, ml_indices=d.ml_indices, charges=d.charges,
                      residue=d.residue, box=d.box if d.box is not None else np.zeros(0),
                      solute_charge=d.solute_charge, spec=repr(self.spec))
        self._sim, self._next = sim, 0
        log.info("chain %s: %d atoms, equilibrated %.1f ps", self.spec.chain_id, system.getNumParticles(),
                 self.spec.equil_ps)

    def _simulation(self, top: app.Topology | None, system: openmm.System) -> app.Simulation:
        s = self.spec
        integ = openmm.LangevinMiddleIntegrator(s.temperature * unit.kelvin, s.friction_per_ps / unit.picosecond,
                                                s.timestep_fs * unit.femtosecond)
        integ.setRandomNumberSeed(s.seed)
        platform, props = _platform()
        return app.Simulation(top if top is not None else app.Topology(), system, integ, platform, props)

    def _run(self, sim: app.Simulation, ps: float) -> None:
        sim.step(int(round(ps * FS_PER_PS / self.spec.timestep_fs)))

    # -- blocks -----------------------------------------------------------------------------------
    def _block_path(self, b: int) -> Path:
        return self.dir / f"block_{b:04d}.npz"

    def block(self, b: int, n_frames: int) -> np.ndarray:
        """Positions (n_frames, n_atoms, 3) nm (float32) of block ``b``, sampling blocks up to ``b`` if needed."""
        path = self._block_path(b)
        if not path.exists():
            _ = self.data
            while not path.exists():
                self._sample_next(n_frames)
        with np.load(path) as z:
            pos = z["positions"]
        if len(pos) < n_frames:
            raise SetupError(f"cached block {path} has {len(pos)} frames, the config asks for {n_frames}; "
                             "use a new cache folder or the same frames_per_trajectory")
        return pos[:n_frames]

    def _sample_next(self, n_frames: int) -> None:
        """Sample the first missing block. Each block file also holds the final positions and velocities, so
        one atomic rename commits both the frames and the state the next block continues from."""
        b = 0
        while self._block_path(b).exists():
            b += 1
        if self._sim is None or self._next != b:
            if self._sim is None:
                system = openmm.XmlSerializer.deserialize((self.dir / "system.xml").read_text())
                self._sim = self._simulation(None, system)
            with np.load(self._block_path(b - 1) if b else self.dir / "state0.npz") as z:
                self._sim.context.setPositions(z["final_positions"])
                self._sim.context.setVelocities(z["final_velocities"])
        sim = self._sim
        frames = []
        for k in range(n_frames):
            self._run(sim, self.spec.gap_ps if k == 0 and b > 0 else (0.0 if k == 0 else self.spec.spacing_ps))
            frames.append(sim.context.getState(getPositions=True).getPositions(asNumpy=True)
                          .value_in_unit(unit.nanometer))
        frames = np.asarray(frames, dtype=np.float32)
        if not np.all(np.isfinite(frames)):
            raise SetupError(f"MD of chain {self.spec.chain_id} blew up in block {b}; lower timestep_fs")
        _atomic_savez(self._block_path(b), positions=frames, **_state_arrays(sim))
        self._next = b + 1
        log.debug("chain %s: sampled block %d", self.spec.chain_id, b)


def _state_arrays(sim: app.Simulation) -> dict[str, np.ndarray]:
    st = sim.context.getState(getPositions=True, getVelocities=True)
    return dict(final_positions=st.getPositions(asNumpy=True).value_in_unit(unit.nanometer),
                final_velocities=st.getVelocities(asNumpy=True).value_in_unit(unit.nanometer / unit.picosecond))


def _atomic_savez(path: Path, **arrays) -> None:
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def displace(positions: np.ndarray, indices: np.ndarray, rng: np.random.Generator,
             low: float = 0.05, high: float = 0.15) -> np.ndarray:
    """Copy of ``positions`` (nm) with atoms ``indices`` moved by random vectors of length U(low, high) Å."""
    out = np.array(positions, dtype=np.float64, copy=True)
    d = rng.normal(size=(len(indices), 3))
    d *= (rng.uniform(low, high, size=len(indices)) / np.linalg.norm(d, axis=1))[:, None]
    out[indices] += d * NM_PER_ANGSTROM
    return out

"""`mlmm prepare`: fix a structure, solvate it, select the ML zone, write ``system.pdb`` + ``system.toml``.

Steps: read PDB/mmCIF -> PDBFixer adds missing heavy atoms of standard residues, OpenMM adds hydrogens at
``--ph`` (ligands are left as they are: their hydrogens must be in the input) -> ML zone selected, template check
(a residue without MM template must lie in the ML zone) -> ML-zone charge (MM templates + ``--ml-charge`` or a
formal-charge estimate for ligands) -> Modeller solvation (TIP3P box, or a droplet with ``--nonperiodic``) ->
the selection is resolved again on the final system -> files written, then rebuilt with ``load_system`` as a
check.

The ``index`` keyword of ``--ml`` counts atoms of the *prepared* system: fixing adds hydrogens, and solvent is
appended after the solute, so prefer ``resname``/``resid`` selections.

Reproducible: every random step (PDBFixer's missing atoms, OpenMM's hydrogen placement and ion choice, droplet
ions) is seeded with ``--seed`` and the minimisations run on one fixed platform, so the same input and options
give the same system; the seed and the options are recorded in ``DIR/prepare.log``. ``--solvate`` without a
value (or ``auto``) takes the smallest padding the MM cutoff and the ML zone's embedding need
(:func:`auto_padding`).
"""
from __future__ import annotations

import argparse
import logging
import os
import random
import shlex
import sys
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import openmm
from openmm import app, unit

from coupling.selection import cut_bonds, select
from coupling.zones import ZONES
from potentials.openmm_params import particle_charges
from potentials.openmm_system import (MLZoneTemplates, check_templates, create_system, element_lj_table,
                                      half_min_width, infer_bonds, load_system, open_forcefield, read_structure)

from potentials.core.errors import SetupError
from potentials.core.spec import CouplingSpec, MLSpec, MMSpec, StructureSpec, SystemSpec

log = logging.getLogger(__name__)

WATER = "HOH"
IONS = {"NA": "Na", "CL": "Cl"}               # Modeller's default Na+/Cl- residue names (amber14/tip3p.xml)
WATER_MOLARITY = 55.4                              # mol/L, as Modeller uses for ionic strength
AUTO_MARGIN_NM = 0.2         # --solvate auto: half the box exceeds what the cutoffs need by this (the zone flexes)
PREPARE_LOG = "prepare.log"  # in the output folder: the command, its options (the seed) and the log


def main(args: argparse.Namespace) -> int:
    """``mlmm prepare``; the log of a successful run is kept in ``DIR/prepare.log`` (with the seed)."""
    records = _Keep()
    ours = [logging.getLogger(n) for n in ("driver.prepare", "coupling.link_atoms")]
    logging.getLogger().addHandler(records)
    levels = [lg.level for lg in ours]
    for lg in ours:
        lg.setLevel(logging.INFO)            # their INFO lines (the cut bonds too) reach prepare.log
    try:
        _prepare(args)
        command = shlex.join(["mlmm"] + sys.argv[1:]) if sys.argv[1:2] == ["prepare"] else f"mlmm prepare {args.pdb}"
        options = ", ".join(f"{k}={v}" for k, v in sorted(vars(args).items()) if k != "command")
        records.write(Path(args.out) / PREPARE_LOG, [f"# {command}", f"# seed {int(getattr(args, 'seed', 0))}",
                                                     f"# options: {options}"])
    finally:
        logging.getLogger().removeHandler(records)
        for lg, level in zip(ours, levels):
            lg.setLevel(level)
    return 0


class _Keep(logging.Handler):
    """Keeps the log lines of one `mlmm prepare`, written to the output folder once it succeeded."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s", "%H:%M:%S"))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))

    def write(self, path: Path, header: list[str]) -> None:
        path.write_text("\n".join(header + self.lines) + "\n")


def _prepare(args: argparse.Namespace) -> None:
    src = Path(args.pdb)
    if not src.is_file():
        raise SetupError(f"input structure {src} not found")
    if src.suffix.lower() == ".gz":                  # e.g. dhfr_jac.pdb.gz: read the decompressed copy
        import gzip
        import shutil
        import tempfile

        with tempfile.TemporaryDirectory(prefix="mlmm-prepare-") as tmp:
            plain = Path(tmp) / src.with_suffix("").name
            try:
                with gzip.open(src, "rb") as fin, open(plain, "wb") as fout:
                    shutil.copyfileobj(fin, fout)
            except (OSError, EOFError) as exc:
                raise SetupError(f"cannot decompress {src}: {exc}") from None
            return _prepare(argparse.Namespace(**{**vars(args), "pdb": str(plain)}))
    if args.solvate is not None and args.solvate != "auto" and args.solvate <= 0:
        raise SetupError(f"--solvate {args.solvate}: the padding must be positive (nm)")
    seed = int(getattr(args, "seed", 0))
    random.seed(seed)                # OpenMM's Modeller: hydrogen positions, ion choice
    np.random.seed(seed)
    out = Path(args.out)
    ff_names = [str(Path(n).resolve()) if Path(n).is_file() else n for n in args.forcefield]
    forcefield = open_forcefield(ff_names)
    expr = args.ml.strip()
    topology, positions, free_residues, q_free = _solute(args, src, forcefield, ff_names, expr)
    padding = auto_padding(positions, _select(topology, expr, positions), args.mm_cutoff,
                           args.embedding_cutoff) if args.solvate == "auto" else args.solvate
    topology, positions, periodic = _surroundings(args, src, forcefield, topology, positions, padding)

    # the final system: resolve the selection again (fixing/solvation changed the indices; a 'within' sees the
    # solvent added around the zone)
    ml = _select(topology, expr, positions, periodic)
    zone = ml_zone(topology, ml)
    box = np.asarray(topology.getPeriodicBoxVectors().value_in_unit(unit.nanometer)) if periodic else None
    if periodic:
        _check_box(box, positions[ml], args.mm_cutoff, args.embedding_cutoff)
    if not args.no_minimize:
        positions = minimize_solvent(forcefield, topology, positions, ml, periodic, args.mm_cutoff)
    out.mkdir(parents=True, exist_ok=True)
    structure = write_structure(topology, positions, out)
    spec = SystemSpec(
        structure=StructureSpec(file=structure.name, forcefield=[_relative(n, out) for n in ff_names],
                                periodic=periodic, box_nm=box.tolist() if periodic else None),
        ml=MLSpec(selection=expr, indices=[int(i) for i in ml], zone=zone),
        mm=MMSpec(nonbonded_method="PME" if periodic else "NoCutoff", cutoff_nm=args.mm_cutoff),
        coupling=CouplingSpec(cutoff_nm=args.embedding_cutoff))
    spec.save(out / "system.toml")
    _final_charges(args, out, spec, ml, free_residues, q_free, structure)


def _select(topology: app.Topology, expr: str, positions, periodic: bool = True) -> np.ndarray:
    """The ML-zone atoms of ``expr`` in this topology and these positions (``within`` is a distance in them, minimum
    image when the system is periodic)."""
    if not expr:
        return np.zeros(0, np.int64)
    vectors = topology.getPeriodicBoxVectors() if periodic else None
    box = np.asarray(vectors.value_in_unit(unit.nanometer)) if vectors is not None else None
    return select(topology, expr, positions, box)


def auto_padding(positions: np.ndarray, ml: np.ndarray, mm_cutoff: float, embedding_cutoff: float) -> float:
    """The smallest solvation padding (nm) whose box holds the MM cutoff and the embedding of the ML zone: half the
    box width must exceed max(MM cutoff, embedding cutoff + ML-zone radius) by `AUTO_MARGIN_NM` (the zone changes
    shape during MD). OpenMM's cube is max(2 r + P, 2 P) wide for a solute of bounding radius r; the padding is
    at least the MM cutoff (no solute atom within the cutoff of its own image), rounded up to 0.05 nm."""
    pos = np.asarray(positions, dtype=float)
    r = float(np.linalg.norm(pos - 0.5 * (pos.min(axis=0) + pos.max(axis=0)), axis=1).max()) if len(pos) else 0.0
    zone = pos[ml] if len(ml) else np.zeros((0, 3))
    radius = float(np.linalg.norm(zone - zone.mean(axis=0), axis=1).max()) if len(zone) else 0.0
    need = max(mm_cutoff, (embedding_cutoff + radius) if len(zone) else 0.0) + AUTO_MARGIN_NM
    padding = max(min(2.0 * need - 2.0 * r, need), mm_cutoff)
    padding = float(np.ceil(padding / 0.05 - 1e-9) * 0.05)
    log.info("--solvate auto: padding %.2f nm (box %.2f nm: half of it %.2f nm >= max(MM cutoff %.2f, embedding "
             "cutoff %.2f + ML-zone radius %.2f) + %.2f nm)", padding, max(2 * r + padding, 2 * padding),
             max(r + padding / 2, padding), mm_cutoff, embedding_cutoff, radius, AUTO_MARGIN_NM)
    return padding


def _solute(args: argparse.Namespace, src: Path, forcefield: app.ForceField, ff_names: list[str], expr: str
            ) -> tuple[app.Topology, np.ndarray, set[int], float]:
    """The fixed solute, its template-less residues (their indices: kept through solvation) and their charge
    (e); registers the ML zone's template generator (element LJ, that charge spread over their atoms)."""
    topology, positions = fixed_structure(src, args.ph, fix=not args.no_fix, seed=int(getattr(args, "seed", 0)))
    ml = _select(topology, expr, positions)
    free = check_templates(forcefield, topology, ml, args.forcefield)
    infer_bonds(topology, positions, free)
    for res in free:
        if not any(a.element.symbol == "H" for a in res.atoms()):
            log.warning("residue %s %s has no hydrogen atoms; they cannot be added to a molecule without MM template"
                        " (add them with e.g. RDKit or Open Babel) unless it really has none", res.id, res.name)

    # ML-zone charge: MM template charges + the template-less residues' charge (given, or estimated)
    q_templated = _templated_charge(ff_names, topology, ml, free)
    q_free = _free_charge(free, args.ml_charge, q_templated)
    _check_parity(topology, ml, args.ml_charge if args.ml_charge is not None else round(q_templated + q_free))
    n_free = sum(len(list(r.atoms())) for r in free)
    generator = MLZoneTemplates(ml, element_lj_table(), charge_per_atom=q_free / n_free if n_free else 0.0)
    forcefield.registerTemplateGenerator(generator)
    return topology, positions, {r.index for r in free}, q_free


def _surroundings(args: argparse.Namespace, src: Path, forcefield: app.ForceField, topology: app.Topology,
                  positions: np.ndarray, padding: float | None) -> tuple[app.Topology, np.ndarray, bool]:
    """Solvent and ions (``padding`` nm: ``--solvate``), and the box: (topology, positions nm, periodic)."""
    if padding is not None:
        topology, positions = solvate(forcefield, topology, positions, padding, args.ionic_strength,
                                      neutralize=not args.no_neutralize, droplet=args.nonperiodic,
                                      seed=int(getattr(args, "seed", 0)))
    periodic = not args.nonperiodic
    if periodic and topology.getPeriodicBoxVectors() is None:
        raise SetupError(f"{src} has no box (CRYST1) and --solvate was not given; solvate it (--solvate 1.4), or "
                         "use --nonperiodic for a cluster")
    if not periodic:
        topology.setPeriodicBoxVectors(None)
    return topology, positions, periodic


def _final_charges(args: argparse.Namespace, out: Path, spec: SystemSpec, ml: np.ndarray, free_residues: set[int],
                   q_free: float, structure: Path) -> None:
    """Rebuild the system from the written files (checks the round trip), set the ML zone's charge from the final
    MM charges (or ``--ml-charge``), save system.toml again and log a summary."""
    topology, system, positions = load_system(SystemSpec.load(out / "system.toml"))
    charges = particle_charges(system)
    in_ml = set(ml.tolist())
    if any(not all(a.index in in_ml for a in r.atoms()) for r in topology.residues() if r.index in free_residues):
        raise SetupError("the ML selection resolved on the solvated system no longer covers the ligand(s) "
                         f"{sorted(free_residues)}; use a resname/resid selection")
    ml_charge = float(charges[ml].sum()) + q_free
    caps = _n_caps(topology, ml)
    if caps and abs(ml_charge - round(ml_charge)) > 1e-3 and args.ml_charge is None:
        log.info("the ML atoms' force-field charges add up to %+.4f e (the selection cuts %d bond(s)); the ML zone "
                 "with its link atoms gets %+d e (--ml-charge to change it)", ml_charge, caps, round(ml_charge))
    elif abs(ml_charge - round(ml_charge)) > 1e-3 and args.ml_charge is None:
        raise SetupError(f"the ML zone's charge {ml_charge:.4f} e is not an integer (a residue cut by the "
                         "selection?); give --ml-charge")
    if args.ml_charge is not None and round(ml_charge) != args.ml_charge:
        log.warning("--ml-charge %+d differs from the MM template charges of the ML zone (%+.3f e); using %+d",
                    args.ml_charge, ml_charge, args.ml_charge)
    if args.ml_charge is not None and not len(ml):
        log.warning("--ml-charge ignored: no ML zone (--ml) was given")
    spec.ml.charge = ml_charge = (args.ml_charge if args.ml_charge is not None else int(round(ml_charge))) \
        if len(ml) else 0
    _check_parity(topology, ml, ml_charge)
    spec.save(out / "system.toml")
    total = float(charges.sum()) + q_free
    if abs(total - round(total)) > 1e-3:
        log.warning("total charge of the system is %.4f e, not an integer", total)
    _summary(topology, ml, ml_charge, total, spec, out, structure, int(getattr(args, "seed", 0)))


def minimize_solvent(forcefield: app.ForceField, topology: app.Topology, positions: np.ndarray, ml: np.ndarray,
                     periodic: bool, cutoff: float, tolerance: float = 10.0, iterations: int = 2000) -> np.ndarray:
    """Relax the MM atoms (solvent clashes from Modeller) with the ML zone held fixed.

    The ML zone must not move: a ligand without MM template has only LJ terms here and would fall apart.
    Zero-mass particles are held fixed by OpenMM's minimizer. One CPU thread with deterministic force sums, so the
    result is reproducible. Returns positions in nm.
    """
    mm = MMSpec(nonbonded_method="PME" if periodic else "NoCutoff", cutoff_nm=cutoff)
    system = create_system(forcefield, topology, mm, periodic)
    for i in ml:
        system.setParticleMass(int(i), 0.0)
    # one thread, deterministic sums: the same input gives the same minimum (two threads gave waters 0.16 nm apart
    # between two runs; one thread was no slower on 2 cores for alanine dipeptide in 1747 waters)
    context = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("CPU"),
                             {"DeterministicForces": "true", "Threads": "1"})
    if periodic:
        context.setPeriodicBoxVectors(*topology.getPeriodicBoxVectors())
    context.setPositions(np.asarray(positions) * unit.nanometer)
    before = context.getState(getEnergy=True).getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
    openmm.LocalEnergyMinimizer.minimize(context, tolerance, iterations)
    state = context.getState(getEnergy=True, getPositions=True)
    after = state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
    log.info("minimised the MM atoms (ML zone fixed): %.1f -> %.1f kJ/mol", before, after)
    return np.asarray(state.getPositions(asNumpy=True).value_in_unit(unit.nanometer))


# ----------------------------------------------------------------------------------------------- structure
def fixed_structure(src: Path, ph: float, fix: bool = True, seed: int = 0) -> tuple[app.Topology, np.ndarray]:
    """Read ``src``; add missing heavy atoms of standard residues (PDBFixer) and hydrogens (OpenMM, at ``ph``).

    Missing residues (gaps) are never modelled. With ``fix=False`` missing heavy atoms are an error and the
    structure is returned as read. Positions in nm. ``seed``: PDBFixer's and (Python's ``random``) OpenMM's
    hydrogen placement; the hydrogens are relaxed on the Reference platform (the same numbers everywhere).
    CHARMM's HSE residues are read as HIS with their hydrogens (:func:`_standard_histidines`).
    """
    renamed = _standard_histidines(src)
    try:
        return _fixed_structure(renamed or src, src, ph, fix, seed)
    finally:
        if renamed:
            renamed.unlink()


def _fixed_structure(path: Path, src: Path, ph: float, fix: bool, seed: int) -> tuple[app.Topology, np.ndarray]:
    """:func:`fixed_structure` of the file ``path`` (``src`` or its renamed copy; errors name ``src``)."""
    from pdbfixer import PDBFixer

    try:
        fixer = PDBFixer(filename=str(path))
    except Exception as exc:    # PDBFixer/OpenMM readers raise assorted exception types on bad files
        raise SetupError(f"cannot read {src}: {exc}") from None
    fixer.missingResidues = {}
    fixer.findMissingAtoms()
    missing = {res: [a.name for a in atoms] for res, atoms in fixer.missingAtoms.items()}
    for res, names in fixer.missingTerminals.items():
        missing.setdefault(res, []).extend(names)
    if not fix:
        if missing:
            res, names = next(iter(missing.items()))
            more = f" ({len(missing)} residues in all)" if len(missing) > 1 else ""
            raise SetupError(f"residue {res.id} {res.name} (chain {res.chain.id}) is missing heavy atoms "
                             f"{', '.join(names)}{more}; run without --no-fix to add them")
        return read_structure(path)
    if missing:
        log.info("adding missing heavy atoms to %d residue(s)", len(missing))
        fixer.addMissingAtoms(seed=seed)
    # Modeller directly, not fixer.addMissingHydrogens(): that one downloads definitions of every ligand from
    # the PDB (network, and a wrong molecule when a ligand reuses a PDB code); ligands must come with their H.
    modeller = app.Modeller(fixer.topology, fixer.positions)
    n_before = modeller.topology.getNumAtoms()
    random.seed(seed)
    modeller.addHydrogens(pH=ph, platform=openmm.Platform.getPlatformByName("Reference"))
    if modeller.topology.getNumAtoms() > n_before:
        log.info("added %d hydrogens (pH %.1f)", modeller.topology.getNumAtoms() - n_before, ph)
    return modeller.topology, _nm(modeller.positions)


def _standard_histidines(src: Path) -> Path | None:
    """CHARMM's HSE (H on NE2) is the one histidine name OpenMM's PDB reader does not know (HSD, HSP and Amber's
    HID/HIE/HIP it maps to HIS): a PDB file with HSE residues is copied with them renamed HIS, the hydrogens as
    they are, so the protonation state the file gives is kept. Returns the copy (the caller deletes it), or None."""
    if src.suffix.lower() != ".pdb" or not src.is_file():
        return None
    lines = src.read_text(errors="replace").splitlines(keepends=True)
    hse = [i for i, line in enumerate(lines) if line.startswith(("ATOM  ", "HETATM")) and line[17:20] == "HSE"]
    if not hse:
        return None
    for i in hse:
        lines[i] = lines[i][:17] + "HIS" + lines[i][20:]
    log.info("read %d HSE atom(s) as HIS (CHARMM's name for the NE2-protonated histidine)", len(hse))
    fd, name = tempfile.mkstemp(suffix=".pdb", prefix=src.stem + "-")
    with os.fdopen(fd, "w") as fh:
        fh.writelines(lines)
    return Path(name)


def solvate(forcefield: app.ForceField, topology: app.Topology, positions: np.ndarray, padding: float,
            ionic_strength: float = 0.0, neutralize: bool = True, droplet: bool = False, seed: int = 0
            ) -> tuple[app.Topology, np.ndarray]:
    """TIP3P solvent with ``padding`` nm around the solute: a cubic box, or (``droplet``) a sphere of radius
    (solute radius + padding) cut from it. Ions (Na+/Cl-) neutralise and give ``ionic_strength`` (molar); the
    waters they replace are chosen with ``seed``."""
    random.seed(seed)                       # Modeller picks the waters to replace by ions with Python's random
    modeller = app.Modeller(topology, positions * unit.nanometer)
    try:
        modeller.addSolvent(forcefield, model="tip3p", padding=padding * unit.nanometer, boxShape="cube",
                            ionicStrength=0.0 * unit.molar if droplet else ionic_strength * unit.molar,
                            neutralize=neutralize and not droplet)
    except SetupError:
        raise
    except ValueError as exc:
        raise SetupError(f"solvation failed: {' '.join(str(exc).split())}") from None
    if not droplet:
        return modeller.topology, _nm(modeller.positions)

    n_solute = topology.getNumAtoms()
    x = _nm(modeller.positions)
    center = positions.mean(axis=0)
    radius = np.linalg.norm(positions - center, axis=1).max() + padding
    far = [r for r in modeller.topology.residues() if r.name == WATER and r.index >= topology.getNumResidues()
           and np.linalg.norm(x[[a.index for a in r.atoms()]] - center, axis=1).max() > radius]
    modeller.delete(far)
    modeller.topology.setPeriodicBoxVectors(None)
    if neutralize or ionic_strength > 0:
        _add_droplet_ions(modeller, forcefield, n_solute, ionic_strength, neutralize, seed)
    log.info("water droplet of radius %.2f nm", radius)
    return modeller.topology, _nm(modeller.positions)


def _add_droplet_ions(modeller: app.Modeller, forcefield: app.ForceField, n_solute: int, ionic_strength: float,
                      neutralize: bool, seed: int = 0) -> None:
    """Replace random waters (not within 0.5 nm of the solute) by Na+/Cl- (Modeller only does this for boxes)."""
    system = forcefield.createSystem(modeller.topology)
    q = int(round(float(particle_charges(system).sum()))) if neutralize else 0
    x = _nm(modeller.positions)
    waters = [r for r in modeller.topology.residues() if r.name == WATER]
    n_pairs = int(np.floor(len(waters) * ionic_strength / WATER_MOLARITY + 0.5))
    n_pos, n_neg = n_pairs + max(0, -q), n_pairs + max(0, q)
    near = np.min(np.linalg.norm(x[[next(r.atoms()).index for r in waters]][:, None] - x[None, :n_solute], axis=2),
                  axis=1) < 0.5
    candidates = [w for w, n in zip(waters, near) if not n]
    if n_pos + n_neg > len(candidates):
        raise SetupError(f"droplet too small for {n_pos + n_neg} ions; increase --solvate")
    chosen = np.random.default_rng(seed).choice(len(candidates), n_pos + n_neg, replace=False)
    ions = app.Topology()
    chain = ions.addChain()
    ion_pos = []
    for k, i in enumerate(chosen):
        name = "NA" if k < n_pos else "CL"
        res = ions.addResidue(name, chain)
        ions.addAtom(name, app.element.Element.getBySymbol(IONS[name]), res)
        ion_pos.append(x[next(candidates[i].atoms()).index])
    modeller.delete([candidates[i] for i in chosen])
    if ion_pos:
        modeller.add(ions, np.array(ion_pos) * unit.nanometer)


def write_structure(topology: app.Topology, positions: np.ndarray, out: Path) -> Path:
    """system.pdb (CONECT for ligands, CRYST1 box), or system.cif when the PDB format's columns would overflow
    (residue ids are kept as in the input so that ``resid`` selections mean the same after preparation)."""
    big = topology.getNumAtoms() > 99_999 or any(len(str(r.id)) > 4 for r in topology.residues())
    path = out / ("system.cif" if big else "system.pdb")
    writer = app.PDBxFile if big else app.PDBFile
    with open(path, "w") as f:
        writer.writeFile(topology, positions * unit.nanometer, f, keepIds=True)
    return path


# ----------------------------------------------------------------------------------------------- charges
# total bond order (sigma + pi bonds) -> formal charge, per element; an order not listed is ambiguous
_ORDER_CHARGE = {
    "H": {1: 0}, "B": {3: 0, 4: -1}, "C": {4: 0}, "Si": {4: 0},
    "N": {3: 0, 4: 1, 2: -1}, "O": {2: 0, 3: 1, 1: -1},
    "F": {1: 0, 0: -1}, "Cl": {1: 0, 0: -1}, "Br": {1: 0, 0: -1}, "I": {1: 0, 0: -1},
    "S": {2: 0, 4: 0, 6: 0, 1: -1, 3: 1}, "Se": {2: 0, 1: -1, 3: 1}, "P": {3: 0, 5: 0, 4: 1, 6: -1},
}
_VALENCE = {"H": 1, "B": 3, "C": 4, "Si": 4, "N": 3, "O": 2, "F": 1, "Cl": 1, "Br": 1, "I": 1, "S": 2, "Se": 2, "P": 3}
_EXPANDED = {"S": 6, "P": 5}      # hypervalent S(VI), P(V): sulfate, sulfone, phosphate


def estimate_formal_charge(residue: app.topology.Residue) -> int | None:
    """Net formal charge of a molecule with all its hydrogens, from connectivity alone; None when ambiguous.

    pi bonds are placed by a maximum-weight matching between free valences of bonded atoms (normal valences
    first, then hypervalent S/P, last an N+ donating to an atom that is left without partner, as in nitro
    groups or N-oxides); each atom's charge then follows from its total bond order (``_ORDER_CHARGE``). A
    leftover carbon (carbocation or carbanion?) makes the answer ambiguous. Examples: acetate -1, methyl-
    ammonium +1, nitromethane 0, sulfate -2, phosphate -3, imidazolium +1, benzene 0.
    """
    import networkx as nx          # slow to import (~1 s); only needed for template-less ligands

    atoms = list(residue.atoms())
    if any(a.element is None or a.element.symbol not in _ORDER_CHARGE for a in atoms):
        return None
    degree = Counter()
    neighbours: dict[int, list[int]] = {a.index: [] for a in atoms}
    for a, b in residue.bonds():        # internal and external bonds both count for the valence
        for x, y in ((a, b), (b, a)):
            if x.index in neighbours:
                degree[x.index] += 1
                if y.index in neighbours:
                    neighbours[x.index].append(y.index)
    symbol = {a.index: a.element.symbol for a in atoms}
    slots: dict[int, list[str]] = {}                   # per atom: "r" normal, "x" hypervalent, "o" N+ donor
    for i, s in symbol.items():
        n = degree[i]
        kinds = ["r"] * max(0, _VALENCE[s] - n)
        kinds += ["x"] * max(0, _EXPANDED.get(s, 0) - max(n, _VALENCE[s]))
        if s == "N" and 1 <= n <= 3:
            kinds.append("o")
        slots[i] = kinds
    graph = nx.Graph()
    for i, kinds in slots.items():
        for j in neighbours[i]:
            if j <= i:
                continue
            for ki, a in enumerate(kinds):
                for kj, b in enumerate(slots[j]):
                    if a == "o" and b == "o":
                        continue
                    if "o" in (a, b):      # prefer donating to C/N (N-oxide ring) over O (leave O-)
                        w = 3 if (symbol[j] if a == "o" else symbol[i]) in ("C", "N") else 2
                    else:              # +1 per end that is not O/S: a lone charge rather sits on O/S
                        w = (100 if a == b == "r" else 90) + sum(symbol[k] not in ("O", "S") for k in (i, j))
                    graph.add_edge((i, ki), (j, kj), weight=w)
    order = dict(degree)
    for u, v in nx.max_weight_matching(graph):
        order[u[0]] += 1
        order[v[0]] += 1
    charge = 0
    for i, s in symbol.items():
        q = _ORDER_CHARGE[s].get(order.get(i, 0))
        if q is None:
            return None
        charge += q
    return charge


def _templated_charge(ff_names: list[str], topology: app.Topology, ml: np.ndarray, free: list) -> float:
    """Sum of the MM charges of ML atoms in residues that have templates (vacuum system of the solute)."""
    free_atoms = {a.index for r in free for a in r.atoms()}
    templated = [i for i in ml.tolist() if i not in free_atoms]
    if not templated:
        return 0.0
    forcefield = open_forcefield(ff_names)     # a separate one: the generator here has no charges to spread
    forcefield.registerTemplateGenerator(MLZoneTemplates(ml, element_lj_table()))
    system = create_system(forcefield, topology, MMSpec(nonbonded_method="NoCutoff"), periodic=False)
    return float(particle_charges(system)[templated].sum())


def _free_charge(free: list, ml_charge: int | None, q_templated: float) -> float:
    """Charge of the template-less ML residues: --ml-charge minus the templated part, else the estimate."""
    if ml_charge is not None:
        q = ml_charge - q_templated
        if free and abs(q - round(q)) > 1e-3:
            log.warning("--ml-charge %d minus MM template charges %.4f is not an integer", ml_charge, q_templated)
        estimates = [estimate_formal_charge(r) for r in free]
        if free and None not in estimates and sum(estimates) != round(q):
            log.warning("--ml-charge %d differs from the formal-charge estimate %d of the ML zone", ml_charge,
                        round(q_templated) + sum(estimates))
        return q if free else 0.0
    total = 0
    for res in free:
        q = estimate_formal_charge(res)
        if q is None:
            no_h = "" if any(a.element.symbol == "H" for a in res.atoms()) else " (it has no hydrogens: add them)"
            raise SetupError(f"cannot tell the charge of residue {res.id} {res.name} from its bonds{no_h}; give the "
                             "total charge of the ML zone with --ml-charge")
        log.info("residue %s %s: formal charge %+d (estimated from connectivity; override with --ml-charge)",
                 res.id, res.name, q)
        total += q
    return float(total)


def ml_zone(topology: app.Topology, ml: np.ndarray) -> str:
    """The ML-zone mapping a selection needs (``[ml] zone``): ``link-atoms`` when it cuts covalent bonds (checked:
    single bonds at sp3 carbons only, :mod:`coupling.link_atoms`), else ``whole-molecules``."""
    name = "link-atoms" if len(ml) and cut_bonds(topology, ml) else "whole-molecules"
    if len(ml):
        ZONES.get(name).from_topology(topology, ml)            # refuses what the mapping cannot represent
    return name


def _n_caps(topology: app.Topology, ml: np.ndarray) -> int:
    """Capping hydrogens the ML zone gets (one per cut bond)."""
    return len(cut_bonds(topology, ml)) if len(ml) else 0


def _check_parity(topology: app.Topology, ml: np.ndarray, charge: int) -> None:
    if not len(ml):
        return
    atoms = list(topology.atoms())
    electrons = sum(atoms[i].element.atomic_number for i in ml.tolist()) + _n_caps(topology, ml) - charge
    if electrons % 2:
        raise SetupError(f"the ML zone has {electrons} electrons at charge {charge:+d} (odd: a radical); check its "
                         "hydrogens and give the right total charge with --ml-charge")


def _check_box(box: np.ndarray, ml_pos: np.ndarray, mm_cutoff: float, cutoff: float) -> None:
    """The MM cutoff and the embedding (cutoff + ML-zone radius, see coupling/embedding.py) must fit in half the
    box. Padding P gives a box of max(solute diameter + P, 2 P) (OpenMM 8), so P = W/2 always gives width W.
    The fix advised is a bigger box, never a smaller embedding cutoff: the cutoff is part of how the model was
    trained (the ML client refuses another one, coupling/ml_engine.py check_embedding)."""
    half = half_min_width(box)
    if mm_cutoff >= half:
        raise SetupError(f"--mm-cutoff {mm_cutoff} nm must be below half the shortest box width ({half:.2f} nm); use "
                         f"a larger --solvate padding (at least {mm_cutoff + 0.1:.1f} nm, or --solvate auto)")
    if not len(ml_pos):
        return
    radius = float(np.linalg.norm(ml_pos - ml_pos.mean(axis=0), axis=1).max())
    if cutoff + radius >= half:
        raise SetupError(f"box too small for the embedding: cutoff {cutoff:.2f} nm + ML-zone radius {radius:.2f} nm "
                         f">= half the shortest box width {half:.2f} nm; use a larger --solvate padding (at least "
                         f"{cutoff + radius + 0.1:.1f} nm, or --solvate auto): the embedding cutoff must stay the "
                         "one the model was trained with")


# ----------------------------------------------------------------------------------------------- helpers
def _nm(positions) -> np.ndarray:
    if unit.is_quantity(positions):
        positions = positions.value_in_unit(unit.nanometer)
    return np.array([[p[0], p[1], p[2]] for p in positions], dtype=np.float64)


def _relative(name: str, out: Path) -> str:
    """Force-field entries in system.toml: OpenMM names as given, local files relative to the output folder."""
    p = Path(name)
    return os.path.relpath(p, out.resolve()) if p.is_absolute() else name


def _summary(topology: app.Topology, ml: np.ndarray, ml_charge: int, total: float, spec: SystemSpec, out: Path,
             structure: Path, seed: int = 0) -> None:
    counts = Counter(r.name for r in topology.residues())
    ions = {k: v for k, v in counts.items() if k in IONS}
    mlres = sorted({f"{a.residue.name} {a.residue.id}" for a in topology.atoms() if a.index in set(ml.tolist())})
    box = spec.structure.box_nm
    log.info("prepared %s: %d atoms, %d waters, ions %s, total charge %+.3f e", structure, topology.getNumAtoms(),
             counts.get(WATER, 0), ", ".join(f"{v} {k}" for k, v in ions.items()) or "none", total)
    log.info("ML zone: %d atoms (%s), charge %+d e, selection '%s'", len(ml),
             ", ".join(mlres[:5]) + (" ..." if len(mlres) > 5 else ""), ml_charge, spec.ml.selection)
    log.info("box: %s; MM %s; embedding cutoff %.2f nm; wrote %s (seed %d: see %s)",
             "x".join(f"{np.linalg.norm(v):.3f}" for v in box) + " nm" if box else "none (cluster)",
             spec.mm.nonbonded_method + (f" cutoff {spec.mm.cutoff_nm:.2f} nm" if box else ""),
             spec.coupling.cutoff_nm, out / "system.toml", seed, out / PREPARE_LOG)

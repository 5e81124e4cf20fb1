"""MM-system surgery: the OpenMM system the MM client runs in an ML/MM simulation.

Additive scheme. The MM client owns every MM–MM term (PME included) and the ML–MM Lennard-Jones terms; the ML
client owns everything internal to the ML zone and, in electrostatic embedding, the ML–MM electrostatics.
:func:`mlmm_mm_system` turns the full MM system into the MM client's part:

* bonded terms (and constraints) whose atoms are all ML are removed;
* every ML–ML pair is excluded from the nonbonded forces (exceptions with zero charge product and epsilon,
  exclusions in CustomNonbondedForce);
* electrostatic mode: ML atoms get zero charge, so PME sees no ML charge and ML–MM Coulomb is left to the
  network; mechanical mode: ML atoms keep fixed charges (given, or the MM ones) and the MM client computes
  ML–MM Coulomb; the ML–MM Lennard-Jones terms are kept in both modes.

* a zone with link atoms (:mod:`coupling.link_atoms`, ``cut_pairs``): every bonded term with at least one MM
  atom is kept (bond, angle, torsion, CMAP across the boundary); ML–MM nonbonded exceptions (1-4 pairs across
  the boundary) keep their Lennard-Jones part and their Coulomb part follows the ML charges (zero in
  electrostatic embedding, where the network owns all ML–MM electrostatics; the fixed charges in mechanical).

Any other cut bond is refused (:func:`boundary_bonds` lists them). :func:`mm_environment` reads the MM charges
and residue ids once for the embedding.
"""
from __future__ import annotations

import copy
import itertools
import logging
import re
import xml.etree.ElementTree as ET

import numpy as np
import openmm
from openmm import app

from coupling.environment import MMEnvironment
from coupling.schemes import get_scheme
from coupling.selection import check_boundary, describe_atom
from potentials.core.errors import SetupError
from potentials.openmm_params import nonbonded_force, particle_charges

log = logging.getLogger(__name__)


# Bonded forces whose ML-only terms are removed. Each serialises its terms as child elements of one list
# element, the atoms as attributes p1.. (a1..a4/b1..b4 for CMAP); the list is edited in XML, which keeps
# every other setting of the force (global parameters, tabulated functions, groups, names) untouched.
BONDED_FORCES = ("HarmonicBondForce", "HarmonicAngleForce", "PeriodicTorsionForce", "RBTorsionForce",
                 "CMAPTorsionForce", "CustomBondForce", "CustomAngleForce", "CustomTorsionForce",
                 "CustomCompoundBondForce")
# Force-field terms: a term that mixes ML and MM atoms here means the selection cuts through a molecule.
# (Custom bonded terms that mix the zones are user restraints; they stay with the MM client.)
_STANDARD_BONDED = BONDED_FORCES[:5]
_TERM_LISTS = ("Bonds", "Angles", "Torsions")
_ATOM_ATTR = re.compile(r"^[pab]\d+$")
# Forces that act on no particle (or only rescale the box / velocities): nothing to do.
ATOM_FREE_FORCES = ("CMMotionRemover", "MonteCarloBarostat", "MonteCarloAnisotropicBarostat",
                    "MonteCarloMembraneBarostat", "MonteCarloFlexibleBarostat", "AndersenThermostat")
# Kept as they are: external restraints are user biases, owned by the MM client in every mode.
KEPT_FORCES = ("CustomExternalForce",)


def _ml_mask(n_atoms: int, ml_indices) -> np.ndarray:
    ml = np.asarray(ml_indices, dtype=np.int64).reshape(-1)
    if ml.size == 0:
        raise SetupError("the ML zone is empty; give a selection that matches at least one atom")
    if ml.min() < 0 or ml.max() >= n_atoms:
        raise SetupError(f"ML-zone atom index {int(ml.max() if ml.max() >= n_atoms else ml.min())} is outside "
                         f"the system (0..{n_atoms - 1}); re-run `mlmm prepare` for this structure")
    if len(np.unique(ml)) != len(ml):
        raise SetupError("the ML-zone atom list contains duplicates")
    mask = np.zeros(n_atoms, bool)
    mask[ml] = True
    return mask


def boundary_bonds(system: openmm.System, ml_indices) -> list[tuple[int, int]]:
    """Covalent neighbour pairs (ML atom, MM atom) that the ML selection cuts.

    Read from the bonds (HarmonicBondForce), the constraints and the NonbondedForce exceptions (1-2, 1-3
    and 1-4 neighbours). Empty for a selection of whole molecules. Link atoms would be placed on these.
    """
    is_ml = _ml_mask(system.getNumParticles(), ml_indices)
    pairs: set[tuple[int, int]] = set()

    def add(i: int, j: int) -> None:
        if is_ml[i] != is_ml[j]:
            pairs.add((i, j) if is_ml[i] else (j, i))

    for f in system.getForces():
        if isinstance(f, openmm.HarmonicBondForce):
            for k in range(f.getNumBonds()):
                add(*f.getBondParameters(k)[:2])
        elif isinstance(f, openmm.NonbondedForce):
            for k in range(f.getNumExceptions()):
                add(*f.getExceptionParameters(k)[:2])
    for k in range(system.getNumConstraints()):
        add(*system.getConstraintParameters(k)[:2])
    return sorted(pairs)


def _cut_bonds_of(system: openmm.System, is_ml: np.ndarray) -> tuple[set, set]:
    """(bonds, constraints) of the system between an ML and an MM atom, as (ML atom, MM atom) pairs."""
    def pair(i: int, j: int) -> tuple[int, int]:
        return (i, j) if is_ml[i] else (j, i)

    bonds = {pair(*f.getBondParameters(k)[:2]) for f in system.getForces() if isinstance(f, openmm.HarmonicBondForce)
             for k in range(f.getNumBonds()) if is_ml[f.getBondParameters(k)[0]] != is_ml[f.getBondParameters(k)[1]]}
    constraints = {pair(*system.getConstraintParameters(k)[:2]) for k in range(system.getNumConstraints())
                   if is_ml[system.getConstraintParameters(k)[0]] != is_ml[system.getConstraintParameters(k)[1]]}
    return bonds, constraints


def check_selection(system: openmm.System, ml_indices, topology: app.Topology | None = None,
                    cut_pairs=frozenset()) -> None:
    """Refuse ML zones the coupling cannot represent: covalent bonds cut without a link atom (``cut_pairs``: the
    (ML atom, MM atom) bonds the zone caps, :meth:`coupling.zones.WholeMolecules.cut_pairs`), constraints across
    the boundary, and virtual sites.

    Raises
    ------
    SetupError
        naming the first offending atoms (and residues when a topology is given).
    """
    is_ml = _ml_mask(system.getNumParticles(), ml_indices)
    cut_pairs = {(int(i), int(j)) for i, j in cut_pairs}
    atoms = list(topology.atoms()) if topology is not None else None
    if atoms is not None and len(atoms) != system.getNumParticles():
        raise SetupError(f"topology has {len(atoms)} atoms but the OpenMM system {system.getNumParticles()}")
    if topology is not None and not cut_pairs:
        check_boundary(topology, np.flatnonzero(is_ml))        # bonds as the structure file has them

    def name(i: int) -> str:
        return f"atom {i}" if atoms is None else describe_atom(atoms[i])

    if cut_pairs:
        bonds, constraints = _cut_bonds_of(system, is_ml)
        if constraints:
            i, j = sorted(constraints)[0]
            raise SetupError(f"the bond between ML {name(i)} and MM {name(j)} is cut by the ML zone but constrained "
                             "in the MM system; build it with constraints only on bonds to hydrogen (HBonds) or none")
        uncapped = sorted(bonds - cut_pairs)
        if uncapped:
            i, j = uncapped[0]
            raise SetupError(f"the ML selection cuts the bond between ML {name(i)} and MM {name(j)}, which has no "
                             "link atom (the system's bonds differ from the structure's); re-run `mlmm prepare`")
    else:
        cut = boundary_bonds(system, ml_indices)               # bonds, constraints and 1-2/1-3/1-4 pairs
        if cut:
            i, j = cut[0]
            raise SetupError(f"the ML selection cuts {len(cut)} covalent link(s), e.g. between ML {name(i)} and MM "
                             f"{name(j)}: select whole molecules (e.g. whole residues of a ligand, or the full "
                             "peptide), or cap the cut bonds with link atoms ([ml] zone = \"link-atoms\", set by "
                             "`mlmm prepare` for cuts at sp3 carbons)")
    for k in range(system.getNumParticles()):
        if system.isVirtualSite(k):
            vs = system.getVirtualSite(k)
            group = [k] + [vs.getParticle(m) for m in range(vs.getNumParticles())]
            if is_ml[group].any():
                raise SetupError(f"{name(k)} is a virtual site tied to the ML zone; the network cannot represent "
                                 "massless sites: use a water model without virtual sites (e.g. TIP3P) near "
                                 "the ML zone, or leave the site's molecule out of the ML zone")


def _bonded_terms(root: ET.Element):
    """(list element, term element, atom indices) of every term in a serialised bonded force."""
    for container in root:
        if container.tag in _TERM_LISTS:
            for term in list(container):
                atoms = [int(v) for k, v in term.attrib.items() if _ATOM_ATTR.match(k)]
                if atoms:
                    yield container, term, atoms


def ml_only_terms(system: openmm.System, ml_indices) -> list[tuple[str, list[int]]]:
    """(force type, atoms) of every bonded term whose atoms are all in the ML zone (none after the surgery)."""
    is_ml = _ml_mask(system.getNumParticles(), ml_indices)
    return [(type(f).__name__, atoms) for f in system.getForces() if type(f).__name__ in BONDED_FORCES
            for _, _, atoms in _bonded_terms(ET.fromstring(openmm.XmlSerializer.serialize(f)))
            if is_ml[atoms].all()]


def bonded_term_counts(system: openmm.System, ml_indices) -> dict[str, tuple[int, int]]:
    """Per bonded force (type and name): (terms whose atoms are all ML, terms with at least one MM atom)."""
    is_ml = _ml_mask(system.getNumParticles(), ml_indices)
    out: dict[str, tuple[int, int]] = {}
    for f in system.getForces():
        kind = type(f).__name__
        if kind in BONDED_FORCES:
            flags = [bool(is_ml[atoms].all()) for _, _, atoms in
                     _bonded_terms(ET.fromstring(openmm.XmlSerializer.serialize(f)))]
            key = f"{kind} '{f.getName()}'"
            a, b = out.get(key, (0, 0))
            out[key] = (a + sum(flags), b + len(flags) - sum(flags))
    return out


def _drop_ml_terms(force: openmm.Force, is_ml: np.ndarray, boundary: bool = False) -> tuple[openmm.Force, int]:
    """A copy of a bonded force without the terms whose atoms are all ML; also the number removed. Terms that mix
    ML and MM atoms are refused unless the zone has link atoms (``boundary``): then they stay with the MM client."""
    root = ET.fromstring(openmm.XmlSerializer.serialize(force))
    kind = type(force).__name__
    removed = mixed = 0
    for container, term, atoms in _bonded_terms(root):
        inside = is_ml[atoms]
        if inside.all():
            container.remove(term)
            removed += 1
        elif inside.any() and kind in _STANDARD_BONDED and not boundary:
            raise SetupError(f"{kind} '{force.getName()}' has a term on atoms {atoms} that mixes the ML and MM "
                             "zones (the selection cuts a molecule); select whole molecules")
        elif inside.any() and kind in _STANDARD_BONDED:
            mixed += 1                                 # across a link atom's cut bond: the MM client keeps it
        elif inside.any():
            log.info("%s '%s': term on atoms %s mixes ML and MM atoms; kept in the MM client (a restraint)",
                     kind, force.getName(), atoms)
    if mixed:
        log.info("%s '%s': %d terms across the ML/MM boundary kept in the MM client", kind, force.getName(), mixed)
    return openmm.XmlSerializer.deserialize(ET.tostring(root, encoding="unicode")), removed


def _touches(force: openmm.Force, is_ml: np.ndarray) -> bool:
    """Whether an unsupported force acts on an ML atom: per-particle lists cover every atom; otherwise look
    for atom-index attributes in its serialised form."""
    root = ET.fromstring(openmm.XmlSerializer.serialize(force))
    for el in root.iter():
        if el.tag == "Particle" and not any(k in el.attrib for k in ("p", "index")):
            return True                       # one entry per particle of the system: covers ML atoms too
        for k, v in el.attrib.items():
            if (_ATOM_ATTR.match(k) or k in ("p", "index", "particle")) and v.lstrip("-").isdigit() \
                    and 0 <= int(v) < len(is_ml) and is_ml[int(v)]:
                return True
    return False


def _fix_nonbonded(nb: openmm.NonbondedForce, ml: np.ndarray, is_ml: np.ndarray, charges: np.ndarray) -> None:
    """Set the ML charges (zero in electrostatic embedding); every ML–ML pair becomes an exception with no
    interaction at all; ML–MM exceptions (a zone with link atoms: 1-4 pairs across the cut bonds) keep their
    Lennard-Jones part, and their charge product follows the ML atom's new charge."""
    for k in range(nb.getNumParticleParameterOffsets()):
        if is_ml[nb.getParticleParameterOffset(k)[1]]:
            raise SetupError(f"NonbondedForce '{nb.getName()}' has a parameter offset on ML atom "
                             f"{nb.getParticleParameterOffset(k)[1]}; alchemical offsets are not supported in the "
                             "ML zone")
    for k in range(nb.getNumExceptionParameterOffsets()):
        i, j = nb.getExceptionParameters(nb.getExceptionParameterOffset(k)[1])[:2]
        if is_ml[i] or is_ml[j]:
            raise SetupError(f"NonbondedForce '{nb.getName()}' has a parameter offset on the exception of atoms "
                             f"{i}-{j} in the ML zone; alchemical offsets are not supported there")
    ratio = np.ones(len(is_ml))
    for n, i in enumerate(ml):
        q, sigma, eps = nb.getParticleParameters(int(i))
        q = q.value_in_unit(openmm.unit.elementary_charge)
        ratio[int(i)] = float(charges[n]) / q if q != 0 else (0.0 if charges[n] == 0 else np.nan)
        nb.setParticleParameters(int(i), float(charges[n]), sigma, eps)
    seen = set()
    for k in range(nb.getNumExceptions()):
        i, j, qq, sigma, eps = nb.getExceptionParameters(k)
        if is_ml[i] and is_ml[j]:
            nb.setExceptionParameters(k, i, j, 0.0, sigma, 0.0)
            seen.add((min(i, j), max(i, j)))
        elif is_ml[i] or is_ml[j]:                 # across a cut bond: 1-4 Coulomb scaled by the new ML charge
            r = ratio[i if is_ml[i] else j]
            if not np.isfinite(r):
                raise SetupError(f"ML atom {i if is_ml[i] else j} has no force-field charge but a fixed charge: its "
                                 "1-4 exceptions across the cut bond cannot be rescaled; use mechanical_charges = \"mm\"")
            nb.setExceptionParameters(k, i, j, qq * r, sigma, eps)
    for i, j in itertools.combinations(sorted(int(a) for a in ml), 2):
        if (i, j) not in seen:
            nb.addException(i, j, 0.0, 1.0, 0.0)


def _fix_custom_nonbonded(force: openmm.CustomNonbondedForce, ml: np.ndarray) -> None:
    names = {force.getPerParticleParameterName(k).lower() for k in range(force.getNumPerParticleParameters())}
    if names & {"q", "charge", "charges"}:
        raise SetupError(f"CustomNonbondedForce '{force.getName()}' has a per-particle charge parameter; "
                         "charges outside NonbondedForce cannot be handed to the ML client")
    excluded = {tuple(sorted(force.getExclusionParticles(k))) for k in range(force.getNumExclusions())}
    for i, j in itertools.combinations(sorted(int(a) for a in ml), 2):
        if (i, j) not in excluded:
            force.addExclusion(i, j)


def mlmm_mm_system(system: openmm.System, ml_indices, mode: str = "electrostatic",
                   ml_charges=None, cut_pairs=frozenset()) -> openmm.System:
    """The MM client's system: a deep copy of ``system`` with the ML zone's own terms taken out.

    Parameters
    ----------
    system : openmm.System
        the full MM system (left untouched).
    ml_indices : sequence of int
        0-based atom indices of the ML zone (whole molecules).
    mode : {"electrostatic", "mechanical"}
        electrostatic: ML charges are zero (the ML client owns ML–MM Coulomb); mechanical: ML atoms keep
        fixed charges and the MM client computes ML–MM Coulomb.
    ml_charges : sequence of float (e), optional
        mechanical mode only: fixed charges of the ML atoms, in the order of ``ml_indices`` (for example the
        network's vacuum charges); default: the MM charges.
    cut_pairs : set of (ML atom, MM atom)
        the covalent bonds the zone caps with link atoms (:mod:`coupling.link_atoms`); empty: whole molecules.

    Returns
    -------
    openmm.System
        ML-only bonded terms and constraints removed, ML–ML nonbonded pairs excluded, ML–MM LJ kept.
    """
    scheme = get_scheme(mode)
    ml = np.asarray(ml_indices, dtype=np.int64).reshape(-1)
    is_ml = _ml_mask(system.getNumParticles(), ml)
    check_selection(system, ml, cut_pairs=cut_pairs)
    fixed = None if ml_charges is None else np.asarray(ml_charges, dtype=np.float64).reshape(-1)
    if fixed is not None and fixed.shape != ml.shape:
        raise SetupError(f"need {len(ml)} finite ML charges (one per ML atom), got {fixed.shape[0]}")
    charges = scheme.ml_charges_in_mm(particle_charges(system)[ml], fixed)
    nonbonded_force(system)
    out = copy.deepcopy(system)
    for k in reversed(range(out.getNumConstraints())):
        i, j, _ = out.getConstraintParameters(k)
        if is_ml[i] and is_ml[j]:
            out.removeConstraint(k)
    forces = []
    for force in out.getForces():
        kind = type(force).__name__
        if kind in BONDED_FORCES:
            force, removed = _drop_ml_terms(force, is_ml, boundary=bool(cut_pairs))
            log.debug("%s: removed %d ML-only terms", kind, removed)
        else:
            force = copy.deepcopy(force)        # owned by Python until re-added below
            if isinstance(force, openmm.NonbondedForce):
                _fix_nonbonded(force, ml, is_ml, charges)
            elif isinstance(force, openmm.CustomNonbondedForce):
                _fix_custom_nonbonded(force, ml)
            elif kind not in ATOM_FREE_FORCES + KEPT_FORCES and _touches(force, is_ml):
                raise SetupError(f"force '{force.getName()}' ({kind}) acts on ML atoms and the ML/MM surgery does "
                                 f"not know how to split it; supported: {', '.join(BONDED_FORCES)}, "
                                 "NonbondedForce, CustomNonbondedForce (implicit solvent and polarisable "
                                 "force fields are not supported)")
        forces.append(force)
    for k in reversed(range(out.getNumForces())):
        out.removeForce(k)
    for force in forces:
        out.addForce(force)
    return out


mm_charges = particle_charges        # partial charges (e) of every particle, from the NonbondedForce


def mm_environment(system: openmm.System, topology: app.Topology, ml_indices, spec, zone=None) -> MMEnvironment:
    """The embedding's static data, read once: MM charges (from the ORIGINAL system) and residue ids.

    Parameters
    ----------
    system : the full MM system (before :func:`mlmm_mm_system`), whose NonbondedForce holds the charges.
    topology : the matching topology; residues define the groups that enter the embedding whole.
    ml_indices : 0-based atom indices of the ML zone.
    spec : potentials.core.spec.SystemSpec (or its CouplingSpec); cutoff_nm and switch_width_nm are used.
    zone : the ML-zone mapping (:mod:`coupling.zones`), whose capped bonds may cross the boundary.
    """
    coupling = getattr(spec, "coupling", spec)
    check_selection(system, ml_indices, topology, cut_pairs=zone.cut_pairs() if zone is not None else ())
    residue = np.fromiter((a.residue.index for a in topology.atoms()), dtype=np.int64,
                          count=topology.getNumAtoms())
    return MMEnvironment(charges=particle_charges(system), residue=residue,
                         ml_indices=np.asarray(ml_indices, dtype=np.int64).reshape(-1),
                         cutoff=float(coupling.cutoff_nm), switch_width=float(coupling.switch_width_nm))

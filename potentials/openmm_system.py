"""Build the full-system OpenMM ``System`` of a prepared ML/MM system (``system.toml``).

The returned system is the plain MM description of every atom. ML-zone residues that have an MM template keep
their normal parameters (``coupling.mmsystem`` removes what the ML client owns). ML-zone residues that the force
field does not know (a ligand) get a template made on the fly by :class:`MLZoneTemplates`: Lennard-Jones
parameters only, zero charge and no bonded terms, so a ligand never needs MM parameters. Its LJ terms are what the
MM client uses for ML–MM van der Waals. ``[ml] lj = "gaff"`` (the default) types each atom as a force field would
(``potentials.lj_typing``): GAFF 1.81 hybridisation-aware types for heavy atoms and C–H hydrogens, and CHARMM's
small polar-H radius (Rmin/2 = 0.2245 Å, ε = 0.046 kcal/mol) for hydrogens on O and N, so that an ML hydroxyl or
ammonium H can donate a hydrogen bond to MM water (the aliphatic hc radius costs +168 kJ/mol at an H…O distance
of 0.185 nm) without falling onto an MM charge. ``lj = "element"`` is the older one-type-per-element table
(:data:`GAFF_LJ`, every H hc), kept so that old runs can be reproduced. ``[ml] lj_table`` entries override
either, per element. Templates keep their force-field parameters.

Units: positions nm, sigma nm, epsilon kJ/mol.
"""
from __future__ import annotations

import io
import logging
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import openmm
from ase.data import covalent_radii
from openmm import app, unit
from scipy.spatial import cKDTree

from potentials.atom_selection import is_geometric, select
from potentials.core.errors import SetupError
from potentials.core.spec import MMSpec, SystemSpec
from potentials.core.units import ANGSTROM_PER_NM, KJMOL_PER_KCALMOL
from potentials.lj_typing import TYPE_RMIN_EPS, assign_types, sigma_eps

log = logging.getLogger(__name__)

# GAFF 1.81 (AmberTools gaff.dat, NONBON section): Rmin/2 in Å and well depth in kcal/mol of one representative
# atom type per element (in brackets): the legacy lj = "element" table, and the fallback of lj = "gaff" for
# elements it has no type for. Every H is hc here, which forbids hydrogen bonds from polar ML hydrogens.
GAFF_LJ = {
    "H": (1.4870, 0.0157),   # hc
    "C": (1.9080, 0.1094),   # c3
    "N": (1.8240, 0.1700),   # n3
    "O": (1.7210, 0.2104),   # oh
    "F": (1.75, 0.061),      # f
    "P": (2.10, 0.20),       # p5
    "S": (2.00, 0.25),       # ss
    "Cl": (1.948, 0.265),    # cl
    "Br": (2.02, 0.420),     # br (Junmei 2010)
    "I": (2.15, 0.50),       # i  (Junmei 2010)
}
TYPE_PREFIX = "mlmm-"        # atom types and templates made here start with this
LJ_MODES = ("gaff", "element")   # [ml] lj: typed (potentials.lj_typing, default) | one type per element (legacy)


def element_lj_table(overrides: dict[str, Sequence[float]] | None = None) -> dict[str, tuple[float, float]]:
    """Element -> (sigma nm, epsilon kJ/mol): GAFF values (:data:`GAFF_LJ`) updated with ``overrides``
    (``[ml] lj_table`` of system.toml, already in nm and kJ/mol)."""
    table = {el: (2.0 * r_half / ANGSTROM_PER_NM / 2.0 ** (1.0 / 6.0), eps * KJMOL_PER_KCALMOL)
             for el, (r_half, eps) in GAFF_LJ.items()}
    for el, value in (overrides or {}).items():
        try:
            sigma, eps = (float(v) for v in value)
        except (TypeError, ValueError):
            raise SetupError(f"[ml] lj_table: {el} = {value!r}; expected [sigma_nm, epsilon_kjmol]") from None
        try:
            el = app.element.Element.getBySymbol(el).symbol      # normalises "CL" to "Cl"
        except KeyError:
            raise SetupError(f"[ml] lj_table: unknown element '{el}' (use symbols like C, Cl, Na)") from None
        if not (0.0 < sigma < 1.0 and eps >= 0.0):
            raise SetupError(f"[ml] lj_table: {el} = [{sigma}, {eps}]; sigma must be in (0, 1) nm, epsilon >= 0")
        table[el] = (sigma, eps)
    return table


def lj_override_elements(overrides: dict[str, Sequence[float]] | None) -> set[str]:
    """The element symbols of ``[ml] lj_table``, normalised ("CL" -> "Cl"); checked by :func:`element_lj_table`."""
    element_lj_table(overrides)            # raises SetupError on a bad entry
    return {app.element.Element.getBySymbol(el).symbol for el in (overrides or {})}


# ----------------------------------------------------------------------------------------------- input files
def read_structure(path: str | Path) -> tuple[app.Topology, np.ndarray]:
    """Read a PDB or PDBx/mmCIF file (by extension). Returns the topology (bonds from the file: standard residues,
    CONECT / struct_conn) and positions (n, 3) in nm."""
    path = Path(path)
    if not path.is_file():
        raise SetupError(f"structure file {path} not found")
    reader = app.PDBxFile if path.suffix.lower() in (".cif", ".mmcif", ".pdbx") else app.PDBFile
    try:
        data = reader(str(path))
    except Exception as exc:   # OpenMM's readers raise bare Exceptions/ValueErrors/KeyErrors on bad files
        raise SetupError(f"cannot read {path}: {exc}") from None
    if data.topology.getNumAtoms() == 0:
        raise SetupError(f"{path} contains no atoms")
    missing = [a for a in data.topology.atoms() if a.element is None]
    if missing:
        raise SetupError(f"{path}: atom {missing[0].name} of residue {missing[0].residue.id} {missing[0].residue.name}"
                         " has no element; fill in the element column (77-78 in PDB)")
    return data.topology, np.asarray(data.getPositions(asNumpy=True).value_in_unit(unit.nanometer), dtype=np.float64)


def infer_bonds(topology: app.Topology, positions: np.ndarray, residues: Iterable[app.topology.Residue],
                scale: float = 1.2) -> int:
    """Add covalent bonds inside each given residue that has none: atoms closer than ``scale`` times the sum of
    their covalent radii (ASE's table, Cordero 2008). Needs hydrogens to be present. Returns bonds added."""
    total = 0
    for res in residues:
        atoms = list(res.atoms())
        if len(atoms) < 2 or any(True for _ in res.internal_bonds()):
            continue
        x = positions[[a.index for a in atoms]]
        radii = np.array([covalent_radii[a.element.atomic_number] for a in atoms]) / ANGSTROM_PER_NM
        pairs = [(i, j) for i, j in sorted(cKDTree(x).query_pairs(scale * 2 * radii.max()))
                 if np.linalg.norm(x[i] - x[j]) < scale * (radii[i] + radii[j])]
        for i, j in pairs:
            topology.addBond(atoms[i], atoms[j])
        total += len(pairs)
        log.info("residue %s %s: no bonds in the file, inferred %d from covalent radii", res.id, res.name, len(pairs))
    return total


def open_forcefield(names: Sequence[str], root: Path | None = None) -> app.ForceField:
    """A ForceField from OpenMM names ("amber14-all.xml") or paths (relative to ``root``, e.g. the toml folder)."""
    files = []
    for name in names:
        local = Path(name) if root is None or Path(name).is_absolute() else Path(root) / name
        files.append(str(local) if local.is_file() else name)
    try:
        return app.ForceField(*files)
    except ValueError as exc:
        if "Could not locate file" in str(exc):
            bad = str(exc).split('"')[1] if '"' in str(exc) else str(exc)
            raise SetupError(f"force-field file '{bad}' not found (neither an OpenMM built-in like amber14-all.xml "
                             f"nor a file{' relative to ' + str(root) if root else ''})") from None
        raise SetupError(f"force field {', '.join(names)}: {exc}") from None
    except Exception as exc:   # XML syntax errors come as bare Exception
        raise SetupError(f"force field {', '.join(names)}: {exc}") from None


# ----------------------------------------------------------------------------------------------- templates
def _ff_template_names(forcefield: app.ForceField) -> set[str]:
    # ForceField has no public accessor for its residue templates; _templates is stable since OpenMM 7.
    return set(getattr(forcefield, "_templates", {}))


class MLZoneTemplates:
    """ForceField template generator for ML-zone residues without an MM template.

    A residue qualifies when all of its atoms are in the ML zone and its name is not one of the force field's own
    templates (a standard residue that fails to match is missing atoms: that must stay an error). Each atom gets
    an LJ type: with ``typing="gaff"`` from :func:`potentials.lj_typing.assign_types` (the residue's bonds and
    elements), with ``typing="element"`` its element's entry of ``lj_table``; elements in ``overrides`` (the user's
    ``[ml] lj_table``) always take ``lj_table``. Charge ``charge_per_atom`` (0 in the simulation; prepare uses a
    spread net charge only so that Modeller neutralises a charged ligand). No bonded parameters exist for these
    types, so no bonded term is created.

    Use with ``forcefield.registerTemplateGenerator(MLZoneTemplates(ml_indices, element_lj_table()))``.
    """

    def __init__(self, ml_indices: Iterable[int], lj_table: dict[str, tuple[float, float]],
                 charge_per_atom: float = 0.0, typing: str = "gaff", overrides: Iterable[str] = ()):
        if typing not in LJ_MODES:
            raise SetupError(f"[ml] lj = '{typing}'; choose one of {', '.join(LJ_MODES)}")
        self.ml = {int(i) for i in ml_indices}
        self.lj = lj_table
        self.charge_per_atom = float(charge_per_atom)
        self.typing = typing
        self.overrides = set(overrides)       # elements whose [ml] lj_table entry wins over the typing
        self.generated: list[str] = []        # names of the templates made, for logs and tests
        self.types: dict[int, str] = {}       # atom index -> LJ type given (for logs and tests)

    def __call__(self, forcefield: app.ForceField, residue: app.topology.Residue) -> bool:
        atoms = list(residue.atoms())
        if not atoms or any(a.index not in self.ml or a.element is None for a in atoms):
            return False
        if residue.name in _ff_template_names(forcefield):
            return False
        params = self._parameters(residue, atoms)
        name = f"{TYPE_PREFIX}{residue.name}-{len(self.generated)}"
        forcefield.loadFile(io.StringIO(self._ffxml(forcefield, residue, atoms, name, params)))
        self.generated.append(name)
        log.info("residue %s %s (ML, no MM template): LJ types %s", residue.id, residue.name,
                 " ".join(f"{a.name}:{t}" for a, (t, _, _) in zip(atoms, params)))
        return True

    def _parameters(self, residue, atoms) -> list[tuple[str, float, float]]:
        """(type, sigma nm, epsilon kJ/mol) per atom: the typing, then [ml] lj_table overrides by element."""
        elements = [a.element.symbol for a in atoms]
        if self.typing == "gaff":
            local = {a.index: i for i, a in enumerate(atoms)}
            types = assign_types(elements, [(local[a.index], local[b.index]) for a, b in residue.internal_bonds()])
        else:
            types = list(elements)
        out, missing = [], []
        for atom, el, t in zip(atoms, elements, types):
            if el in self.overrides or (t not in TYPE_RMIN_EPS and el in self.lj):
                t = el
                out.append((t, *self.lj[el]))
            elif t in TYPE_RMIN_EPS:
                out.append((t, *sigma_eps(t)))
            else:
                missing.append(el)
            self.types[atom.index] = t
        if missing:
            missing = sorted(set(missing))
            raise SetupError(f"residue {residue.id} {residue.name}: no Lennard-Jones parameters for element(s) "
                             f"{', '.join(missing)}; add them under [ml] lj_table = {{ {missing[0]} = [sigma_nm, "
                             "epsilon_kjmol] }} in system.toml")
        if self.typing == "element" and any({a.element.symbol, b.element.symbol} in ({"H", "O"}, {"H", "N"})
                                            for a, b in residue.internal_bonds()):
            log.warning("residue %s %s: [ml] lj = \"element\" gives its O-H/N-H hydrogens the aliphatic hc radius, "
                        "which forbids hydrogen bonds to MM atoms; use lj = \"gaff\"", residue.id, residue.name)
        return out

    def _ffxml(self, forcefield: app.ForceField, residue, atoms, name: str, params) -> str:
        root = ET.Element("ForceField")
        types = ET.SubElement(root, "AtomTypes")
        used = sorted({(t, a.element.symbol) for a, (t, _, _) in zip(atoms, params)})
        for t, s in used:          # type names are unique per template: no clash between generated templates
            mass = app.element.Element.getBySymbol(s).mass.value_in_unit(unit.dalton)
            ET.SubElement(types, "Type", {"name": f"{name}-{t}", "class": f"{name}-{t}", "element": s,
                                          "mass": repr(mass)})
        res = ET.SubElement(ET.SubElement(root, "Residues"), "Residue", name=name)
        local = {a.index: i for i, a in enumerate(atoms)}
        for i, (a, (t, _, _)) in enumerate(zip(atoms, params)):   # names unique; matching uses elements + bonds
            ET.SubElement(res, "Atom", name=f"A{i}", type=f"{name}-{t}", charge=repr(self.charge_per_atom))
        for a, b in residue.internal_bonds():
            ET.SubElement(res, "Bond", {"from": str(local[a.index]), "to": str(local[b.index])})
        for a, b in residue.external_bonds():
            ET.SubElement(res, "ExternalBond", {"from": str(local[a.index] if a.index in local else local[b.index])})
        # the 1-4 scales must equal those of the force field's own <NonbondedForce> for OpenMM to merge the blocks
        existing = [g for g in forcefield.getGenerators() if isinstance(g, app.forcefield.NonbondedGenerator)]
        c14, lj14 = (existing[0].coulomb14scale, existing[0].lj14scale) if existing else (1 / 1.2, 0.5)
        nb = ET.SubElement(root, "NonbondedForce", coulomb14scale=repr(c14), lj14scale=repr(lj14))
        ET.SubElement(nb, "UseAttributeFromResidue", name="charge")
        for t, sigma, eps in sorted(set(params)):
            ET.SubElement(nb, "Atom", type=f"{name}-{t}", sigma=repr(sigma), epsilon=repr(eps))
        return ET.tostring(root, encoding="unicode")


def check_templates(forcefield: app.ForceField, topology: app.Topology, ml_indices: Iterable[int],
                    ff_names: Sequence[str]) -> list[app.topology.Residue]:
    """Residues without a template in ``forcefield``: return those :class:`MLZoneTemplates` will handle (wholly in
    the ML zone), raise SetupError for the first one it will not (outside or partly outside the ML zone, or a known
    residue that does not match its template, i.e. missing atoms).

    Call before registering the generator: afterwards a generated template could also match an identical molecule
    outside the ML zone and silently give it LJ-only parameters.
    """
    ml = {int(i) for i in ml_indices}
    known = _ff_template_names(forcefield)
    ffs = ", ".join(ff_names)
    handled, bad = [], []
    for res in forcefield.getUnmatchedResidues(topology):
        inside = [a.index in ml for a in res.atoms()]
        (handled if all(inside) and res.name not in known else bad).append((res, inside))
    if not bad:
        return [r for r, _ in handled]
    res, inside = bad[0]
    where = f"residue {res.id} {res.name} (chain {res.chain.id})"
    more = f" ({len(bad)} residues in all: {', '.join(f'{r.id} {r.name}' for r, _ in bad[:6])}" \
           f"{', ...' if len(bad) > 6 else ''})" if len(bad) > 1 else ""
    if res.name in known:
        try:   # OpenMM's own diagnosis ("...similar to ALA, but it is missing 5 hydrogen atoms")
            why = " ".join(app.forcefield._findMatchErrors(forcefield, res).split())
        except Exception:
            why = "its atoms or bonds differ from the template"
        raise SetupError(f"{where} does not match the {res.name} template in {ffs}: {why}{more}; add the missing "
                         "atoms (mlmm prepare does it unless --no-fix)")
    if any(inside):
        raise SetupError(f"{where} has no template in {ffs} and is only partly in the ML zone; select the whole "
                         f"residue (--ml \"resname {res.name}\"){more}")
    raise SetupError(f"{where} has no template in {ffs}; put it in the ML zone (--ml \"resname {res.name}\") or add "
                     f"a force-field XML (--forcefield ... your.xml){more}")


# ----------------------------------------------------------------------------------------------- system
NONBONDED_METHODS = {"PME": app.PME, "Ewald": app.Ewald, "LJPME": app.LJPME, "CutoffPeriodic": app.CutoffPeriodic,
                     "CutoffNonPeriodic": app.CutoffNonPeriodic, "NoCutoff": app.NoCutoff}
PERIODIC_METHODS = {"PME", "Ewald", "LJPME", "CutoffPeriodic"}


def half_min_width(box: np.ndarray) -> float:
    """Half the shortest distance between opposite faces of the cell (box vectors as rows, nm)."""
    a, b, c = np.asarray(box, dtype=np.float64)
    vol = abs(np.linalg.det(np.array([a, b, c])))
    return 0.5 * min(vol / np.linalg.norm(np.cross(b, c)), vol / np.linalg.norm(np.cross(c, a)),
                     vol / np.linalg.norm(np.cross(a, b)))


def create_system(forcefield: app.ForceField, topology: app.Topology, mm: MMSpec, periodic: bool) -> openmm.System:
    """``forcefield.createSystem`` with the [mm] settings: no constraints (i-PI integrates them as free atoms),
    flexible water unless ``rigid_water``, no CMMotionRemover (i-PI owns the dynamics)."""
    if mm.nonbonded_method not in NONBONDED_METHODS:
        raise SetupError(f"[mm] nonbonded_method = '{mm.nonbonded_method}'; choose one of {sorted(NONBONDED_METHODS)}")
    if (mm.nonbonded_method in PERIODIC_METHODS) != periodic:
        raise SetupError(f"[mm] nonbonded_method = '{mm.nonbonded_method}' does not fit [structure] periodic = "
                         f"{str(periodic).lower()}; use PME for a box, NoCutoff or CutoffNonPeriodic for a cluster")
    kwargs = dict(nonbondedMethod=NONBONDED_METHODS[mm.nonbonded_method], rigidWater=mm.rigid_water,
                  constraints=None, removeCMMotion=False)
    if mm.nonbonded_method != "NoCutoff":
        kwargs["nonbondedCutoff"] = mm.cutoff_nm * unit.nanometer
        box = topology.getPeriodicBoxVectors()
        if periodic and box is not None:
            limit = half_min_width(box.value_in_unit(unit.nanometer))
            if mm.cutoff_nm >= limit:
                raise SetupError(f"[mm] cutoff_nm = {mm.cutoff_nm} must be below half the shortest box width "
                                 f"({limit:.3f} nm); use a bigger box or a smaller cutoff")
    if mm.nonbonded_method in ("PME", "Ewald", "LJPME"):
        kwargs["ewaldErrorTolerance"] = mm.ewald_tolerance
    if mm.hydrogen_mass_amu is not None:
        kwargs["hydrogenMass"] = mm.hydrogen_mass_amu * unit.amu
    try:
        return forcefield.createSystem(topology, **kwargs)
    except SetupError:
        raise
    except (ValueError, KeyError) as exc:
        msg = " ".join(str(exc).split())
        if TYPE_PREFIX in msg:
            msg += " (LJ-only ML templates work with force fields whose nonbonded terms are one NonbondedForce, " \
                   "e.g. Amber)"
        raise SetupError(f"OpenMM could not build the system: {msg}") from None


def ml_indices_of(spec: SystemSpec, topology: app.Topology) -> np.ndarray:
    """The ML-zone atom indices of a spec: ``[ml] indices``, checked against ``[ml] selection`` when both are
    given (resolving the selection when only it is given). A selection with ``within`` depends on positions: it
    was resolved by ``mlmm prepare``, and the indices it wrote are the zone."""
    n = topology.getNumAtoms()
    idx = np.unique(np.asarray(spec.ml.indices, dtype=np.int64))
    if len(idx) and (idx[0] < 0 or idx[-1] >= n):
        raise SetupError(f"[ml] indices run from {idx[0]} to {idx[-1]} but {spec.structure.file} has {n} atoms "
                         "(0-based); re-run `mlmm prepare`")
    if spec.ml.selection and is_geometric(spec.ml.selection):
        if len(idx) == 0:                      # resolved by `mlmm prepare` on the structure it wrote
            raise SetupError(f"[ml] selection '{spec.ml.selection}' uses 'within' (positions): give [ml] indices "
                             "too, as `mlmm prepare` writes them")
        return idx
    if spec.ml.selection:
        sel = select(topology, spec.ml.selection)
        if len(idx) == 0:
            return sel
        if not np.array_equal(idx, sel):
            raise SetupError(f"[ml] indices ({len(idx)} atoms) do not match [ml] selection '{spec.ml.selection}' "
                             f"({len(sel)} atoms) in {spec.structure.file}; re-run `mlmm prepare` or fix one of them")
    return idx


def load_system(spec: SystemSpec) -> tuple[app.Topology, openmm.System, np.ndarray]:
    """Rebuild (topology, full-system OpenMM System, positions nm (n, 3)) from a system.toml spec.

    The topology carries the box of ``[structure] box_nm`` (periodic) or none. ML-zone residues without an MM
    template get LJ-only templates (see :class:`MLZoneTemplates`); any other template-less residue is an error.
    A spec with ``[ml] selection`` but no ``indices`` gets its indices filled in (the spec is modified).
    """
    if spec.ml.lj not in LJ_MODES:
        raise SetupError(f"[ml] lj = '{spec.ml.lj}'; choose \"gaff\" (typed, default) or \"element\" (one type "
                         "per element, every H aliphatic)")
    topology, positions = read_structure(spec.structure_path)
    ml = ml_indices_of(spec, topology)
    if spec.ml.selection and not spec.ml.indices:
        spec.ml.indices = ml.tolist()        # a hand-written toml may give only the selection; clients read indices
    if spec.structure.periodic:
        box = spec.structure.box_nm
        if box is None:
            vectors = topology.getPeriodicBoxVectors()
            if vectors is None:
                raise SetupError(f"[structure] periodic = true but neither box_nm nor a CRYST1 record in "
                                 f"{spec.structure.file} gives the box; set box_nm or periodic = false")
            box = vectors.value_in_unit(unit.nanometer)
        box = np.asarray(box, dtype=np.float64)
        if box.shape != (3, 3) or abs(np.linalg.det(box)) < 1e-6:
            raise SetupError(f"[structure] box_nm = {box.tolist()}: expected 3 box vectors (rows, nm) with volume > 0")
        topology.setPeriodicBoxVectors([openmm.Vec3(*row) for row in box] * unit.nanometer)
    else:
        topology.setPeriodicBoxVectors(None)
    forcefield = open_forcefield(spec.structure.forcefield, spec.root)
    free = check_templates(forcefield, topology, ml, spec.structure.forcefield)
    infer_bonds(topology, positions, free)     # the generated templates need the ligand's bonds
    generator = MLZoneTemplates(ml, element_lj_table(spec.ml.lj_table), typing=spec.ml.lj,
                                overrides=lj_override_elements(spec.ml.lj_table))
    forcefield.registerTemplateGenerator(generator)
    system = create_system(forcefield, topology, spec.mm, spec.structure.periodic)
    if system.getNumParticles() != len(positions):
        raise SetupError(f"the force field added particles (virtual sites?): {system.getNumParticles()} particles "
                         f"for {len(positions)} atoms; use a water model without extra sites (tip3p)")
    return topology, system, positions

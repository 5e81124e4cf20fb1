"""Building the full OpenMM system from system.toml (potentials/openmm_system.py)."""
import functools
import shutil
from io import StringIO
from pathlib import Path

import numpy as np
import openmm
import pytest
from openmm import app, unit

from potentials.core.errors import SetupError
from potentials.core.spec import MLSpec, MMSpec, StructureSpec, SystemSpec
from potentials.lj_typing import sigma_eps
from potentials.openmm_system import (MLZoneTemplates, element_lj_table, infer_bonds, load_system, open_forcefield,
                                      read_structure)

EXAMPLES = Path(__file__).resolve().parents[2] / "inputs" / "examples"
PREPARED = EXAMPLES / "methanol" / "prepared" / "system.toml"
BONDED = (openmm.HarmonicBondForce, openmm.HarmonicAngleForce, openmm.PeriodicTorsionForce, openmm.RBTorsionForce,
          openmm.CMAPTorsionForce, openmm.CustomBondForce, openmm.CustomAngleForce, openmm.CustomTorsionForce)


def bonded_terms_with(system: openmm.System, atoms: set[int]) -> list[str]:
    """Every bonded term (any bonded force type) that touches one of ``atoms``."""
    found = []
    for force in system.getForces():
        if isinstance(force, (openmm.HarmonicBondForce, openmm.CustomBondForce)):
            terms = [force.getBondParameters(k)[:2] for k in range(force.getNumBonds())]
        elif isinstance(force, (openmm.HarmonicAngleForce, openmm.CustomAngleForce)):
            terms = [force.getAngleParameters(k)[:3] for k in range(force.getNumAngles())]
        elif isinstance(force, (openmm.PeriodicTorsionForce, openmm.RBTorsionForce, openmm.CustomTorsionForce)):
            terms = [force.getTorsionParameters(k)[:4] for k in range(force.getNumTorsions())]
        elif isinstance(force, openmm.CMAPTorsionForce):
            terms = [force.getTorsionParameters(k)[1:] for k in range(force.getNumTorsions())]
        else:
            continue
        found += [f"{type(force).__name__}{tuple(t)}" for t in terms if atoms & set(t)]
    return found


def nonbonded(system):
    return next(f for f in system.getForces() if isinstance(f, openmm.NonbondedForce))


def params(system, i):
    q, s, e = nonbonded(system).getParticleParameters(i)
    return q.value_in_unit(unit.elementary_charge), s.value_in_unit(unit.nanometer), e.value_in_unit(
        unit.kilojoule_per_mole)


def cluster_spec(tmp_path, pdb_text: str, selection="resname MOL", **ml) -> SystemSpec:
    (tmp_path / "s.pdb").write_text(pdb_text)
    return SystemSpec(structure=StructureSpec(file="s.pdb", periodic=False),
                      ml=MLSpec(selection=selection, **ml), mm=MMSpec(nonbonded_method="NoCutoff"),
                      root=tmp_path)


@functools.lru_cache
def methanol_with_waters(n_waters: int = 6, no_conect: bool = False) -> str:
    """Methanol + the n nearest waters of the shipped prepared system, as PDB text (no box)."""
    pdb = app.PDBFile(str(PREPARED.parent / "system.pdb"))
    x = pdb.getPositions(asNumpy=True).value_in_unit(unit.nanometer)
    waters = [r for r in pdb.topology.residues() if r.name == "HOH"]
    d = [np.linalg.norm(x[[a.index for a in r.atoms()]] - x[:6].mean(0), axis=1).min() for r in waters]
    keep = [r for _, r in sorted(zip(d, waters), key=lambda t: t[0])[:n_waters]]
    modeller = app.Modeller(pdb.topology, pdb.positions)
    modeller.delete([r for r in waters if r not in keep])
    modeller.topology.setPeriodicBoxVectors(None)
    out = StringIO()
    app.PDBFile.writeFile(modeller.topology, modeller.positions, out, keepIds=True)
    text = out.getvalue()
    if no_conect:
        text = "\n".join(line for line in text.splitlines() if not line.startswith("CONECT"))
    return text


def test_gaff_table():
    table = element_lj_table()
    sigma, eps = table["C"]                       # GAFF c3: Rmin/2 = 1.9080 A, eps = 0.1094 kcal/mol
    assert sigma == pytest.approx(2 * 0.19080 / 2 ** (1 / 6)) and eps == pytest.approx(0.1094 * 4.184)
    assert set(table) == {"H", "C", "N", "O", "F", "P", "S", "Cl", "Br", "I"}
    table = element_lj_table({"CL": [0.4, 1.0], "Se": [0.35, 1.2]})
    assert table["Cl"] == (0.4, 1.0) and table["Se"] == (0.35, 1.2)
    with pytest.raises(SetupError, match="unknown element 'Xx'"):
        element_lj_table({"Xx": [0.3, 0.1]})
    with pytest.raises(SetupError, match="sigma must be in"):
        element_lj_table({"C": [3.4, 0.1]})           # Angstrom by mistake
    with pytest.raises(SetupError, match=r"expected \[sigma_nm, epsilon_kjmol\]"):
        element_lj_table({"C": 0.34})


def test_prepared_example():
    """The shipped example: a full system with an LJ-only, uncharged, unbonded ML zone."""
    spec = SystemSpec.load(PREPARED)
    top, system, pos = load_system(spec)
    pdb_atoms = sum(line.startswith(("ATOM", "HETATM")) for line in (PREPARED.parent / "system.pdb").open())
    assert system.getNumParticles() == top.getNumAtoms() == len(pos) == pdb_atoms
    assert 2000 < pdb_atoms < 3500
    ml = spec.ml.indices
    assert ml == list(range(6)) and spec.ml.charge == 0
    expected = dict(zip(["C1", "O1", "H11", "H12", "H13", "HO1"], ["c3", "oh", "h1", "h1", "h1", "hgp1"]))
    atoms = list(top.atoms())
    for i in ml:                                  # lj = "gaff": typed (potentials/lj_typing.py)
        q, s, e = params(system, i)
        assert q == 0.0 and (s, e) == pytest.approx(sigma_eps(expected[atoms[i].name]))
    assert bonded_terms_with(system, set(ml)) == []
    assert len(bonded_terms_with(system, {6, 7, 8})) == 3        # a water: 2 bonds + 1 angle (flexible)
    assert system.getNumConstraints() == 0
    assert not any(isinstance(f, openmm.CMMotionRemover) for f in system.getForces())
    assert nonbonded(system).getNonbondedMethod() == openmm.NonbondedForce.PME
    box = np.array(spec.structure.box_nm)
    assert np.allclose(box, np.diag(np.diag(box))) and 2.9 <= box[0, 0] <= 3.2
    assert np.allclose(system.getDefaultPeriodicBoxVectors()[0].value_in_unit(unit.nanometer), box[0])
    q = np.array([params(system, i)[0] for i in range(system.getNumParticles())])
    assert abs(q.sum()) < 1e-6


def test_ml_mm_interaction_is_lennard_jones_only(tmp_path):
    """Independent reference: E(cluster) - E(ligand moved 1000 nm away) = sum of Lorentz-Berthelot LJ pair
    terms between ML and MM atoms (the ligand has no MM charge, so no Coulomb), and the ligand's own energy
    does not depend on where it is."""
    spec = cluster_spec(tmp_path, methanol_with_waters(8))
    top, system, pos = load_system(spec)
    ml = np.arange(6)                                  # methanol comes first
    context = openmm.Context(system, openmm.VerletIntegrator(1e-3), openmm.Platform.getPlatformByName("Reference"))

    def energy(x):
        context.setPositions(x)
        return context.getState(getEnergy=True).getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)

    far = pos.copy()
    far[ml] += 1000.0
    mm = np.setdiff1d(np.arange(len(pos)), ml)
    p = np.array([params(system, i) for i in range(len(pos))])
    r = np.linalg.norm(pos[ml][:, None] - pos[mm][None], axis=-1)
    sig = 0.5 * (p[ml, 1][:, None] + p[mm, 1][None])
    eps = np.sqrt(p[ml, 2][:, None] * p[mm, 2][None])
    lj = np.sum(4 * eps * ((sig / r) ** 12 - (sig / r) ** 6))
    assert abs(lj) > 1.0                               # the waters touch the ligand: a real test
    assert energy(pos) - energy(far) == pytest.approx(lj, rel=1e-9, abs=1e-9)
    shifted = pos.copy()
    shifted[ml] += 1000.0
    shifted[mm] += 1000.0
    assert energy(shifted) == pytest.approx(energy(pos), rel=1e-9)


def test_bonds_inferred_without_conect(tmp_path):
    text = methanol_with_waters(2, no_conect=True)
    assert "CONECT" not in text
    spec = cluster_spec(tmp_path, text)
    top, system, _ = load_system(spec)
    bonds = sorted(tuple(sorted((a.name, b.name))) for a, b in top.bonds() if a.residue.name == "MOL")
    assert bonds == [("C1", "H11"), ("C1", "H12"), ("C1", "H13"), ("C1", "O1"), ("HO1", "O1")]
    assert bonded_terms_with(system, set(range(6))) == []


def test_template_less_residue_outside_ml(tmp_path):
    text = methanol_with_waters(2)
    with pytest.raises(SetupError, match=r"residue 1 MOL \(chain A\) has no template in amber14-all.xml, "
                                         r"amber14/tip3p.xml; put it in the ML zone \(--ml \"resname MOL\"\)"):
        load_system(cluster_spec(tmp_path, text, selection="resname HOH"))
    with pytest.raises(SetupError, match="only partly in the ML zone"):
        load_system(cluster_spec(tmp_path, text, selection="resname MOL and not element H"))


def test_generated_template_not_reused_outside_ml(tmp_path):
    """Two identical ligands, one in the ML zone: the other must not silently get the LJ-only template."""
    mol = app.PDBFile(str(EXAMPLES / "methanol" / "input.pdb"))
    modeller = app.Modeller(mol.topology, mol.positions)
    modeller.add(mol.topology, [p + openmm.Vec3(1.0, 0, 0) * unit.nanometer for p in mol.positions])
    out = StringIO()
    app.PDBFile.writeFile(modeller.topology, modeller.positions, out)
    with pytest.raises(SetupError, match="residue 1 MOL .*has no template"):
        load_system(cluster_spec(tmp_path, out.getvalue(), selection="index 0-5"))
    top, system, _ = load_system(cluster_spec(tmp_path, out.getvalue(), selection="index 0-11"))
    assert system.getNumParticles() == 12


def test_known_residue_with_missing_atoms(tmp_path):
    text = "\n".join(line for line in (EXAMPLES / "alanine-dipeptide" / "input.pdb").read_text().splitlines()
                     if not (line.startswith("ATOM") and line[12:16].strip() == "HB1"))
    with pytest.raises(SetupError, match=r"residue 2 ALA \(chain A\) does not match the ALA template.*missing 1 H"):
        load_system(cluster_spec(tmp_path, text, selection="chain A"))


def test_bad_specs(tmp_path):
    text = methanol_with_waters(2)
    spec = cluster_spec(tmp_path, text, indices=[0, 1, 2])
    with pytest.raises(SetupError, match=r"\[ml\] indices \(3 atoms\) do not match \[ml\] selection 'resname MOL' "
                                         r"\(6 atoms\)"):
        load_system(spec)
    spec = cluster_spec(tmp_path, text, indices=[0, 99])
    with pytest.raises(SetupError, match="indices run from 0 to 99 but s.pdb has 12 atoms"):
        load_system(spec)
    spec = cluster_spec(tmp_path, text)
    spec.structure.forcefield = ["amber14-all.xml", "missing.xml"]
    with pytest.raises(SetupError, match="force-field file 'missing.xml' not found"):
        load_system(spec)
    spec = cluster_spec(tmp_path, text)
    spec.mm.nonbonded_method = "PME"
    with pytest.raises(SetupError, match="does not fit \\[structure\\] periodic = false"):
        load_system(spec)
    spec = cluster_spec(tmp_path, text)
    spec.structure.periodic = True
    with pytest.raises(SetupError, match="neither box_nm nor a CRYST1"):
        load_system(spec)
    spec = cluster_spec(tmp_path, text, lj_table={"C": [0.3, -1.0]})
    with pytest.raises(SetupError, match="epsilon >= 0"):
        load_system(spec)
    spec = cluster_spec(tmp_path, text)
    spec.structure.file = "nothere.pdb"
    with pytest.raises(SetupError, match="structure file .*nothere.pdb not found"):
        load_system(spec)


def test_forcefield_file_relative_to_toml(tmp_path):
    """A local force-field XML is found relative to the system.toml folder, wherever the process runs."""
    data = Path(app.__file__).parent / "data" / "amber14" / "tip3p.xml"
    shutil.copy(data, tmp_path / "water.xml")
    spec = cluster_spec(tmp_path, methanol_with_waters(2))
    spec.structure.forcefield = ["amber14-all.xml", "water.xml"]
    _, system, _ = load_system(spec)
    assert system.getNumParticles() == 12


def test_generator_declines_known_residue_names():
    """A standard residue name is never re-parameterised as LJ-only, even when it is in the ML zone."""
    top, pos = read_structure(EXAMPLES / "alanine-dipeptide" / "input.pdb")
    ff = open_forcefield(["amber14-all.xml"])
    generator = MLZoneTemplates(range(22), element_lj_table())
    ala = list(top.residues())[1]
    assert generator(ff, ala) is False and generator.generated == []
    assert infer_bonds(top, pos, top.residues()) == 0          # residues with bonds are left alone

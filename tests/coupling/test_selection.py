"""ML-zone selection grammar and the covalent-boundary check (coupling/selection.py)."""
from pathlib import Path

import mdtraj
import numpy as np
import pytest
from openmm import app

from coupling.selection import check_boundary, cut_bonds, select
from potentials.core.errors import SetupError

EXAMPLES = Path(__file__).resolve().parents[2] / "inputs" / "examples"


@pytest.fixture(scope="module")
def topology() -> app.Topology:
    """ACE-ALA-NME (chain A, residues 1-3, atoms 0-21) + methanol (chain B, residue 1, atoms 22-27)."""
    pep = app.PDBFile(str(EXAMPLES / "alanine-dipeptide" / "input.pdb"))
    mol = app.PDBFile(str(EXAMPLES / "methanol" / "input.pdb"))
    modeller = app.Modeller(pep.topology, pep.positions)
    modeller.add(mol.topology, mol.positions)
    top = modeller.topology
    list(top.chains())[1].id = "B"
    assert top.getNumAtoms() == 28
    return top


def names(top, idx):
    atoms = list(top.atoms())
    return [f"{atoms[i].residue.name}:{atoms[i].name}" for i in idx]


def test_resname_resid_index_name_chain_element(topology):
    assert select(topology, "resname MOL").tolist() == list(range(22, 28))
    assert select(topology, "resname ACE NME").tolist() == list(range(0, 6)) + list(range(16, 22))
    # resid is the PDB residue number: 1 is ACE in chain A *and* MOL in chain B
    assert select(topology, "resid 1").tolist() == list(range(0, 6)) + list(range(22, 28))
    assert select(topology, "resid 2-3").tolist() == list(range(6, 22))
    assert select(topology, "resid 2 3").tolist() == select(topology, "resid 2-3").tolist()
    assert select(topology, "index 0-2 25").tolist() == [0, 1, 2, 25]
    assert names(topology, select(topology, "name CA CB")) == ["ALA:CA", "ALA:CB"]
    assert select(topology, "chain B").tolist() == list(range(22, 28))
    assert select(topology, "element o").tolist() == select(topology, "element O").tolist()
    assert names(topology, select(topology, "element O")) == ["ACE:O", "ALA:O", "MOL:O1"]


def test_operators_and_precedence(topology):
    assert select(topology, "resid 1 and chain A").tolist() == list(range(0, 6))
    assert select(topology, "resid 1 AND NOT chain A").tolist() == list(range(22, 28))
    # not binds tighter than and, and tighter than or
    a = select(topology, "resname MOL or resname ALA and element C")
    b = select(topology, "resname MOL or (resname ALA and element C)")
    c = select(topology, "(resname MOL or resname ALA) and element C")
    assert a.tolist() == b.tolist() != c.tolist()
    assert names(topology, c) == ["ALA:CA", "ALA:CB", "ALA:C", "MOL:C1"]
    assert select(topology, "not not resname MOL").tolist() == list(range(22, 28))
    assert select(topology, "((chain B))").tolist() == list(range(22, 28))
    every = select(topology, "resname MOL or not resname MOL")
    assert every.tolist() == list(range(28)) and every.dtype == np.int64


@pytest.mark.parametrize("ours, theirs", [
    ("resname ALA and element C", "resname ALA and element C"),
    ("name CA or name O1 or index 3", "name CA or name O1 or index 3"),
    ("not element H and not resname MOL", "not element H and not resname MOL"),
    ("index 5-9 and (name N or name C)", "(index 5 to 9) and (name N or name C)"),
])
def test_agrees_with_mdtraj(topology, ours, theirs):
    """An independent implementation of the same keywords gives the same atoms."""
    assert select(topology, ours).tolist() == mdtraj.Topology.from_openmm(topology).select(theirs).tolist()


@pytest.mark.parametrize("expr, token", [
    ("resnam MOL", "unknown keyword 'resnam'"),
    ("resname", "keyword 'resname' needs at least one value"),
    ("resname MOL and", "ends too early"),
    ("(resname MOL", "missing ')'"),
    ("resname MOL)", "unexpected token ')'"),
    ("resid x1", "invalid residue number 'x1'"),
    ("resid 5-3", "empty range '5-3'"),
    ("index 3.5", "invalid atom index '3.5'"),
    ("index 0-28", "out of range: the system has 28 atoms"),
    ("and resname MOL", "unknown keyword 'and'"),
])
def test_malformed(topology, expr, token):
    with pytest.raises(SetupError, match="selection") as err:
        select(topology, expr)
    assert token in str(err.value) and "\n" not in str(err.value)


def test_empty(topology):
    with pytest.raises(SetupError, match=r"'resname XYZ' matched no atoms; residue names present: ACE, ALA, MOL, NME"):
        select(topology, "resname XYZ")
    with pytest.raises(SetupError, match="empty selection"):
        select(topology, "   ")


def test_boundary(topology):
    check_boundary(topology, select(topology, "chain A"))          # whole molecules: fine
    check_boundary(topology, select(topology, "resname MOL"))
    cut = cut_bonds(topology, select(topology, "resname ALA"))
    assert [(a.name, a.residue.name, b.name, b.residue.name) for a, b in cut] == \
        [("N", "ALA", "C", "ACE"), ("C", "ALA", "N", "NME")]           # (ML atom, MM atom)
    with pytest.raises(SetupError) as err:
        check_boundary(topology, select(topology, "resname ALA"))
    msg = str(err.value)
    assert "cuts 2 covalent bond(s)" in msg and "N (ALA 2, chain A, atom 6) - C (ACE 1, chain A, atom 4)" in msg
    assert "link-atoms" in msg and "whole molecules" in msg
    # inside a residue: selecting methanol's C and O cuts the four X-H bonds
    assert len(cut_bonds(topology, select(topology, "resname MOL and not element H"))) == 4


@pytest.fixture(scope="module")
def solvated():
    """Methanol in a periodic TIP3P box (Modeller), topology + positions (nm) + box (nm)."""
    from openmm import unit
    mol = app.PDBFile(str(EXAMPLES / "methanol" / "input.pdb"))
    ff = app.ForceField("amber14-all.xml", "amber14/tip3p.xml", str(EXAMPLES.parent / "forcefields" / "solutes.xml"))
    modeller = app.Modeller(mol.topology, mol.positions)
    modeller.addSolvent(ff, padding=0.6 * unit.nanometer)
    pos = np.asarray(modeller.positions.value_in_unit(unit.nanometer))
    box = np.asarray(modeller.topology.getPeriodicBoxVectors().value_in_unit(unit.nanometer))
    return modeller.topology, pos, box


@pytest.mark.parametrize("periodic", [False, True])
def test_within_and_byres_agree_with_mdtraj(solvated, periodic):
    top, pos, box = solvated
    traj = mdtraj.Trajectory(pos[None], mdtraj.Topology.from_openmm(top))
    if periodic:
        traj.unitcell_vectors = box[None]
    query = select(top, "resname MOL and element O")
    for cutoff in (0.3, 0.5):
        theirs = mdtraj.compute_neighbors(traj, cutoff, query, periodic=periodic)[0]
        ours = select(top, f"within {cutoff} of (resname MOL and element O)", pos, box if periodic else None)
        assert sorted(set(ours) - set(query)) == sorted(theirs)
        assert set(query) <= set(ours)
        assert np.array_equal(ours, select(top, f"within {cutoff * 10:g}A of (resname MOL and element O)", pos,
                                           box if periodic else None))
    # byres: whole residues; waters whose oxygen lies within 0.45 nm of methanol's O (unrelaxed solvent: no closer)
    shell = select(top, "byres (resname HOH and element O and within 0.45 of (resname MOL and element O))", pos, box)
    atoms = list(top.atoms())
    residues = {atoms[i].residue for i in shell}
    assert residues and len(shell) == 3 * len(residues) and all(r.name == "HOH" for r in residues)
    # the atom nearest the box edge: its neighbours across the boundary count only with the box (minimum image)
    edge = int(np.argmin(pos[:, 0]))
    ours = select(top, f"within 0.4 of index {edge}", pos, box if periodic else None)
    theirs = mdtraj.compute_neighbors(traj, 0.4, [edge], periodic=periodic)[0]
    assert sorted(set(ours) - {edge}) == sorted(theirs)
    if periodic:
        assert len(ours) > len(select(top, f"within 0.4 of index {edge}", pos))


@pytest.mark.parametrize("expr, message", [
    ("within 0.3 of resname MOL", "needs the atom positions"),
    ("within of resname MOL", "'within' needs a distance"),
    ("within 0.3 resname MOL", "expected 'of'"),
    ("within 3pm of resname MOL", "'within' needs a distance"),
])
def test_within_errors(solvated, expr, message):
    top, pos, box = solvated
    with pytest.raises(SetupError, match=message):
        select(top, expr, None if "positions" in message else pos)


def test_pocket_waters_of_the_dhfr_tutorial(tmp_path):
    """The README's DHFR pocket-water zone by distance picks the three waters hydrogen-bonded to Asp27 (O within
    0.3 nm of OD1/OD2; the next water is at 0.37 nm), the atoms the index form of the tutorial names."""
    import gzip
    import shutil

    from openmm import unit
    plain = tmp_path / "dhfr.pdb"
    with gzip.open(EXAMPLES / "dhfr" / "dhfr_jac.pdb.gz", "rb") as fin, open(plain, "wb") as fout:
        shutil.copyfileobj(fin, fout)
    pdb = app.PDBFile(str(plain))
    pos = np.asarray(pdb.positions.value_in_unit(unit.nanometer))
    box = np.asarray(pdb.topology.getPeriodicBoxVectors().value_in_unit(unit.nanometer))
    side = "resid 27 and resname ASP and name CB HB2 HB3 CG OD1 OD2"
    by_distance = select(pdb.topology, f"({side}) or byres (resname HOH and name O and within 0.3 of "
                                       "(resid 27 and resname ASP and name OD1 OD2))", pos, box)
    by_index = select(pdb.topology, f"({side}) or index 10937-10939 10946-10948 11042-11044")
    assert np.array_equal(by_distance, by_index) and len(by_index) == 15
    readme = (EXAMPLES.parents[1] / "README.md").read_text()     # the tutorial names this very selection
    assert (f'--ml "({side}) or byres (resname HOH and name O and within 0.3 of '
            '(resid 27 and resname ASP and name OD1 OD2))"') in readme

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

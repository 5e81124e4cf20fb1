"""`mlmm prepare` end to end on the shipped examples, its charge logic, and its failures (driver/prepare.py)."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import openmm
import pytest
from openmm import app, unit

from coupling.embedding import MMEnvironment, select_environment
from driver.cli import main as cli
from driver.prepare import estimate_formal_charge
from potentials.core.spec import SystemSpec
from potentials.lj_typing import sigma_eps
from potentials.openmm_system import load_system

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "inputs" / "examples"
METHANOL = EXAMPLES / "methanol" / "input.pdb"
ACETATE = EXAMPLES / "acetate" / "input.pdb"
DIPEPTIDE = EXAMPLES / "alanine-dipeptide" / "input.pdb"


def prepare(*args) -> int:
    return cli(["prepare", *map(str, args)])


def charges(system) -> np.ndarray:
    nb = next(f for f in system.getForces() if isinstance(f, openmm.NonbondedForce))
    return np.array([nb.getParticleParameters(i)[0].value_in_unit(unit.elementary_charge)
                     for i in range(system.getNumParticles())])


def ml_bonded_terms(system, ml: set[int]) -> int:
    n = 0
    for f in system.getForces():
        if isinstance(f, openmm.HarmonicBondForce):
            n += sum(bool(ml & set(f.getBondParameters(k)[:2])) for k in range(f.getNumBonds()))
        elif isinstance(f, openmm.HarmonicAngleForce):
            n += sum(bool(ml & set(f.getAngleParameters(k)[:3])) for k in range(f.getNumAngles()))
        elif isinstance(f, openmm.PeriodicTorsionForce):
            n += sum(bool(ml & set(f.getTorsionParameters(k)[:4])) for k in range(f.getNumTorsions()))
    return n


def test_methanol_in_water(tmp_path):
    out = tmp_path / "run1"
    assert prepare(METHANOL, "--ml", "resname MOL", "--solvate", 1.5, "--out", out) == 0
    spec = SystemSpec.load(out / "system.toml")
    assert spec.structure.file == "system.pdb" and spec.structure.periodic
    assert spec.structure.forcefield == ["amber14-all.xml", "amber14/tip3p.xml"]
    assert spec.ml.selection == "resname MOL" and spec.ml.indices == list(range(6)) and spec.ml.charge == 0
    assert spec.mm.nonbonded_method == "PME" and not spec.mm.rigid_water
    assert spec.coupling.cutoff_nm == 1.2

    top, system, pos = load_system(spec)
    pdb = app.PDBFile(str(out / "system.pdb"))
    assert system.getNumParticles() == pdb.topology.getNumAtoms() == top.getNumAtoms() == len(pos)
    assert sum(r.name == "HOH" for r in top.residues()) * 3 + 6 == top.getNumAtoms()
    box = np.array(spec.structure.box_nm)
    assert np.allclose(box, 3.0 * np.eye(3), atol=1e-6)          # OpenMM 8: box = max(diameter + P, 2 P)
    assert np.allclose(pdb.topology.getPeriodicBoxVectors().value_in_unit(unit.nanometer), box, atol=1e-4)
    assert "CONECT    2    1    6" in (out / "system.pdb").read_text()   # ligand bonds written (O-C, O-H)

    expected = dict(zip(["C1", "O1", "H11", "H12", "H13", "HO1"], ["c3", "oh", "h1", "h1", "h1", "hgp1"]))
    q = charges(system)
    nb = next(f for f in system.getForces() if isinstance(f, openmm.NonbondedForce))
    assert spec.ml.lj == "gaff"
    for i, atom in zip(spec.ml.indices, list(top.atoms())[:6]):
        _, sigma, eps = nb.getParticleParameters(i)
        assert q[i] == 0.0
        assert (sigma.value_in_unit(unit.nanometer), eps.value_in_unit(unit.kilojoule_per_mole)) == \
            pytest.approx(sigma_eps(expected[atom.name]))
    assert ml_bonded_terms(system, set(spec.ml.indices)) == 0
    assert abs(q.sum()) < 1e-6                                       # neutral and integer
    # the embedding accepts the box: cutoff + ML radius < half width
    env = MMEnvironment(charges=q, residue=np.array([a.residue.index for a in top.atoms()]),
                        ml_indices=np.array(spec.ml.indices), cutoff=spec.coupling.cutoff_nm)
    sel = select_environment(env, pos, box)
    assert 50 < sel.n_groups < 400                                   # waters within 1.2 nm of methanol


def test_charged_ligand_is_neutralised(tmp_path):
    # small box: 2.2 nm needs smaller cutoffs (the defaults are tested on methanol)
    assert prepare(ACETATE, "--ml", "resname ACT", "--solvate", 1.1, "--mm-cutoff", 0.9, "--embedding-cutoff", 0.8,
                   "--out", tmp_path) == 0
    spec = SystemSpec.load(tmp_path / "system.toml")
    assert spec.ml.charge == -1                                      # estimated from the bonds
    top, system, _ = load_system(spec)
    names = [r.name for r in top.residues()]
    assert names.count("NA") == 1 and "CL" not in names
    assert charges(system).sum() + spec.ml.charge == pytest.approx(0.0, abs=1e-6)


def test_ionic_strength(tmp_path):
    assert prepare(METHANOL, "--ml", "resname MOL", "--solvate", 1.1, "--ionic-strength", 0.5, "--mm-cutoff", 0.9,
                   "--embedding-cutoff", 0.8, "--out", tmp_path) == 0
    top, system, _ = load_system(SystemSpec.load(tmp_path / "system.toml"))
    names = [r.name for r in top.residues()]
    n_water = names.count("HOH")
    assert names.count("NA") == names.count("CL") == round(0.5 * (n_water + 2 * names.count("NA")) / 55.4) > 0
    assert charges(system).sum() == pytest.approx(0.0, abs=1e-6)


def test_ml_charge_option_and_parity(tmp_path, capsys):
    assert prepare(ACETATE, "--ml", "resname ACT", "--ml-charge", -1, "--nonperiodic", "--out", tmp_path) == 0
    assert SystemSpec.load(tmp_path / "system.toml").ml.charge == -1
    # C2H3O2 has 31 electrons: charge 0 would be a radical
    assert prepare(ACETATE, "--ml", "resname ACT", "--ml-charge", 0, "--nonperiodic", "--out", tmp_path / "b") == 2
    assert "31 electrons at charge +0 (odd" in capsys.readouterr().err


def test_droplet(tmp_path):
    # the carved droplet as Modeller left it (relaxing the solvent lets surface waters move out a little)
    assert prepare(ACETATE, "--ml", "resname ACT", "--solvate", 0.8, "--nonperiodic", "--no-minimize",
                   "--out", tmp_path) == 0
    spec = SystemSpec.load(tmp_path / "system.toml")
    assert not spec.structure.periodic and spec.structure.box_nm is None and spec.mm.nonbonded_method == "NoCutoff"
    assert "CRYST1" not in (tmp_path / "system.pdb").read_text()
    top, system, pos = load_system(spec)
    assert top.getPeriodicBoxVectors() is None and not system.usesPeriodicBoundaryConditions()
    center = pos[spec.ml.indices].mean(0)
    solute_radius = np.linalg.norm(pos[spec.ml.indices] - center, axis=1).max()
    assert np.linalg.norm(pos - center, axis=1).max() <= solute_radius + 0.8 + 1e-6
    names = [r.name for r in top.residues()]
    assert names.count("HOH") > 50 and names.count("NA") == 1       # Na+ replaces a water
    assert charges(system).sum() + spec.ml.charge == pytest.approx(0.0, abs=1e-6)


def test_templated_ml_zone_and_fixing(tmp_path):
    """A peptide ML zone keeps its MM parameters (the MM client strips them); its charge comes from the
    templates. The input lacks CB and all H of ALA: PDBFixer and Modeller add them back."""
    lines = [line for line in DIPEPTIDE.read_text().splitlines()
             if not (line.startswith("ATOM") and (line[12:16].strip() == "CB" or line[76:78].strip() == "H"))]
    src = tmp_path / "broken.pdb"
    src.write_text("\n".join(lines) + "\n")
    assert prepare(src, "--ml", "chain A", "--nonperiodic", "--out", tmp_path / "out") == 0
    spec = SystemSpec.load(tmp_path / "out" / "system.toml")
    top, system, _ = load_system(spec)
    assert top.getNumAtoms() == 22 and spec.ml.indices == list(range(22)) and spec.ml.charge == 0
    assert ml_bonded_terms(system, set(range(22))) > 0


BAD = {
    "no template": ([METHANOL, "--solvate", 1.5], "residue 1 MOL (chain A) has no template in amber14-all.xml, "
                                                  "amber14/tip3p.xml; put it in the ML zone (--ml \"resname MOL\")"),
    "empty selection": ([METHANOL, "--ml", "resname XYZ"], "selection 'resname XYZ' matched no atoms; residue names "
                                                           "present: MOL"),
    "malformed selection": ([METHANOL, "--ml", "resname MOL and"], "expression ends too early"),
    "missing file": ([ROOT / "nothere.pdb", "--ml", "resname MOL"], "input structure"),
    "cut peptide bond": ([DIPEPTIDE, "--ml", "resname ALA", "--nonperiodic"], "an amide (peptide) or other C(sp2)–N "
                         "bond; link atoms cap only single bonds at an sp3 carbon (C–C, N–C): keep the whole peptide "
                         "group in one zone"),
    "missing force field": ([METHANOL, "--ml", "resname MOL", "--forcefield", "amber14-all.xml", "nope.xml"],
                            "force-field file 'nope.xml' not found"),
    "no box": ([METHANOL, "--ml", "resname MOL"], "has no box (CRYST1) and --solvate was not given"),
    "box too small": ([METHANOL, "--ml", "resname MOL", "--solvate", 0.9], "--mm-cutoff 1.0 nm must be below half"),
    "embedding box": ([METHANOL, "--ml", "resname MOL", "--solvate", 1.2, "--mm-cutoff", 0.9],
                      "box too small for the embedding"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input(case, tmp_path, capsys):
    args, message = BAD[case]
    out = tmp_path / "out"
    assert prepare(*args, "--out", out) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("mlmm: error: ") and message in err[-1], err
    # a box too small for the embedding is fixed with a bigger box, never with a cutoff the model was not
    # trained with
    assert "smaller --embedding-cutoff" not in err[-1]
    if case == "embedding box":
        assert "--solvate auto): the embedding cutoff must stay the one the model was trained with" in err[-1]
    assert not (out / "system.toml").exists()


def test_no_fix_with_missing_atoms(tmp_path, capsys):
    src = tmp_path / "nocb.pdb"
    src.write_text("\n".join(line for line in DIPEPTIDE.read_text().splitlines() if " CB  ALA" not in line))
    assert prepare(src, "--ml", "chain A", "--no-fix", "--nonperiodic", "--out", tmp_path / "o") == 2
    assert capsys.readouterr().err.strip() == ("mlmm: error: residue 2 ALA (chain A) is missing heavy atoms CB; "
                                               "run without --no-fix to add them")
    assert prepare(src, "--ml", "chain A", "--nonperiodic", "--out", tmp_path / "o") == 0     # fixed


def test_ligand_without_hydrogens(tmp_path, capsys):
    src = tmp_path / "heavy.pdb"
    src.write_text("".join(line for line in METHANOL.open() if not line.startswith("HETATM") or line[77] != "H"))
    assert prepare(src, "--ml", "resname MOL", "--nonperiodic", "--out", tmp_path / "o") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mlmm: error: cannot tell the charge of residue 1 MOL") and "no hydrogens" in err
    assert "--ml-charge" in err and "\n" not in err


def test_cli_subprocess_one_line(tmp_path):
    """The installed console script: non-zero exit and exactly one line on stderr."""
    exe = Path(sys.executable).parent / "mlmm"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([str(exe), "prepare", str(METHANOL), "--ml", "resname NOPE", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 2
    assert done.stderr.splitlines() == ["mlmm: error: selection 'resname NOPE' matched no atoms; residue names "
                                        "present: MOL"]


def _molecule(spec: str) -> app.topology.Residue:
    """'Ch3 Oh1; 0-1': heavy atoms (element, 'h' + number of H on it), then bonds between heavy atoms."""
    top = app.Topology()
    res = top.addResidue("LIG", top.addChain())
    heavy, bonds = spec.split(";")
    atoms = []
    for tok in heavy.split():
        el, nh = (tok.split("h") + ["0"])[:2]
        atoms.append(top.addAtom(el, app.element.Element.getBySymbol(el), res))
        for _ in range(int(nh)):
            top.addBond(atoms[-1], top.addAtom("H", app.element.hydrogen, res))
    for b in bonds.split():
        i, j = map(int, b.split("-"))
        top.addBond(atoms[i], atoms[j])
    return res


@pytest.mark.parametrize("spec, charge", [
    ("Ch3 Oh1; 0-1", 0),                                              # methanol
    ("Ch3 C O O; 0-1 1-2 1-3", -1),                                   # acetate
    ("Ch3 Nh3; 0-1", 1),                                              # methylammonium
    ("Nh3 Ch2 C O O; 0-1 1-2 2-3 2-4", 0),                            # glycine zwitterion
    ("Ch3 N O O; 0-1 1-2 1-3", 0),                                    # nitromethane (N+ O-)
    ("N O O O; 0-1 0-2 0-3", -1),                                     # nitrate
    ("S O O O O; 0-1 0-2 0-3 0-4", -2),                               # sulfate
    ("P O O O O; 0-1 0-2 0-3 0-4", -3),                               # phosphate
    ("S Ch3 Ch3 O; 0-1 0-2 0-3", 0),                                  # DMSO
    ("S Ch3 Ch3 Ch3; 0-1 0-2 0-3", 1),                                # trimethylsulfonium
    ("Ch1 Ch1 Ch1 Ch1 Ch1 Ch1; 0-1 1-2 2-3 3-4 4-5 5-0", 0),          # benzene
    ("Ch1 Ch1 Ch1 Ch1 Ch1 C O; 0-1 1-2 2-3 3-4 4-5 5-0 5-6", -1),     # phenolate
    ("Nh1 Ch1 Nh1 Ch1 Ch1; 0-1 1-2 2-3 3-4 4-0", 1),                  # imidazolium
    ("Nh1 Ch1 N Ch1 Ch1; 0-1 1-2 2-3 3-4 4-0", 0),                    # imidazole
    ("C Nh2 Nh2 Nh2; 0-1 0-2 0-3", 1),                                # guanidinium
    ("N Ch1 Ch1 Ch1 Ch1 Ch1 O; 0-1 1-2 2-3 3-4 4-5 5-0 0-6", 0),      # pyridine N-oxide
    ("C Ch1 Ch1 C Ch1 Ch1 Nh2 Nh2; 0-1 1-2 2-3 3-4 4-5 5-0 0-6 3-7", 0),   # p-phenylenediamine
    ("Ch3 C N; 0-1 1-2", 0),                                          # acetonitrile
    ("Ch3 N N N; 0-1 1-2 2-3", 0),                                    # methyl azide
    ("P F F F F F F; 0-1 0-2 0-3 0-4 0-5 0-6", -1),                   # PF6-
    ("B F F F F; 0-1 0-2 0-3 0-4", -1),                               # BF4-
    ("Cl; ", -1),                                                     # chloride
    ("Ch3; ", None),                                                  # methyl cation or anion: ask the user
    ("Ch1 Ch1 Ch1 Ch1 Ch1; 0-1 1-2 2-3 3-4 4-0", None),               # cyclopentadienyl: ask
    ("C Oh1; 0-1", None),                                             # heavy atoms without all H: ask
])
def test_formal_charge_estimate(spec, charge):
    assert estimate_formal_charge(_molecule(spec)) == charge


def test_solvent_relaxation_keeps_the_ml_zone_fixed(tmp_path):
    """`prepare` relaxes solvent clashes with the ML zone held fixed: the solute geometry is untouched and the
    energy of the MM atoms goes down."""
    assert prepare(ACETATE, "--ml", "resname ACT", "--solvate", 0.8, "--nonperiodic", "--no-minimize",
                   "--out", tmp_path / "raw") == 0
    assert prepare(ACETATE, "--ml", "resname ACT", "--solvate", 0.8, "--nonperiodic", "--out", tmp_path / "min") == 0
    raw, relaxed = (load_system(SystemSpec.load(tmp_path / k / "system.toml")) for k in ("raw", "min"))
    ml = SystemSpec.load(tmp_path / "min" / "system.toml").ml.indices
    np.testing.assert_allclose(relaxed[2][ml], raw[2][ml], atol=1e-6)           # PDB precision
    assert np.abs(relaxed[2] - raw[2]).max() > 1e-3                              # the solvent did move

    def energy(top, system, pos):
        ctx = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
        ctx.setPositions(pos)
        return ctx.getState(getEnergy=True).getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
    assert energy(*relaxed) < energy(*raw) - 100.0


@pytest.mark.parametrize("fix", [True, False])
def test_charmm_hse_is_read_as_his_with_its_protonation(tmp_path, fix):
    """CHARMM's HSE (OpenMM's reader knows HSD and HSP, not HSE) is read as HIS with H on NE2 and none on ND1,
    the same atoms as the Amber-named fragment; the user's file is left as it was."""
    from driver.prepare import fixed_structure
    src = EXAMPLES / "fragments" / "ACE-HIE-NME.pdb"
    hse = tmp_path / "hse.pdb"
    text = "".join(line[:17] + "HSE" + line[20:] if line.startswith("ATOM") and line[17:20] == "HIS" else line
                   for line in src.read_text().splitlines(keepends=True))
    hse.write_text(text)
    top, pos = fixed_structure(hse, 7.0, fix=fix)
    ref, ref_pos = fixed_structure(src, 7.0, fix=fix)
    his = [r for r in top.residues() if r.index == 1][0]
    assert his.name == "HIS" and {"HE2", "HD1"} & {a.name for a in his.atoms()} == {"HE2"}
    assert [(a.name, a.residue.name) for a in top.atoms()] == [(a.name, a.residue.name) for a in ref.atoms()]
    np.testing.assert_allclose(pos, ref_pos, atol=1e-6)
    assert hse.read_text() == text and not list(Path(os.environ.get("TMPDIR", "/tmp")).glob("hse-*.pdb"))

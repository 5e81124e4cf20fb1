"""`mlmm prepare` on the capped side-chain fragments (inputs/examples/fragments, issue #17 item 3): the side-chain
selection cuts one bond (CA–CB), the zone is ``link-atoms`` and the ML charge is the side chain's formal charge;
protonation states given by the input's hydrogens (HID/HIE/HIP) survive the preparation, CYM only with --no-fix.

No solvent (each case ~1-2 s); the README of the folder has the droplet commands."""
from pathlib import Path

import pytest

from coupling.selection import cut_bonds
from driver.cli import main as cli
from potentials.core.spec import SystemSpec
from potentials.openmm_system import load_system

FRAGMENTS = Path(__file__).resolve().parents[2] / "inputs" / "examples" / "fragments"
SIDE_CHAIN = "resid 2 and not name N H CA HA C O"

# fragment -> (ML charge, ML atoms without the cap, residue 2's side-chain hydrogens after prepare)
CASES = {
    "ASP": (-1, 6, {"HB2", "HB3"}),
    "HID": (0, 11, {"HB2", "HB3", "HD1", "HD2", "HE1"}),
    "HIE": (0, 11, {"HB2", "HB3", "HD2", "HE1", "HE2"}),
    "HIP": (1, 12, {"HB2", "HB3", "HD1", "HD2", "HE1", "HE2"}),
    "LYS": (1, 16, {"HB2", "HB3", "HG2", "HG3", "HD2", "HD3", "HE2", "HE3", "HZ1", "HZ2", "HZ3"}),
    "MET": (0, 11, {"HB2", "HB3", "HG2", "HG3", "HE1", "HE2", "HE3"}),
}
# the other fragments: the same checks, marked slow (~1 s each; -m "not slow" leaves them out)
MORE = {
    "GLU": (-1, 9, {"HB2", "HB3", "HG2", "HG3"}),
    "SER": (0, 5, {"HB2", "HB3", "HG"}),
    "THR": (0, 8, {"HB", "HG1", "HG21", "HG22", "HG23"}),
    "TYR": (0, 15, {"HB2", "HB3", "HD1", "HD2", "HE1", "HE2", "HH"}),
    "ARG": (1, 18, {"HB2", "HB3", "HG2", "HG3", "HD2", "HD3", "HE", "HH11", "HH12", "HH21", "HH22"}),
    "CYS": (0, 5, {"HB2", "HB3", "HG"}),
}


def prepare(name: str, out: Path, *extra: str) -> tuple[SystemSpec, set[str], list[tuple[str, str]]]:
    """(system.toml, residue 2's side-chain hydrogens, the cut bonds as (ML atom, MM atom) names)."""
    assert cli(["prepare", str(FRAGMENTS / f"ACE-{name}-NME.pdb"), "--ml", SIDE_CHAIN, "--nonperiodic",
                *extra, "--out", str(out)]) == 0
    spec = SystemSpec.load(out / "system.toml")
    top = load_system(spec)[0]
    res = next(r for r in top.residues() if r.id == "2")
    hydrogens = {a.name for a in res.atoms() if a.element.symbol == "H" and a.name not in ("H", "HA")}
    return spec, hydrogens, [(q.name, m.name) for q, m in cut_bonds(top, spec.ml.indices)]


@pytest.mark.parametrize("name", sorted(CASES) + [pytest.param(n, marks=pytest.mark.slow) for n in MORE])
def test_side_chain_fragment(name, tmp_path):
    charge, n_ml, hydrogens = {**CASES, **MORE}[name]
    spec, found, cuts = prepare(name, tmp_path)
    assert spec.ml.zone == "link-atoms" and cuts == [("CB", "CA")]
    assert spec.ml.charge == charge
    assert len(spec.ml.indices) == n_ml
    assert found == hydrogens                    # the input's protonation state is kept


def test_thiolate_needs_no_fix(tmp_path):
    """prepare adds hydrogens at --ph 7 (OpenMM only adds, never removes): a CYM input becomes CYS; --no-fix keeps
    the structure as read, and amber14 matches CYM from the atoms."""
    spec, found, _ = prepare("CYM", tmp_path / "fixed")
    assert found == {"HB2", "HB3", "HG"} and spec.ml.charge == 0
    spec, found, cuts = prepare("CYM", tmp_path / "as-read", "--no-fix")
    assert found == {"HB2", "HB3"} and spec.ml.charge == -1
    assert spec.ml.zone == "link-atoms" and len(spec.ml.indices) == 4 and cuts == [("CB", "CA")]

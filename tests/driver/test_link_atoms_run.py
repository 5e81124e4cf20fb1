"""Link atoms end to end through the documented CLI: `mlmm prepare` of the alanine dipeptide with an ML zone
that cuts both terminal methyl carbons writes a link-atom zone, and `mlmm run` drives it through i-PI with the
shipped zones model (trained on this capped zone, inputs/data/fragments/DIPEPTIDE.nc) and the real OpenMM client:
1 ps of NVT at 0.5 fs in a 1 nm water shell, with a sensible temperature and every ML-zone bond intact (issue #17;
see README "Covalent boundaries")."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from driver.cli import main
from potentials.core.spec import SystemSpec

ROOT = Path(__file__).resolve().parents[2]
DIPEPTIDE = ROOT / "inputs" / "examples" / "alanine-dipeptide" / "input.pdb"
MODEL = ROOT / "inputs" / "models" / "small_b3lyp_svp_zones.pt"
CUT_ZONE = "resname ALA or (resname ACE and name C O) or (resname NME and name N H)"


def test_the_readme_tutorial_prepares_this_zone():
    """README tutorial step 7 prepares the zone (and droplet) that the tests below run, so the two cannot drift."""
    readme = " ".join((ROOT / "README.md").read_text().replace("\\\n", " ").split())
    assert ('mlmm prepare inputs/examples/alanine-dipeptide/input.pdb --nonperiodic --solvate 1.0 --out dip/ '
            f'--ml "{CUT_ZONE}"') in readme


@pytest.mark.slow
def test_prepare_and_run_a_zone_that_cuts_the_peptide(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    out = tmp_path / "sys"
    assert main(["prepare", str(DIPEPTIDE), "--ml", CUT_ZONE, "--nonperiodic", "--solvate", "1.0",
                 "--out", str(out)]) == 0
    spec = SystemSpec.load(out / "system.toml")
    assert spec.ml.zone == "link-atoms" and spec.ml.charge == 0 and len(spec.ml.indices) == 14
    assert "2 cut bond(s) capped with hydrogen" in caplog.text
    run = tmp_path / "run"
    assert main(["run", str(ROOT / "inputs" / "templates" / "nvt_bussi.xml"), "--system", str(out / "system.toml"),
                 "--model", str(MODEL), "--steps", "2000", "--out", str(run), "--no-progress"]) == 0
    rows = np.loadtxt(run / "sim.out", ndmin=2)
    assert rows[-1, 0] == 2000 and rows[-1, 1] == pytest.approx(1.0) and np.all(np.isfinite(rows))
    second_half = rows[len(rows) // 2:, 3]                       # Bussi at 300 K, 688 atoms: about +-10 K
    assert 270 < second_half.mean() < 330, second_half.mean()
    _assert_zone_bonds_intact(out, run / "sim.pos_0.xyz", spec.ml.indices)


def _assert_zone_bonds_intact(prepared: Path, xyz: Path, zone: list[int]) -> None:
    """Every bond inside the ML zone stays within 20 % of its prepared length in every saved frame (a zone the
    model does not know tears apart or collapses within a few hundred steps)."""
    import ase.io
    from openmm.app import PDBFile

    top = PDBFile(str(prepared / "system.pdb")).topology
    inside = set(zone)
    bonds = np.array([(a.index, b.index) for a, b in top.bonds() if a.index in inside and b.index in inside])
    frames = ase.io.read(str(xyz), ":")
    length = lambda f: np.linalg.norm(f.positions[bonds[:, 0]] - f.positions[bonds[:, 1]], axis=1)  # noqa: E731
    ratio = np.array([length(f) for f in frames]) / length(frames[0])
    assert len(frames) == 21 and len(bonds) == 13
    assert 0.8 < ratio.min() and ratio.max() < 1.2, (ratio.min(), ratio.max())


def test_prepare_log_names_the_cut_bonds(tmp_path):
    out = tmp_path / "sys"
    assert main(["prepare", str(DIPEPTIDE), "--ml", CUT_ZONE, "--nonperiodic", "--out", str(out)]) == 0
    log = (out / "prepare.log").read_text()
    assert "2 cut bond(s) capped with hydrogen" in log and "CH3 (ACE 1" in log

"""Link atoms end to end through the documented CLI: `mlmm prepare` of the alanine dipeptide with an ML zone
that cuts both terminal methyl carbons writes a link-atom zone, and `mlmm run` drives it through i-PI with the
shipped model and the real OpenMM client (a short NVT run: the shipped model is not trained on capped peptide
fragments, so only the mechanics are checked here; see README "Covalent boundaries")."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from driver.cli import main
from potentials.core.spec import SystemSpec

ROOT = Path(__file__).resolve().parents[2]
DIPEPTIDE = ROOT / "inputs" / "examples" / "alanine-dipeptide" / "input.pdb"
MODEL = ROOT / "inputs" / "models" / "small_b3lyp_svp.pt"
CUT_ZONE = "resname ALA or (resname ACE and name C O) or (resname NME and name N H)"


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
                 "--model", str(MODEL), "--steps", "20", "--out", str(run), "--no-progress"]) == 0
    rows = np.loadtxt(run / "sim.out", ndmin=2)
    assert rows[-1, 0] == 20 and np.all(np.isfinite(rows)) and 100 < rows[-1, 3] < 600


def test_prepare_log_names_the_cut_bonds(tmp_path):
    out = tmp_path / "sys"
    assert main(["prepare", str(DIPEPTIDE), "--ml", CUT_ZONE, "--nonperiodic", "--out", str(out)]) == 0
    log = (out / "prepare.log").read_text()
    assert "2 cut bond(s) capped with hydrogen" in log and "CH3 (ACE 1" in log

"""`mlmm prepare` is reproducible (--seed) and chooses a box that works (--solvate without a value), issue 20."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from openmm import app

from driver import launch
from driver.cli import main as cli
from driver.prepare import auto_padding
from potentials.core.spec import SystemSpec
from potentials.openmm_system import half_min_width

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "inputs" / "examples"
METHANOL = EXAMPLES / "methanol" / "input.pdb"
DIPEPTIDE = EXAMPLES / "alanine-dipeptide" / "input.pdb"
MODEL = ROOT / "inputs" / "models" / "small_b3lyp_svp.pt"

pytestmark = pytest.mark.timeout(300)


def prepare(*args) -> int:
    return cli(["prepare", *map(str, args)])


@pytest.mark.slow
def test_same_seed_same_system(tmp_path):
    """Methanol with an ion (its hydrogens placed at random by OpenMM, the ion replaces a random water, the solvent
    minimised on several threads): the same seed gives the same file, byte for byte; the seed is recorded."""
    args = [METHANOL, "--ml", "resname MOL", "--solvate", 1.2, "--mm-cutoff", 0.55, "--embedding-cutoff", 0.6,
            "--ionic-strength", 0.15]
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        assert prepare(*args, "--seed", seed, "--out", tmp_path / name) == 0
    a, b, c = ((tmp_path / n / "system.pdb").read_text() for n in "abc")
    assert a == b and a != c
    log = (tmp_path / "a" / "prepare.log").read_text().splitlines()
    assert log[0].startswith("# mlmm prepare") and log[1] == "# seed 7" and "ionic_strength=0.15" in log[2]
    assert any("minimised the MM atoms" in ln for ln in log)


def test_auto_padding_numbers():
    """Half the box (max(2 r + P, 2 P)) covers max(MM cutoff, embedding cutoff + zone radius) + 0.2 nm; at least
    the MM cutoff; a large solute needs less padding than a small one."""
    small = np.array([[0.0, 0.0, 0.0], [0.3, 0.0, 0.0]])                     # r = 0.15, zone radius 0.15
    p = auto_padding(small, np.array([0, 1]), 1.0, 1.2)
    assert p == pytest.approx(1.55) and max(0.3 + p, 2 * p) / 2 >= 1.2 + 0.15 + 0.2
    assert auto_padding(small, np.zeros(0, int), 1.0, 1.2) == pytest.approx(1.2)          # no ML zone: MM cutoff
    big = np.array([[0.0, 0.0, 0.0], [6.0, 0.0, 0.0], [3.0, 0.1, 0.0]])   # r = 3: 2r alone is wide enough
    assert auto_padding(big, np.array([2]), 1.0, 1.2) == pytest.approx(1.0)


@pytest.mark.slow
def test_solvate_auto_dipeptide_runs(tmp_path, capsys):
    """Alanine dipeptide, the whole peptide as ML zone: a padding of 1.0 nm is refused with the usual one line (it
    now names --solvate auto); `--solvate` without a value picks a padding whose box fits the embedding, and
    the prepared system runs ML/MM NVT with the shipped model."""
    assert prepare(DIPEPTIDE, "--ml", "chain A", "--solvate", 1.0, "--out", tmp_path / "small") == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("mlmm: error: ") and "--solvate auto" in err and "box" in err, err
    out = tmp_path / "auto"
    assert prepare(DIPEPTIDE, "--ml", "chain A", "--solvate", "--out", out) == 0
    spec = SystemSpec.load(out / "system.toml")
    log = (out / "prepare.log").read_text()
    assert "--solvate auto: padding" in log and spec.ml.indices == list(range(22))
    pos = app.PDBFile(str(out / "system.pdb")).getPositions(asNumpy=True)._value[spec.ml.indices]
    radius = np.linalg.norm(pos - pos.mean(axis=0), axis=1).max()
    assert half_min_width(np.array(spec.structure.box_nm)) > spec.coupling.cutoff_nm + radius + 0.15
    result = launch.run_simulation(ROOT / "inputs" / "templates" / "nvt_bussi.xml", out / "system.toml",
                                   out=tmp_path / "run", model=MODEL, steps=10, seed=1, progress=False)
    assert result.steps_done == 10

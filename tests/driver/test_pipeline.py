"""`mlmm label/train/evaluate` glue (driver/pipeline.py): --print-config prints the effective configuration and
runs nothing; the scheme named in the training config is resolved from coupling.schemes; evaluate prints the
table with one row per solute and scheme."""
from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from driver.pipeline import evaluate_main, label_main, train_main
from potentials.core.errors import SetupError

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "tests" / "data" / "tiny_qmmm.nc"


def _train_toml(tmp_path: Path, extra: str = "") -> Path:
    path = tmp_path / "train.toml"
    path.write_text(f'[model]\npreset = "tiny"\n[data]\npath = "{TINY}"\n[output]\nmodel = "m.pt"\n'
                    f'[train]\nepochs = 1\n{extra}')
    return path


def test_print_config_runs_nothing(tmp_path, capsys):
    path = _train_toml(tmp_path, 'embedding = "mechanical"\n')
    assert train_main(argparse.Namespace(config=str(path), device="cpu", resume=False, print_config=True)) == 0
    text = capsys.readouterr().out
    assert text.startswith("# mlmm train configuration") and 'embedding = "mechanical"' in text
    assert "epochs = 1" in text and not (tmp_path / "m.pt").exists()
    out = tmp_path / "d.nc"
    assert label_main(argparse.Namespace(out=str(out), config=None, frames=None, print_config=True)) == 0
    text = capsys.readouterr().out
    assert text.startswith("# mlmm label configuration") and "embedding_cutoff_nm = 1.2" in text
    assert "[level]" in text and not out.exists()
    clusters = ROOT / "inputs" / "data" / "label_config_clusters.toml"     # --solutes: a subset of the plan
    assert label_main(argparse.Namespace(out=str(out), config=str(clusters), frames=None, solutes="ACT",
                                         print_config=True)) == 0
    assert "solutes = [\n    \"ACT\",\n]" in capsys.readouterr().out and not out.exists()


def test_train_resolves_the_configured_scheme(tmp_path):
    path = _train_toml(tmp_path, 'embedding = "nope"\n')
    with pytest.raises(SetupError, match="unknown embedding .*'nope'"):
        train_main(argparse.Namespace(config=str(path), device="cpu", resume=False))


def test_evaluate_prints_one_row_per_solute_and_scheme(capsys):
    model = ROOT / "inputs" / "models" / "small_b3lyp_svp.pt"
    assert evaluate_main(argparse.Namespace(model=str(model), dataset=str(ROOT / "tests" / "data" / "test_slice.nc"),
                                            split="test", device="cpu")) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [line for line in lines if line.startswith("| all |")]
    assert [r.split("|")[2].strip() for r in rows] == ["electrostatic", "mechanical"]

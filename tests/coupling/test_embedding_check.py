"""The model knows how it was trained: a model file records its training embedding (scheme, cutoff, switch width,
long range, MM charges), and the ML client refuses a system whose embedding differs, with one line naming both
values and the fix; ``--allow-embedding-mismatch`` turns the refusal into a loud warning.

Real parts only: a tiny network saved with ``save_model``, a 6-water cluster's system.toml, the `mlmm` CLI.
"""
from __future__ import annotations

import dataclasses
import logging
import sys
from pathlib import Path

import pytest

from coupling.ml_engine import MLEngine, check_embedding
from coupling.schemes import get_scheme
from driver.cli import main as cli
from potentials.adapters import load_adapter
from potentials.core.errors import SetupError
from potentials.core.spec import SystemSpec
from potentials.model_io import embedding_metadata, load_model, save_model, trained_embedding
from potentials.network import EmbeddedAIMNet2, ModelConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "driver"))
from run_helpers import water_cluster_spec  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TRAINED = embedding_metadata("electrostatic", 1.0, 0.2, "none", "force-field point charges of the MM atoms: TIP3P",
                             source="test")


def _model(path: Path, embedding) -> Path:
    model = EmbeddedAIMNet2(ModelConfig.from_toml(ROOT / "inputs/models/configs/tiny.toml"), seed=1)
    save_model(path, model, None if embedding is None else {"embedding": embedding})
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """(folder, system.toml with cutoff 1.2 nm, system.toml with cutoff 1.0 nm, model trained at 1.0 nm)."""
    folder = tmp_path_factory.mktemp("embedding_check")
    spec = water_cluster_spec(folder, embedding="electrostatic", cutoff_nm=1.2)
    spec.save(folder / "wide.toml")
    spec.coupling.cutoff_nm = 1.0
    spec.save(folder / "trained.toml")
    return folder, folder / "wide.toml", folder / "trained.toml", _model(folder / "m.pt", TRAINED)


def test_model_file_records_its_training_embedding(files):
    folder, *_, model = files
    loaded = load_model(model)
    assert loaded.metadata["embedding"] == TRAINED
    assert trained_embedding(loaded.metadata) == {k: TRAINED[k] for k in
                                                  ("scheme", "cutoff_nm", "switch_nm", "long_range", "mm_charges")}
    # files from before the metadata: nothing recorded; files with only the scheme's name: cutoff unknown
    assert trained_embedding({}) is None
    assert trained_embedding({"embedding": "electrostatic"})["cutoff_nm"] is None


def test_client_refuses_another_cutoff_with_one_line(files, capsys):
    """Through the CLI: `mlmm client ml` on a system whose cutoff (1.2 nm) is not the model's (1.0 nm) stops
    before connecting, with one line naming both cutoffs, the fix and the override flag."""
    folder, wide, _, model = files
    rc = cli(["client", "ml", "--system", str(wide), "--model", str(model), "--address", "unix:mlmm-embcheck-none",
              "--timeout", "0.2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    line = err[0]
    assert line.startswith("mlmm: error: model ")
    assert "trained with embedding cutoff 1.00 nm (switch 0.20 nm)" in line
    assert "system.toml has cutoff 1.20 nm" in line and "set [coupling] cutoff_nm = 1.0 and switch_width_nm = 0.2" in line
    assert "--allow-embedding-mismatch runs anyway" in line
    assert "cutoff_nm = 1.2" not in line                          # never advises a cutoff it was not trained with


def test_override_flag_warns_and_runs(files, capsys, caplog):
    """With --allow-embedding-mismatch the client logs a loud warning and goes on (here: to connecting, and no
    i-PI is there); the engine it builds computes."""
    folder, wide, _, model = files
    with caplog.at_level(logging.WARNING):
        rc = cli(["client", "ml", "--system", str(wide), "--model", str(model), "--address",
                  "unix:mlmm-embcheck-none", "--timeout", "0.2", "--allow-embedding-mismatch"])
    err = capsys.readouterr().err
    assert rc == 2 and "no i-PI server at unix:mlmm-embcheck-none" in err and "trained with" not in err
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(w.startswith("EMBEDDING MISMATCH, running anyway (--allow-embedding-mismatch)") and
               "1.00 nm" in w and "1.20 nm" in w for w in warnings)
    engine = MLEngine.from_spec(wide, model, allow_embedding_mismatch=True)
    import numpy as np

    from potentials.openmm_system import load_system
    _, _, pos = load_system(SystemSpec.load(wide))
    assert np.isfinite(engine.compute(np.asarray(pos)[None])[0].energy)


def test_matching_and_compatible_systems_pass(files, caplog):
    """Same cutoff and switch: built. electrostatic-lr (PME beyond the cutoff, added at run time) is the same
    family as a model trained as electrostatic; mechanical feeds the network no field: compatible too. A model
    file that records nothing is not checked (one info line)."""
    folder, wide, trained, model = files
    with caplog.at_level(logging.INFO):
        engine = MLEngine.from_spec(trained, model)
    assert engine.mode == "electrostatic"
    assert any("compatible" in r.getMessage() for r in caplog.records)
    adapter = load_adapter(model, "cpu")
    coupling = SystemSpec.load(trained).coupling
    for name in ("electrostatic-lr", "mechanical"):
        assert check_embedding(adapter, coupling, get_scheme(name)) is None
    # mechanical runs the network in vacuum: its cutoff plays no part, even a wrong one
    assert check_embedding(adapter, dataclasses.replace(coupling, cutoff_nm=0.5), get_scheme("mechanical")) is None
    with pytest.raises(SetupError, match="switch 0.20 nm.*system.toml has cutoff 1.00 nm \\(switch 0.10 nm\\)"):
        check_embedding(adapter, dataclasses.replace(coupling, switch_width_nm=0.1), get_scheme("electrostatic-lr"))
    # another scheme family that feeds the model: refused, naming both schemes
    with pytest.raises(SetupError, match='trained with electrostatic embedding; system.toml has \\[coupling\\] '
                                         'embedding = "model-charges"'):
        check_embedding(adapter, coupling, get_scheme("model-charges"))
    old = load_adapter(_model(folder / "old.pt", None), "cpu")
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert check_embedding(old, dataclasses.replace(coupling, cutoff_nm=0.5), get_scheme("electrostatic")) is None
    assert sum("records no training embedding" in r.getMessage() for r in caplog.records) == 1


def test_run_refuses_before_starting_anything(files, capsys, tmp_path):
    """`mlmm run` checks the model against the system before i-PI or a client starts: the same one line, no run
    folder; the flag reaches the ML clients' command lines as a bare flag."""
    from driver.rundir import client_argv_factory

    folder, wide, _, model = files
    out = tmp_path / "run"
    rc = cli(["run", str(ROOT / "inputs/templates/nvt_bussi.xml"), "--system", str(wide), "--model", str(model),
              "--out", str(out), "--steps", "1", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "trained with embedding cutoff 1.00 nm" in err[0] and not out.exists()
    argv = client_argv_factory(wide, model, "cpu", None, False,
                               model_options={"model_type": None, "allow_embedding_mismatch": True})("ml", "unix:x")
    assert argv[-1] == "--allow-embedding-mismatch" and "True" not in argv


def test_stamp_an_older_model_file(files, tmp_path):
    """A model trained before the stamp gets its training embedding from its dataset (the shipped test data:
    labelled at 0.6 / 0.2 nm), weights untouched; the client then checks it."""
    import torch

    from potentials.model_io import stamp_embedding

    folder, wide, _, _ = files
    old = _model(tmp_path / "old.pt", None)
    before = torch.load(old, weights_only=True)["state_dict"]
    entry = stamp_embedding(old, ROOT / "tests/data/tiny_qmmm.nc")
    assert (entry["scheme"], entry["cutoff_nm"], entry["switch_nm"], entry["long_range"]) == \
        ("electrostatic", 0.6, 0.2, "none")
    after = torch.load(old, weights_only=True)
    assert after["metadata"]["embedding"] == entry
    assert all(torch.equal(before[k], v) for k, v in after["state_dict"].items())
    with pytest.raises(SetupError, match="trained with embedding cutoff 0.60 nm .* system.toml has cutoff 1.20 nm"):
        MLEngine.from_spec(wide, old)


def test_ase_calculator_and_optimize_refuse_and_override(files, tmp_path):
    """The in-process routes share the check: MLMMCalculator and `mlmm optimize` refuse the 1.2 nm system for a
    model trained at 1.0 nm, and run with the override (a zero-step relaxation writes its files)."""
    from coupling.ase_calculator import MLMMCalculator

    folder, wide, _, model = files
    with pytest.raises(SetupError, match="trained with embedding cutoff 1.00 nm"):
        MLMMCalculator(wide, model)
    assert MLMMCalculator(wide, model, allow_embedding_mismatch=True).ml is not None
    out = tmp_path / "relaxed"
    assert cli(["optimize", str(wide), "--model", str(model), "--out", str(out), "--steps", "0"]) != 0
    assert cli(["optimize", str(wide), "--model", str(model), "--out", str(out), "--steps", "0",
                "--allow-embedding-mismatch"]) == 0
    assert (out / "optimized.toml").is_file()

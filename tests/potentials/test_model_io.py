"""Model files: round trip, metadata, dtype, and clear errors for bad files."""
from pathlib import Path

import pytest
import torch

from potentials.core.errors import SetupError
from potentials.model_io import ARCHITECTURE, FORMAT_VERSION, UNITS, load_model, save_model
from potentials.network import EmbeddedAIMNet2, ModelConfig

CONFIGS = Path(__file__).resolve().parents[2] / "inputs" / "models" / "configs"


def _model(dtype=torch.float32):
    model = EmbeddedAIMNet2(ModelConfig.from_toml(CONFIGS / "tiny.toml", d3=False), seed=4).to(dtype)
    with torch.no_grad():
        model.shift.weight.copy_(torch.tensor([-13.6, -1029.7, -1484.1, -2041.8, -10829.2], dtype=torch.float64)
                                 + 1e-10)
    return model


def _inputs(dtype):
    g = torch.Generator().manual_seed(0)
    pos = torch.randn(6, 3, generator=g, dtype=dtype) * 1.5
    return (torch.tensor([8, 1, 1, 6, 1, 7]), pos, torch.tensor([0, 0, 0, 1, 1, 1]), torch.tensor([0.0, 1.0]),
            torch.randn(6, generator=g, dtype=dtype), torch.randn(6, 3, generator=g, dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_round_trip(tmp_path, dtype):
    model = _model(dtype)
    model.metadata = {"dataset": "water-dimers", "epochs": 3}
    path = tmp_path / "sub" / "m.pt"
    save_model(path, model, {"rmse_energy_ev": 0.012, "levels": ["wb97x-d/def2-svp"]})
    raw = torch.load(path, weights_only=True)
    assert raw["format_version"] == FORMAT_VERSION and raw["units"] == UNITS
    assert raw["architecture"] == ARCHITECTURE == "embedded-aimnet2"
    assert raw["elements"] == [1, 6, 7, 8, 16] and raw["cutoff"] == 5.0
    loaded = load_model(path)
    assert not loaded.training and loaded.embedding.dtype == dtype
    assert loaded.shift.weight.dtype == torch.float64
    assert torch.equal(loaded.shift.weight, model.shift.weight)
    assert loaded.metadata == {"dataset": "water-dimers", "epochs": 3, "rmse_energy_ev": 0.012,
                               "levels": ["wb97x-d/def2-svp"]}
    assert loaded.config == model.config
    with torch.no_grad():
        a, b = model.eval()(*_inputs(dtype)), loaded(*_inputs(dtype))
    for key in ("energy", "charges", "polarisability"):
        assert torch.equal(a[key], b[key])


def test_bad_files(tmp_path):
    with pytest.raises(SetupError, match="not found"):
        load_model(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(SetupError, match="cannot be read"):
        load_model(tmp_path / "junk.pt")
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(SetupError, match="no format_version"):
        load_model(tmp_path / "other.pt")
    save_model(tmp_path / "m.pt", _model())
    d = torch.load(tmp_path / "m.pt", weights_only=True)
    torch.save({**d, "format_version": 99}, tmp_path / "future.pt")
    with pytest.raises(SetupError, match="format_version 99.*retrain"):
        load_model(tmp_path / "future.pt")
    torch.save({**d, "config": {**d["config"], "colour": "red"}}, tmp_path / "badcfg.pt")
    with pytest.raises(SetupError, match="unknown key"):
        load_model(tmp_path / "badcfg.pt")
    with pytest.raises(SetupError, match="plain values"):
        save_model(tmp_path / "x.pt", _model(), {"when": object()})


def test_files_with_and_without_architecture(tmp_path):
    """Files written before the architecture key existed hold the network; another architecture is refused
    by load_model (potentials.adapters.load_adapter dispatches it)."""
    model = _model()
    save_model(tmp_path / "m.pt", model)
    d = torch.load(tmp_path / "m.pt", weights_only=True)
    torch.save({k: v for k, v in d.items() if k != "architecture"}, tmp_path / "old.pt")
    old = load_model(tmp_path / "old.pt")
    for (k, v), w in zip(model.state_dict().items(), old.state_dict().values()):
        assert torch.equal(v, w), k
    torch.save({**d, "architecture": "other-net"}, tmp_path / "other.pt")
    with pytest.raises(SetupError, match="holds a 'other-net' model.*load_adapter"):
        load_model(tmp_path / "other.pt")

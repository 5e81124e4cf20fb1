"""The shipped model loads, is small, and reproduces the errors its model card reports on the shipped slice."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from coupling.schemes import SCHEMES
from potentials import evaluate as EV
from potentials import train as T
from potentials.model_io import load_model

ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT / "inputs" / "models"
SLICE = ROOT / "tests" / "data" / "test_slice.nc"
SLICE_HEADING = "## Errors on the shipped test slice"


def _shipped() -> tuple[Path, Path]:
    models = sorted(p for p in MODELS.glob("*.pt"))
    assert models, f"no shipped model (*.pt) in {MODELS}"
    model = models[0]
    card = model.with_suffix(".md")
    assert card.is_file(), f"model card {card} missing"
    return model, card


def card_slice_table(card: Path) -> dict[tuple[str, str], dict[str, float]]:
    """Rows of the markdown table that follows SLICE_HEADING: (solute, mode) -> metrics."""
    text = card.read_text()
    assert SLICE_HEADING in text, f"{card} has no section '{SLICE_HEADING}'"
    rows = {}
    names = ["n", *EV.METRICS]
    for line in text.split(SLICE_HEADING, 1)[1].splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 + len(EV.METRICS) and cells[1] in ("electrostatic", "mechanical"):
            rows[(cells[0], cells[1])] = {k: float(v) for k, v in zip(names, cells[2:]) if v not in ("–", "-")}
        elif rows and not line.strip().startswith("|"):
            break
    assert rows, f"{card}: no table rows after '{SLICE_HEADING}'"
    return rows


def test_shipped_model_is_small_and_loads():
    model_path, _ = _shipped()
    assert model_path.stat().st_size < 10 * 2 ** 20
    model = load_model(model_path)
    assert model.metadata.get("n_train", 0) > 0 and "self_energies_ev" in model.metadata
    for z in (1, 6, 7, 8):
        model.check_numbers(torch.tensor([z]))


def test_shipped_model_matches_its_card_on_the_shipped_slice():
    torch.set_num_threads(1)
    model_path, card = _shipped()
    expected = card_slice_table(card)
    frames = T.load_frames(SLICE, "all")
    schemes = {name: SCHEMES.get(name)() for name in ("electrostatic", "mechanical")}
    res = EV.evaluate(load_model(model_path), frames, gas_energy=EV.read_gas_energies(SLICE), schemes=schemes)
    for (solute, mode), row in expected.items():
        got = res[mode][solute]
        assert got["n"] == row["n"], (solute, mode)
        for k, v in row.items():
            if k != "n":
                # the card prints 3 decimals; allow rounding plus float32 noise across machines
                assert got[k] == pytest.approx(v, abs=1.5e-3, rel=1e-3), (solute, mode, k, got[k], v)
    assert ("all", "electrostatic") in expected and ("all", "mechanical") in expected


def test_zones_model_matches_its_card_on_the_shipped_clusters():
    """The preview model for multi-molecule zones (small_b3lyp_svp_zones.pt) reproduces its card's cluster table
    on the test split of the shipped cluster data (never trained on), and records zones of 4 molecules."""
    torch.set_num_threads(1)
    model_path = MODELS / "small_b3lyp_svp_zones.pt"
    card = model_path.with_suffix(".md").read_text()
    expected = {}
    for line in card.split("Multi-molecule clusters", 1)[1].split("Single solutes", 1)[0].splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 6 and cells[0] in ("MOH+3HOH", "ACT+3HOH", "all"):
            expected[cells[0]] = dict(zip(("n", "energy", "forces", "mm_forces", "dipole"), map(float, cells[1:6])))
    assert set(expected) == {"MOH+3HOH", "ACT+3HOH", "all"}
    model = load_model(model_path)
    assert model.metadata["domain"]["ml_molecules"] == 4
    frames = T.load_frames(ROOT / "inputs" / "data" / "qmmm_clusters_b3lyp_svp.nc", "test")
    res = EV.evaluate(model, frames, schemes={"electrostatic": SCHEMES.get("electrostatic")()})["electrostatic"]
    for zone, row in expected.items():
        assert res[zone]["n"] == row["n"]
        for k in ("energy", "forces", "mm_forces", "dipole"):
            assert res[zone][k] == pytest.approx(row[k], abs=1.5e-3, rel=1e-3), (zone, k, res[zone][k], row[k])

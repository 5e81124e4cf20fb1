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
from zones_card_tables import CARD_TABLES

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


ZONES = MODELS / "small_b3lyp_svp_zones.pt"
COLUMNS = ("n", "energy", "forces", "mm_forces", "dipole", "energy_offset_removed")


def _zones_card_rows(start: str, stop: str) -> dict[str, dict[str, float]]:
    """Rows of the zones card's table between the headings ``start`` and ``stop``: first cell -> metrics."""
    text = ZONES.with_suffix(".md").read_text().split(start, 1)[1].split(stop, 1)[0]
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 7 and cells[1].isdigit():
            rows[cells[0]] = dict(zip(COLUMNS, map(float, cells[1:7])))
    return rows


def _assert_rows(expected: dict, got: dict, where: str) -> None:
    assert got["n"] == expected["n"], where
    for k in COLUMNS[1:]:
        assert got[k] == pytest.approx(expected[k], abs=1.5e-3, rel=1e-3), (where, k, got[k], expected[k])


ZONE_SETS = {   # card heading -> (the next heading, shipped data file), for the tables of multi-molecule zones
    heading: (CARD_TABLES[i + 1][0], f) for i, (heading, _, f) in enumerate(CARD_TABLES[:-1]) if f}


@pytest.mark.parametrize("heading", list(ZONE_SETS))
def test_zones_model_matches_its_card_on_the_shipped_zones(heading):
    """The model for multi-molecule zones (small_b3lyp_svp_zones.pt) reproduces its card's tables of the 3-water
    clusters, the zones of 1-6 waters, the ion pairs and the hydrogen-bonded pairs on the test splits of the shipped
    data (never trained on), with a row for every zone of each test split, and records zones of up to 7 molecules
    (a solute and 6 waters)."""
    torch.set_num_threads(1)
    stop, name = ZONE_SETS[heading]
    expected = _zones_card_rows(heading, stop)
    model = load_model(ZONES)
    assert model.metadata["domain"]["ml_molecules"] == 7
    frames = T.load_frames(ROOT / "inputs" / "data" / name, "test")
    res = EV.evaluate(model, frames, schemes={"electrostatic": SCHEMES.get("electrostatic")()})["electrostatic"]
    assert set(expected) == set(res), f"the card's rows under {heading!r} are not the zones of {name}'s test split"
    for zone, row in expected.items():
        _assert_rows(row, res[zone], zone)


def test_zones_model_matches_its_card_on_each_capped_fragment():
    """The card's errors per fragment kind are those of the model on each shipped fragment's test split, and the
    model knows sulfur (Cys, Cys-) and records every fragment's formula in its domain."""
    torch.set_num_threads(1)
    expected = _zones_card_rows(*(h for h, name, _ in CARD_TABLES if name in ("fragments", "solutes")))
    files = sorted((ROOT / "inputs" / "data" / "fragments").glob("*.nc"))
    assert {name.split()[0] for name in expected} == {f.stem for f in files}
    model = load_model(ZONES)
    assert 16 in model.config.elements
    formulas = {m["formula"] for m in model.metadata["domain"]["molecules"]}
    scheme = {"electrostatic": SCHEMES.get("electrostatic")()}
    for name, row in expected.items():
        frames = T.load_frames(ROOT / "inputs" / "data" / "fragments" / f"{name.split()[0]}.nc", "test")
        assert name.split()[1].strip("()") in formulas
        _assert_rows(row, EV.evaluate(model, frames, schemes=scheme)["electrostatic"]["all"], name)

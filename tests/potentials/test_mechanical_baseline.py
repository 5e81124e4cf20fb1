"""An honest mechanical baseline: `mlmm evaluate` runs mechanical embedding the way a simulation does, with the
model's vacuum charges of ONE geometry (the trajectory's first MD frame) held fixed for every frame of the
trajectory, not the charges of each frame's own geometry.

Real parts only: frames of the shipped held-out set (inputs/data/test_b3lyp_svp.nc), the real network (tiny
preset, random weights), the real schemes.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from coupling.schemes import SCHEMES
from potentials import evaluate as EV
from potentials import train as T
from potentials.core.units import COULOMB_EV_ANGSTROM
from potentials.network import EmbeddedAIMNet2, ModelConfig

ROOT = Path(__file__).resolve().parents[2]
TEST_SET = ROOT / "inputs" / "data" / "test_b3lyp_svp.nc"
MECHANICAL = SCHEMES.get("mechanical")()
BOTH = {"electrostatic": SCHEMES.get("electrostatic")(), "mechanical": MECHANICAL}


@pytest.fixture(scope="module")
def trajectories():
    """(model, frames): the 20 frames (MD + displaced) of two solvated trajectories of the test set."""
    frames = T.load_frames(TEST_SET, "test")
    keys = sorted({EV.trajectory_key(f) for f in frames if len(f["mm_charges"]) and f["solute"] in ("MOH", "ACT")
                   and f["environment"] == "periodic"})[:2]
    chosen = [f for f in frames if EV.trajectory_key(f) in keys]
    assert len(keys) == 2 and len(chosen) == 20
    model = EmbeddedAIMNet2(ModelConfig.from_toml(ROOT / "inputs/models/configs/tiny.toml"), seed=3).double().eval()
    return model, chosen


def test_baseline_charges_are_fixed_per_trajectory(trajectories):
    model, frames = trajectories
    fixed = EV.mechanical_charges(model, frames)
    own = [EV.vacuum_charges(model, f) for f in frames]
    for key in {EV.trajectory_key(f) for f in frames}:
        rows = [i for i, f in enumerate(frames) if EV.trajectory_key(f) == key]
        first = min((i for i in rows if not frames[i]["displaced"]), key=lambda i: frames[i]["index_in_block"])
        for i in rows:                                    # the same charges for every frame of the trajectory:
            np.testing.assert_array_equal(fixed[i], fixed[rows[0]])
        np.testing.assert_allclose(fixed[first], own[first], rtol=0, atol=1e-12)    # those of its first MD frame
        # and not the charges of each frame's own geometry, which no simulation uses
        differ = [float(np.abs(fixed[i] - own[i]).max()) for i in rows if i != first]
        assert min(differ) > 1e-6, differ


def test_baseline_energy_is_vacuum_plus_coulomb_of_the_fixed_charges(trajectories):
    """The baseline of a later frame: the model in vacuum plus plain Coulomb of the start's charges with the
    frame's (switched) MM charges, checked by hand; `evaluate` changes the mechanical rows only."""
    model, frames = trajectories
    fixed = EV.mechanical_charges(model, frames)
    k = next(i for i, f in enumerate(frames) if f["displaced"])
    f = frames[k]
    b = T.collate([f], "cpu", torch.float64)
    gas = T.predict(model, b, None)
    mech = T.predict(EV._FixedCharges(model, torch.as_tensor(fixed[k])), b, MECHANICAL)
    r, R = np.asarray(f["positions"], float), np.asarray(f["mm_positions"], float)
    dist = np.linalg.norm(R[None, :, :] - r[:, None, :], axis=-1)
    e_coul = COULOMB_EV_ANGSTROM * np.sum(fixed[k][:, None] * np.asarray(f["mm_charges"], float)[None, :] / dist)
    assert float((mech["energy"] - gas["energy"]).detach()) == pytest.approx(e_coul, rel=1e-9)

    now = EV.evaluate(model, frames, schemes=BOTH)
    per_frame = EV.evaluate(model, frames, schemes=BOTH, fixed=())
    assert now["electrostatic"] == per_frame["electrostatic"]
    assert now["mechanical"]["all"]["energy"] != pytest.approx(per_frame["mechanical"]["all"]["energy"], rel=1e-6)
    table = EV.format_table(now)
    assert table.endswith(EV.BASELINE_NOTE) and "first MD frame of each trajectory" in table

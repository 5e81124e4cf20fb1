"""The shipped example starts equilibrated (issue 20): the README's run is stationary from its first steps."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from driver import launch, trajectory

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "inputs" / "examples" / "methanol" / "prepared" / "system.toml"
MODEL = ROOT / "inputs" / "models" / "small_b3lyp_svp.pt"

pytestmark = pytest.mark.timeout(300)


@pytest.mark.slow
def test_example_is_stationary(tmp_path):
    """The README's first line, shortened to 300 steps (template, model and seed as there): after the first 50
    steps the temperature stays within 300 +- 15 K, and the potential energy has no trend (started from the
    minimised structure it rose by ~8000 kJ/mol within 0.5 ps while the temperature fell to ~140 K)."""
    launch.run_simulation(ROOT / "inputs" / "templates" / "nvt_bussi.xml", EXAMPLE, out=tmp_path / "run",
                          model=MODEL, steps=300, progress=False)
    values, _ = trajectory.read_properties(tmp_path / "run" / "sim.out")
    step, temp, pot = values["step"], values["temperature"], values["potential"]
    assert np.all(np.abs(temp[step >= 50] - 300.0) < 15.0), temp
    assert abs(pot[step < 100].mean() - pot[step >= 200].mean()) < 1000.0, pot

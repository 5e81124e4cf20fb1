"""NVE through i-PI with the long-range term: the acetate example (ML zone -1 e, one Na+ counter-ion, TIP3P),
prepared by `mlmm prepare` with its defaults (electrostatic-lr), real i-PI, the real MM client and the ML client
with the shipped model. The short version of tests/bench/bench_nve_lr.py (which runs ps, and the neutral
methanol zone, for PERFORMANCE.md).

Flexible water at 0.5 fs swings the conserved energy by tens of kJ/mol while the O–H vibrations fill up, the
same in both runs; the sharp check is that the run with the long-range term follows the cutoff-only run from the
same start and velocities: a long-range term whose forces were not the gradient of its energy would add its own
drift on top.
"""
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "bench"))

from bench_nve_lr import nve_drift, prepared_acetate, read_properties  # noqa: E402

STEPS = 400

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def test_nve_charged_zone_with_long_range_term(tmp_path):
    lr = nve_drift(prepared_acetate(tmp_path), STEPS, tmp_path / "run-lr")
    cut = nve_drift(prepared_acetate(tmp_path, "electrostatic"), STEPS, tmp_path / "run-cut")
    assert lr["embedding"] == "electrostatic-lr" and lr["charge"] == -1
    assert lr["steps"] == cut["steps"] == STEPS
    p, q = (read_properties(tmp_path / name / "properties.csv") for name in ("run-lr", "run-cut"))
    d_lr, d_cut = p["conserved_kjmol"] - p["conserved_kjmol"][0], q["conserved_kjmol"] - q["conserved_kjmol"][0]
    print(f"\nNVE acetate (-1 e) in {lr['atoms']} atoms, 0.5 fs, {STEPS} steps: conserved-energy drift "
          f"{lr['drift']:+.3f} kJ/mol/ps ({lr['per_atom']:+.2e} per atom) with the long-range term, "
          f"{cut['drift']:+.3f} ({cut['per_atom']:+.2e}) cutoff only; largest difference of the two traces "
          f"{np.abs(d_lr - d_cut).max():.3f} kJ/mol (swing {np.ptp(d_cut):.1f} kJ/mol)")
    assert np.abs(d_lr - d_cut).max() < 3.0                      # kJ/mol
    assert abs(lr["drift"] - cut["drift"]) < 5.0                 # kJ/mol/ps
    # over 0.2 ps the slope is the O–H vibrations filling up (both runs alike); a unit or sign slip gives 1e3+
    assert abs(lr["drift"]) < 60.0                               # kJ/mol/ps

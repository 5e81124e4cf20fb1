"""Uniform-field probe frames (potentials/field_probes.py) and what training makes of them: the capacitor's
field, real PySCF labels whose dipole responds like a polarisability, resumable writing, `[data] extra`,
the dipole as a field derivative, and D3 left out of the fitted energy."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from coupling.schemes import SCHEMES
from potentials import field_probes as FP
from potentials import train as T
from potentials.batches import collate, load_frames
from potentials.core.units import COULOMB_EV_ANGSTROM
from potentials.electrostatics import potential_and_field

ROOT = Path(__file__).resolve().parents[2]
TEST_SET = ROOT / "inputs" / "data" / "test_b3lyp_svp.nc"
TINY = ROOT / "tests" / "data" / "tiny_qmmm.nc"


def test_capacitor_field_is_uniform_across_a_molecule():
    centre = np.array([1.0, -2.0, 0.5])
    for axis, sign in FP.AXES:
        x, q = FP.capacitor(centre, axis, sign, field=0.8, distance=100.0)
        sites = torch.tensor(centre + np.random.default_rng(axis).uniform(-2.0, 2.0, (20, 3)))
        _, e = potential_and_field(sites, torch.tensor(x), torch.tensor(q), k=COULOMB_EV_ANGSTROM)
        want = np.zeros(3)
        want[axis] = 0.8 * sign
        assert np.allclose(e.numpy(), want, atol=2e-3 * 0.8), (axis, sign)
        assert q.sum() == 0.0


def test_probe_frames_are_labelled_resumable_and_polarisable(tmp_path):
    pytest.importorskip("pyscf")
    out = tmp_path / "field.nc"
    assert FP.run(str(TEST_SET), str(out), {"test": 1}, field=1.0, solutes=("HOH",)) == 6    # 6 directions
    assert FP.run(str(TEST_SET), str(out), {"test": 1}, field=1.0, solutes=("HOH",)) == 0    # resumed
    frames = load_frames(out)
    assert {f["kind"] for f in frames} == {"field"} and {f["split"] for f in frames} == {"test"}
    water = {f["frame_id"].rsplit("/", 1)[1]: f for f in frames}
    for k, axis in enumerate("xyz"):
        up, down = water[f"field+{axis}"], water[f"field-{axis}"]
        alpha = (up["dipole"][k] - down["dipole"][k]) / 2.0 * COULOMB_EV_ANGSTROM    # e·Å²/V -> Å³
        assert 0.3 < alpha < 2.0, (axis, alpha)            # B3LYP/def2-SVP water: ~0.8 Å³
        # the QM forces on the two far charges are q times the molecule's field there: tiny
        assert np.abs(up["mm_forces"]).max() < 0.05


def test_extra_datasets_join_training_and_d3_stays_out_of_the_fit(tmp_path):
    raw = {"model": {"preset": "tiny", "config": {"d3": True}},
           "data": {"path": str(TINY), "snapshot": False, "extra": [str(TEST_SET)]},
           "train": {"threads": 1, "progress": False}, "output": {"model": str(tmp_path / "m.pt")}}
    cfg = T.TrainConfig.from_dict(raw, base=tmp_path)
    assert cfg.extra == [str(TEST_SET)]
    splits = T._training_frames(cfg, resume=False)
    n_tiny = len(load_frames(TINY, "train"))
    assert len(splits["train"]) == n_tiny           # the test set has no train frames: nothing joins
    torch.manual_seed(0)
    model = T.build_model(cfg, "cpu").double()
    b = collate(load_frames(TEST_SET, "test")[:6], "cpu", torch.float64)
    pred = T.predict(model, b, SCHEMES.get("electrostatic")())
    out = model(b.numbers, b.positions, b.mol_idx, b.charge)
    assert (out["dispersion"] < 0).all()
    # the fitted energy is the model's minus its D3 term, at the same geometry and field
    from potentials.train import mm_potential_field
    phi, ef = mm_potential_field(b, b.positions, b.mm_positions)
    full = model(b.numbers, b.positions, b.mol_idx, b.charge, phi, ef)
    assert torch.allclose(pred["energy"], full["energy"] - full["dispersion"], atol=1e-10)


def test_training_dipole_is_the_field_derivative(tmp_path):
    """predict's dipole = -dE/dE0 of a uniform field: by finite differences of the energy with phi_i -= F·(r_i -
    centroid) and E_i += F (independent of the autograd route)."""
    torch.manual_seed(1)
    cfg = T.TrainConfig.from_dict({"model": {"preset": "tiny"}, "data": {"path": str(TINY)},
                                   "output": {"model": str(tmp_path / "m.pt")}}, base=tmp_path)
    model = T.build_model(cfg, "cpu").double()
    b = collate(load_frames(TEST_SET, "test")[:3], "cpu", torch.float64)
    scheme = SCHEMES.get("electrostatic")()
    mu = T.predict(model, b, scheme)["dipole"].detach()
    phi, ef = T.mm_potential_field(b, b.positions, b.mm_positions)
    c = torch.zeros(len(b.energy), 3, dtype=torch.float64).index_add_(0, b.mol_idx, b.positions)
    rel = b.positions - (c / b.n_atoms[:, None].to(torch.float64))[b.mol_idx]
    h = 1e-4
    for k in range(3):
        def e(sign):
            f = torch.zeros(3, dtype=torch.float64)
            f[k] = sign * h
            return scheme.network_energy(model, b.numbers, b.positions, b.mol_idx, b.charge,
                                         phi - rel @ f, ef + f)[0].detach()
        fd = -(e(1.0) - e(-1.0)) / (2 * h)
        assert torch.allclose(mu[:, k], fd, atol=1e-6), (k, mu[:, k], fd)


def test_training_feeds_the_damped_field_to_the_polarisation_term(tmp_path):
    """With pol_damping, predict's energy is the network's with efield_pol = E(1 - exp(-(r/a)^3)) summed over
    the MM charges (numpy here), and the field probe's dipole still includes the induced part."""
    torch.manual_seed(2)
    cfg = T.TrainConfig.from_dict({"model": {"preset": "tiny", "config": {"pol_damping": 1.5, "alpha_scale": 2.0}},
                                   "data": {"path": str(TINY)}, "output": {"model": str(tmp_path / "m.pt")}},
                                  base=tmp_path)
    model = T.build_model(cfg, "cpu").double()
    f = [fr for fr in load_frames(TEST_SET, "test") if fr["kind"] == "periodic"][0]
    b = collate([f], "cpu", torch.float64)
    pred = T.predict(model, b, SCHEMES.get("electrostatic")())
    r, x, q = f["positions"], np.asarray(f["mm_positions"], np.float64), np.asarray(f["mm_charges"], np.float64)
    d = r[:, None] - x[None]
    dist = np.linalg.norm(d, axis=-1)
    assert dist.min() < 2.5                                             # a close contact the damping sees
    e_pol = (COULOMB_EV_ANGSTROM * q[None, :, None] * d / dist[..., None] ** 3
             * (1.0 - np.exp(-(dist / 1.5) ** 3))[..., None]).sum(1)
    phi, ef = T.mm_potential_field(b, b.positions, b.mm_positions)
    out = model(b.numbers, b.positions, b.mol_idx, b.charge, phi, ef, efield_pol=torch.tensor(e_pol))
    assert float(pred["energy"][0]) == pytest.approx(float(out["energy"][0]), abs=1e-9)
    bare = model(b.numbers, b.positions, b.mol_idx, b.charge, phi, ef)
    assert abs(float(bare["energy"][0] - out["energy"][0])) > 1e-4      # the damping matters for this frame

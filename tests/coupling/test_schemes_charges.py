"""The ``model-charges`` scheme (coupling/schemes_charges.py): a model's own charges q(R), predicted at every
step, couple to the MM charges in the ML client: E = E_model + sum_i q_i(R) phi_i. Checked with a float64 toy
model whose charges depend on the geometry: the energy against a direct Coulomb sum, the forces on ML and MM
atoms against finite differences (through dq/dR and the switched embedding), the MM client's system against the
bookkeeping check, and the refusals (a model without charges; our field-aware network)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from coupling.bookkeeping import check_split
from coupling.embedding import MMEnvironment
from coupling.ml_engine import MLEngine
from coupling.mmsystem import mlmm_mm_system, mm_charges
from coupling.schemes import SCHEMES
from potentials.adapter_base import ForeignAdapter
from potentials.core.errors import SetupError
from potentials.core.units import COULOMB_KJMOL_NM

ROOT = Path(__file__).resolve().parents[2]
F64 = torch.float64


class ToyCharges(ForeignAdapter):
    """E = 50 sum_i |r_i - centroid|^2 (kJ/mol, nm); q_i = Q/n + 0.05 (s_i - mean s), s_i = sum_j exp(-r_ij^2 /
    0.02 nm^2): charges that move with the geometry and sum to the zone's charge."""

    architecture, family = "test-toy-charges", "toy"
    predicts_charges = supports_charge = True

    def __init__(self, with_charges: bool = True, frozen: bool = False):
        super().__init__(torch.nn.Identity(), range(1, 20), "cpu", F64)
        self.with_charges, self.frozen = with_charges, frozen

    def forward(self, numbers, positions, mol_idx, charge, phi, field):
        r, b = positions.to(F64), charge.shape[0]
        same = (mol_idx[:, None] == mol_idx[None, :]).to(F64)
        s = (torch.exp(-((r[:, None] - r[None]) ** 2).sum(-1) / 0.02) * same).sum(1)
        count = torch.bincount(mol_idx, minlength=b).to(F64)
        mean_s = torch.zeros(b, dtype=F64).index_add(0, mol_idx, s) / count
        q = 0.05 * (s - mean_s[mol_idx]) + (charge.to(F64) / count)[mol_idx]
        q = q.detach() if self.frozen else q
        centre = torch.zeros(b, 3, dtype=F64).index_add(0, mol_idx, r) / count[:, None]
        e = torch.zeros(b, dtype=F64).index_add(0, mol_idx, 50.0 * ((r - centre[mol_idx]) ** 2).sum(1))
        return {"energy": e, "charges": q, "terms": {}} if self.with_charges else {"energy": e, "terms": {}}


def _engine(case, model, cutoff: float, switch: float) -> MLEngine:
    residues = np.array([a.residue.index for a in case.topology.atoms()])
    env = MMEnvironment(mm_charges(case.system), residues, case.ml, cutoff=cutoff, switch_width=switch)
    return MLEngine(model, case.numbers(), case.charge, env, mode="model-charges", periodic=False, skin=0.0)


def test_energy_is_the_model_plus_its_charges_in_the_mm_potential(cluster):
    """Every water inside the cutoff: the coupling term is the plain Coulomb sum of q_i(R) with all MM charges."""
    engine = _engine(cluster, ToyCharges(), cutoff=4.0, switch=0.2)
    res = engine.compute(cluster.positions[None])[0]
    ml, pos = cluster.ml, cluster.positions
    toy = ToyCharges()
    n = len(ml)
    out = toy.forward(torch.as_tensor(cluster.numbers()), torch.tensor(pos[ml]), torch.zeros(n, dtype=torch.long),
                      torch.tensor([float(cluster.charge)]), None, None)
    q = out["charges"].numpy()
    assert abs(q.sum() - cluster.charge) < 1e-12 and np.ptp(q) > 0.01
    mm = np.setdiff1d(np.arange(len(pos)), ml)
    qm = mm_charges(cluster.system)[mm]
    phi = COULOMB_KJMOL_NM * (qm[None] / np.linalg.norm(pos[ml][:, None] - pos[mm][None], axis=-1)).sum(1)
    coulomb = float(q @ phi)
    assert res.extras["ml.energy"]["ml_mm_coulomb"] == pytest.approx(coulomb, rel=1e-10)
    assert res.energy == pytest.approx(float(out["energy"][0]) + coulomb, rel=1e-10)
    assert abs(coulomb) > 10.0                                     # a real interaction (kJ/mol), not a zero


def test_forces_are_the_gradient_through_the_charges_and_the_switch(cluster):
    """Central finite differences of the ML client's energy for ML atoms and MM atoms, some in the switching
    shell; dq/dR matters (the forces with the charges held fixed differ)."""
    engine = _engine(cluster, ToyCharges(), cutoff=0.9, switch=0.3)
    pos = cluster.positions
    f = engine.compute(pos[None])[0].forces
    ml = cluster.ml
    dist = np.linalg.norm(pos[:, None] - pos[ml][None], axis=-1).min(1)
    shell = np.flatnonzero((dist > 0.62) & (dist < 0.85))
    atoms = [int(ml[0]), int(ml[5]), int(ml[-1]), int(np.argmin(np.where(np.isin(np.arange(len(pos)), ml), 9, dist))),
             int(shell[0]), int(shell[len(shell) // 2])]
    h = 1e-5
    for i in atoms:
        for k in range(3):
            e = []
            for sgn in (1, -1):
                p = pos.copy()
                p[i, k] += sgn * h
                e.append(_engine(cluster, ToyCharges(), 0.9, 0.3).compute(p[None])[0].energy)
            assert -(e[0] - e[1]) / (2 * h) == pytest.approx(f[i, k], rel=1e-5, abs=1e-4), (i, k)
    frozen = _engine(cluster, ToyCharges(frozen=True), cutoff=0.9, switch=0.3).compute(pos[None])[0].forces
    assert np.abs(f[ml] - frozen[ml]).max() > 1.0                 # kJ/mol/nm: the dq/dR part
    np.testing.assert_allclose(np.delete(f, ml, 0), np.delete(frozen, ml, 0), rtol=1e-12, atol=1e-9)


def test_mm_side_and_bookkeeping(cluster):
    scheme = SCHEMES.get("model-charges")()
    mm = mlmm_mm_system(cluster.system, cluster.ml, scheme, None)
    check_split(mm, cluster.ml, scheme, full_system=cluster.system)
    assert not np.any(mm_charges(mm)[cluster.ml])
    owners = dict((t.term, t.owner) for t in scheme.terms())
    assert owners["ML–MM Coulomb"].startswith("ML")


def test_refusals_are_one_line(cluster):
    with pytest.raises(SetupError, match="predicts atomic charges"):
        _engine(cluster, ToyCharges(with_charges=False), 0.9, 0.3).compute(cluster.positions[None])
    from potentials.network import EmbeddedAIMNet2, ModelConfig

    net = EmbeddedAIMNet2(ModelConfig.from_toml(ROOT / "inputs/models/configs/tiny.toml", elements=[1, 6, 7, 8, 11]),
                          seed=0).double()
    with pytest.raises(SetupError, match="electrostatic"):
        _engine(cluster, net, 0.9, 0.3).compute(cluster.positions[None])


def test_aimnet2_in_the_model_charges_scheme(water_box, tmp_path):
    """A fresh AIMNet2 model (the aimnet package) in the scheme: the ML client's energy is the model's vacuum
    energy plus the coupling term it reports, and the MM atoms near the zone feel forces."""
    import importlib.util

    if importlib.util.find_spec("aimnet") is None:
        pytest.skip("aimnet is not installed")
    from model_builders import build_aimnet2
    from potentials.adapters import load_adapter

    adapter = load_adapter(build_aimnet2(tmp_path))
    residues = np.array([a.residue.index for a in water_box.topology.atoms()])
    env = MMEnvironment(mm_charges(water_box.system), residues, water_box.ml, cutoff=1.0, switch_width=0.2)
    pos, box = water_box.positions[None], water_box.box[None]
    coupled = MLEngine(adapter, water_box.numbers(), 0, env, mode="model-charges").compute(pos, box)[0]
    vacuum = MLEngine(adapter, water_box.numbers(), 0, env, mode="mechanical").compute(pos, box)[0]
    term = coupled.extras["ml.energy"]["ml_mm_coulomb"]
    assert abs(term) > 1.0 and coupled.energy == pytest.approx(vacuum.energy + term, abs=1e-6)
    mm = np.setdiff1d(np.arange(len(water_box.positions)), water_box.ml)
    assert np.all(np.isfinite(coupled.forces)) and np.abs(coupled.forces[mm]).max() > 1.0
    assert not np.any(vacuum.forces[mm])
    np.testing.assert_allclose(coupled.extras["ml.charges"], vacuum.extras["ml.charges"], atol=1e-6)

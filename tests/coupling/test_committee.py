"""Committees (potentials/committee.py, coupling/committee_spread.py): the file round-trips weights-only, the
committee's energy and forces are the mean of its members' (each run alone through the same engine), and its
spread is the members' standard deviation. Real parts: tiny random networks, a TIP3P water cluster."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from coupling.embedding import MMEnvironment
from coupling.ml_engine import MLEngine
from coupling.mmsystem import mm_charges
from potentials.adapters import EmbeddedAIMNet2Adapter, load_adapter
from potentials.committee import COMMITTEE, CommitteeAdapter, load_committee, save_committee
from potentials.core.errors import SetupError
from potentials.model_io import save_model
from potentials.network import EmbeddedAIMNet2, ModelConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "driver"))
from run_helpers import tip3p_waters  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "inputs" / "models" / "configs" / "tiny.toml"


def tiny(seed: int) -> EmbeddedAIMNet2:
    net = EmbeddedAIMNet2(ModelConfig.from_toml(TINY), seed=seed).double()
    net.metadata = {"training": {"seed": seed}, "embedding": {"scheme": "electrostatic", "cutoff_nm": 0.9,
                                                              "switch_nm": 0.3}}
    return net


@pytest.fixture(scope="module")
def waters():
    """Six flexible TIP3P waters (no box): positions (nm), MM charges, residue of each atom, atomic numbers."""
    topology, system, pos = tip3p_waters(6, 1.2)
    residues = np.array([a.residue.index for a in topology.atoms()])
    numbers = np.array([a.element.atomic_number for a in topology.atoms()])
    return pos, mm_charges(system), residues, numbers


def engine(model, waters, mode="electrostatic"):
    pos, charges, residues, numbers = waters
    ml = np.arange(3)
    env = MMEnvironment(charges, residues, ml, cutoff=0.9, switch_width=0.3)
    return MLEngine(model, numbers[ml], 0, env, mode=mode, periodic=False)


def batch(waters):
    pos = waters[0]
    rng = np.random.default_rng(3)
    return np.stack([pos, pos + rng.normal(scale=0.005, size=pos.shape)])


def test_file_round_trips_weights_only(tmp_path):
    nets = [tiny(1), tiny(2)]
    path = tmp_path / "c.pt"
    save_committee(path, nets, {"note": "test"})
    d = torch.load(path, weights_only=True)                   # no pickled code: plain tensors and containers
    assert d["architecture"] == COMMITTEE and len(d["members"]) == 2
    assert d["metadata"]["committee"]["seeds"] == [1, 2] and d["metadata"]["note"] == "test"
    assert d["metadata"]["embedding"]["scheme"] == "electrostatic"        # member 0's, for the start-up checks
    back = load_committee(path)
    for net, got in zip(nets, back):
        for (k, v), w in zip(net.state_dict().items(), got.state_dict().values()):
            assert torch.equal(v, w), k
    adapter = load_adapter(path)                                # detected from the file like any model
    assert isinstance(adapter, CommitteeAdapter) and adapter.n_members == 2
    assert adapter.metadata["committee"]["n_members"] == 2 and adapter.field_inputs
    with pytest.raises(SetupError, match="another architecture"):
        other = EmbeddedAIMNet2(ModelConfig.from_dict({**ModelConfig.from_toml(TINY).to_dict(), "aim_size": 8}))
        save_committee(tmp_path / "bad.pt", [nets[0], other])


def test_identical_members_give_the_member_and_zero_spread(tmp_path, waters):
    net = tiny(5)
    save_model(tmp_path / "one.pt", net)
    save_committee(tmp_path / "three.pt", [net, net, net])
    x = batch(waters)
    alone = engine(load_adapter(tmp_path / "one.pt"), waters).compute(x)
    both = engine(load_adapter(tmp_path / "three.pt"), waters).compute(x)
    for a, c in zip(alone, both):
        assert c.energy == pytest.approx(a.energy, rel=1e-12, abs=1e-9)
        np.testing.assert_allclose(c.forces, a.forces, rtol=1e-10, atol=1e-9)
        np.testing.assert_allclose(c.extras["ml.charges"], a.extras["ml.charges"], atol=1e-12)
        assert c.extras["ml.committee"] == {"energy_std": pytest.approx(0.0, abs=1e-9),
                                            "force_std_max": pytest.approx(0.0, abs=1e-8), "n_members": 3}
        assert "ml.committee" not in a.extras and "ml.uncertainty" not in a.extras
        assert c.extras["ml.uncertainty"] == [c.extras["ml.committee"]["energy_std"],
                                              c.extras["ml.committee"]["force_std_max"]]


@pytest.mark.parametrize("mode", ["electrostatic", "electrostatic-torch", "mechanical"])
def test_mean_and_spread_of_different_members(waters, mode, monkeypatch):
    if mode == "electrostatic-torch":           # the field's torch path (as on CUDA) instead of the CPU kernels
        from coupling.embedding import EmbeddingField

        monkeypatch.setattr(EmbeddingField.__init__, "__defaults__", ("cpu", False))
        mode = "electrostatic"
    nets = [tiny(s) for s in (11, 12, 13)]
    x = batch(waters)
    alone = [engine(EmbeddedAIMNet2Adapter(n), waters, mode).compute(x) for n in nets]
    committee = engine(CommitteeAdapter(nets), waters, mode).compute(x)
    for b, c in enumerate(committee):
        e = np.array([r[b].energy for r in alone])
        f = np.stack([r[b].forces for r in alone])                          # (K, N, 3)
        assert c.energy == pytest.approx(e.mean(), rel=1e-12, abs=1e-9)
        np.testing.assert_allclose(c.forces, f.mean(axis=0), rtol=1e-9, atol=1e-8)
        np.testing.assert_allclose(c.virial, np.mean([r[b].virial for r in alone], axis=0), rtol=1e-9, atol=1e-8)
        spread = c.extras["ml.committee"]
        assert spread["n_members"] == 3
        assert spread["energy_std"] == pytest.approx(e.std(), rel=1e-9)
        ml = f[:, :3]                                                        # the ML atoms' forces
        per_atom = np.sqrt(((ml - ml.mean(axis=0)) ** 2).sum(axis=-1).mean(axis=0))
        assert spread["force_std_max"] == pytest.approx(per_atom.max(), rel=1e-8)
        assert spread["energy_std"] > 0 and spread["force_std_max"] > 0


def test_evaluated_committee_is_the_mean_of_its_members_without_d3(tmp_path):
    """`mlmm evaluate` / `mlmm learn`'s held-out errors see a committee as its members' mean, with what a single
    network gets: the D3 term left out of the comparison with DFT labels and the damped field for the polarisation
    term. Members fine-tuned from the shipped network carry both; before, the committee's energy kept D3 (an
    error of several kcal/mol)."""
    from coupling.schemes import SCHEMES
    from driver.pipeline import evaluated_model
    from potentials.batches import collate, load_frames
    from potentials.train import predict

    cfg = ModelConfig.from_dict({**ModelConfig.from_toml(TINY).to_dict(), "d3": True, "pol_damping": 1.18,
                                 "d3_params": {"s6": 1.0, "s8": 1.9889, "a1": 0.3981, "a2": 4.4211}})
    members = []
    for seed in (1, 2):
        net = EmbeddedAIMNet2(cfg, seed=seed).double()
        net.metadata = {"training": {"seed": seed}, "embedding": {"scheme": "electrostatic", "cutoff_nm": 1.2,
                                                                  "switch_nm": 0.2}}
        members.append(net)
    save_committee(tmp_path / "c.pt", members)
    model, _ = evaluated_model(str(tmp_path / "c.pt"), "cpu")
    frames = [f for f in load_frames(ROOT / "tests" / "data" / "tiny_qmmm.nc", "all") if len(f["mm_charges"])][:4]
    b = collate(frames, "cpu", torch.float64)
    scheme = SCHEMES.get("electrostatic")()
    got = predict(model, b, scheme)
    each = [predict(m, b, scheme) for m in members]
    for key in ("energy", "forces", "mm_forces"):
        want = torch.stack([e[key] for e in each]).mean(0)
        assert torch.allclose(got[key], want, rtol=1e-9, atol=1e-9), (key, float((got[key] - want).abs().max()))
    assert float(members[0](b.numbers, b.positions, b.mol_idx, b.charge)["dispersion"].abs().max()) > 1e-4

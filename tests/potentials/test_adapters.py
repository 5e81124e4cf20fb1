"""The model-adapter seam: the adapter is the network plus unit conversion (nm, kJ/mol <-> Å, eV), refuses
zones it cannot describe in one line, and model files are dispatched by their ``architecture`` entry."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from potentials.adapters import MODELS, EmbeddedAIMNet2Adapter, NetworkAdapter, adapt, load_adapter
from potentials.core.errors import SetupError
from potentials.core.units import ANGSTROM_PER_NM, EV_PER_KJMOL, KJMOL_PER_EV, NM_PER_ANGSTROM
from potentials.model_io import load_model

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "inputs" / "models" / "small_b3lyp_svp.pt"
F64 = torch.float64

WATER = [(8, (0.0, 0.0, 0.0)), (1, (0.9572, 0.0, 0.0)), (1, (-0.2400, 0.9266, 0.0))]                  # Å
METHANOL = [(6, (-0.0465, 0.6626, 0.0)), (8, (-0.0465, -0.7570, 0.0)), (1, (-1.0919, 0.9726, 0.0)),
            (1, (0.4432, 1.0700, 0.8920)), (1, (0.4432, 1.0700, -0.8920)), (1, (0.8754, -1.0457, 0.0))]


@pytest.fixture(scope="module")
def batch():
    """Water and methanol as two structures of one batch, in the engine's units, with a random MM field."""
    atoms = WATER + METHANOL
    numbers = torch.tensor([z for z, _ in atoms])
    pos_nm = torch.tensor([r for _, r in atoms], dtype=F64) * NM_PER_ANGSTROM
    mol_idx = torch.tensor([0] * len(WATER) + [1] * len(METHANOL))
    g = torch.Generator().manual_seed(3)
    phi = torch.randn(len(atoms), generator=g, dtype=F64) * 50.0             # kJ/mol/e (~0.5 V)
    field = torch.randn(len(atoms), 3, generator=g, dtype=F64) * 300.0       # kJ/mol/e/nm (~0.3 V/Å)
    return numbers, pos_nm, mol_idx, torch.zeros(2, dtype=F64), phi, field


def test_adapter_is_the_network_in_engine_units(batch):
    numbers, pos_nm, mol_idx, charge, phi, field = batch
    adapter = load_adapter(SHIPPED)
    assert isinstance(adapter, EmbeddedAIMNet2Adapter) and adapter.architecture == "embedded-aimnet2"
    assert adapter.elements == (1, 6, 7, 8) and adapter.field_inputs and adapter.predicts_charges
    assert adapter.dtype == F64 and adapter.device == torch.device("cpu")
    assert adapter.metadata["n_train"] > 0 and isinstance(adapter.module, torch.nn.Module)
    # the adapter, in nm / kJ/mol
    x, p, e = (t.clone().requires_grad_(True) for t in (pos_nm, phi, field))
    out = adapter.forward(numbers, x, mol_idx, charge, p, e)
    g_x, g_p, g_e = torch.autograd.grad(out["energy"].sum(), (x, p, e))
    # the raw network, in Å / eV / V; its energy converted to kJ/mol BEFORE differentiating, as the engine always
    # did: the float32 part of the backward pass then rounds exactly as behind the adapter
    net = load_model(SHIPPED)
    xa = (pos_nm * ANGSTROM_PER_NM).requires_grad_(True)
    pv = (phi * EV_PER_KJMOL).requires_grad_(True)
    ev = (field * (EV_PER_KJMOL * NM_PER_ANGSTROM)).requires_grad_(True)
    ref = net(numbers, xa, mol_idx, charge, pv, ev)
    ref_kj = ref["energy"].to(F64) * KJMOL_PER_EV
    r_x, r_p, r_e = torch.autograd.grad(ref_kj.sum(), (xa, pv, ev))
    assert out["energy"].dtype == F64 and out["energy"].shape == (2,)
    torch.testing.assert_close(out["energy"], ref_kj.detach(), rtol=0, atol=0)
    # d/d(nm) = d/d(Å) * ANGSTROM_PER_NM; d/d(kJ/mol/e) = d/dV * EV_PER_KJMOL; fields likewise
    torch.testing.assert_close(g_x, r_x * ANGSTROM_PER_NM, rtol=1e-14, atol=0)
    torch.testing.assert_close(g_p, r_p * EV_PER_KJMOL, rtol=1e-14, atol=0)
    torch.testing.assert_close(g_e, r_e * (EV_PER_KJMOL * NM_PER_ANGSTROM), rtol=1e-14, atol=0)
    torch.testing.assert_close(out["charges"].detach(), ref["charges"].detach(), rtol=0, atol=0)
    q_out = out["charges"].detach()
    assert abs(float(q_out[:3].sum())) < 1e-12 and abs(float(q_out[3:].sum())) < 1e-12
    # per-structure energy terms, in kJ/mol; per-atom outputs are not terms
    assert {"local", "coulomb", "external", "polarisation"} <= set(out["terms"])
    assert not {"energy", "charges", "atomic_energies", "polarisability"} & set(out["terms"])
    for k, v in out["terms"].items():
        torch.testing.assert_close(v.detach(), ref[k].detach().to(F64) * KJMOL_PER_EV, rtol=1e-13, atol=1e-9)
    # vacuum charges: the network's charges with phi = E = 0, summing to the zone's charge
    q = adapter.vacuum_charges(numbers[3:].numpy(), pos_nm[3:].numpy(), 0)
    with torch.no_grad():
        vac = net(numbers[3:], pos_nm[3:] * ANGSTROM_PER_NM, torch.zeros(6, dtype=torch.long),
                  torch.zeros(1, dtype=F64), torch.zeros(6, dtype=F64), torch.zeros(6, 3, dtype=F64))
    np.testing.assert_allclose(q, vac["charges"].numpy(), rtol=0, atol=1e-7)
    assert isinstance(q, np.ndarray) and abs(q.sum()) < 1e-6


def test_check_zone_refuses_unknown_elements_in_one_line():
    adapter = load_adapter(SHIPPED)
    adapter.check_zone([8, 1, 1, 6], 0)
    adapter.check_zone([8, 1, 1], -1)                        # charge equilibration: any net charge
    with pytest.raises(SetupError, match=r"model file m\.pt: cannot describe the ML zone: .*Fe \(Z=26\)") as exc:
        adapter.check_zone(np.array([8, 1, 1, 26]), 0, where="model file m.pt")
    assert "\n" not in str(exc.value)

    class NeutralOnly(torch.nn.Module):
        supports_charge = False

        def forward(self, numbers, positions, mol_idx, charge, phi, efield):
            raise AssertionError("not called")

    generic = adapt(NeutralOnly())
    assert isinstance(generic, NetworkAdapter) and not generic.supports_charge
    generic.check_zone([8, 1, 1], 0)
    with pytest.raises(SetupError, match="neutral molecules only.*charge \\+1 e"):
        generic.check_zone([8, 1, 1], 1)


class _DummyAdapter:
    """A stand-in architecture: reads its own file format, predicts a harmonic energy."""

    architecture = "dummy-test-arch"
    predicts_charges = False
    field_inputs = False
    supports_charge = True
    dtype = F64

    def __init__(self, k: float, device):
        self.k, self.device, self.elements, self.metadata = k, device, (1, 8), {}

    @classmethod
    def load(cls, path, device="cpu", contents=None):
        contents = contents if contents is not None else torch.load(path, weights_only=True)
        return cls(float(contents["k"]), device)


def test_load_adapter_dispatches_on_the_architecture_key(tmp_path):
    path = tmp_path / "dummy.pt"
    torch.save({"architecture": "dummy-test-arch", "k": torch.tensor(2.5)}, path)
    with pytest.raises(SetupError, match=r"dummy\.pt: unknown model architecture 'dummy-test-arch'; known: .*"
                                         r"embedded-aimnet2"):
        load_adapter(path)
    MODELS.register("dummy-test-arch", _DummyAdapter)
    try:
        adapter = load_adapter(path)
        assert isinstance(adapter, _DummyAdapter) and adapter.k == 2.5
        assert adapter.device == torch.device("cpu")
        # model_type forces an architecture: its adapter reads the file itself
        assert load_adapter(path, model_type="dummy-test-arch").k == 2.5
    finally:
        MODELS.unregister("dummy-test-arch")
    assert "dummy-test-arch" not in MODELS
    with pytest.raises(SetupError, match="unknown model architecture 'nope'"):
        load_adapter(SHIPPED, model_type="nope")


def test_adapt_and_compile_fallback(batch, monkeypatch):
    numbers, pos_nm, mol_idx, charge, phi, field = batch
    net = load_model(SHIPPED)
    adapter = adapt(net)
    assert isinstance(adapter, EmbeddedAIMNet2Adapter) and adapt(adapter) is adapter
    assert not any(p.requires_grad for p in net.parameters()) and not net.training
    with pytest.raises(SetupError, match="neither a model adapter nor a torch module"):
        adapt(object())
    eager = adapter.forward(numbers, pos_nm, mol_idx, charge, phi, field)["energy"]

    def broken(*args, **kwargs):
        raise RuntimeError("inductor cannot build this graph\nsecond line")

    monkeypatch.setattr(torch, "compile", lambda module, dynamic=False: broken)
    adapter.compile()
    assert adapter.compiled
    again = adapter.forward(numbers, pos_nm, mol_idx, charge, phi, field)["energy"]
    assert not adapter.compiled and torch.equal(again, eager)

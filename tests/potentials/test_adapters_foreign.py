"""Other packages' potentials behind the adapter seam (potentials/adapters_mace.py, adapters_aimnet.py): the family
is detected from the file without unpickling it, only a recognised MACE pickle is unpickled, importing mace
does not weaken the loading of our own files, and each adapter gives its package's own calculator's energy and
forces (in nm / kJ/mol) for single and batched structures, neutral and charged."""
from __future__ import annotations

import importlib.util
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from model_builders import build_aimnet2, build_ani, build_mace
from potentials.adapters import load_adapter, weights_architecture
from potentials.core import units
from potentials.core.errors import SetupError
from potentials.core.units import EV_PER_ANGSTROM_PER_KJMOL_PER_NM, EV_PER_KJMOL, NM_PER_ANGSTROM
from potentials.model_formats import classify
from potentials.model_io import read_model_file

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "inputs" / "models" / "small_b3lyp_svp.pt"
ENV = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"

# ethanol (Å), slightly distorted
ETHANOL_Z = np.array([6, 6, 8, 1, 1, 1, 1, 1, 1])
ETHANOL = np.array([[1.168, -0.400, 0.0], [0.0, 0.559, 0.0], [-1.190, -0.230, 0.0], [-1.950, 0.390, 0.02],
                    [2.120, 0.140, 0.01], [1.110, -1.040, 0.888], [1.110, -1.050, -0.880],
                    [0.040, 1.200, 0.890], [0.050, 1.210, -0.880]])


def require(package: str) -> None:
    """Skip without ``package`` (found, not imported: ``import mace`` would change this process's torch.load)."""
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} is not installed")


@pytest.fixture(scope="module")
def mace_file(tmp_path_factory):
    require("mace")
    return build_mace(tmp_path_factory.mktemp("mace") / "small.model")


@pytest.fixture(scope="module")
def aimnet_file(tmp_path_factory):
    require("aimnet")
    return build_aimnet2(tmp_path_factory.mktemp("aimnet"))


@pytest.fixture
def mace_calculator(monkeypatch):
    """mace's ASE calculator; what importing it and running it change process-wide (the torch.load environment
    variable, torch's default dtype) is undone after the test."""
    monkeypatch.setenv(ENV, "1")                 # MACECalculator loads the model with a bare torch.load
    saved = torch.get_default_dtype()
    from mace.calculators import MACECalculator

    yield MACECalculator
    torch.set_default_dtype(saved)


class _Marker:
    """Unpickling this creates a file: proof that code from the file ran."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def _batch(xyz_a: np.ndarray, numbers, copies: int):
    """``copies`` structures (second and later shifted by 1 nm each) as the engine hands them over."""
    x = torch.tensor(xyz_a * NM_PER_ANGSTROM, requires_grad=True)
    n = len(numbers)
    pos = torch.cat([x + k for k in range(copies)])
    return (x, torch.tensor(np.tile(numbers, copies)), pos, torch.arange(copies).repeat_interleave(n),
            torch.zeros(n * copies, dtype=torch.float64), torch.zeros(n * copies, 3, dtype=torch.float64))


# ------------------------------------------------------------------------------------------------ detection
def test_family_detected_without_unpickling(mace_file, aimnet_file, tmp_path):
    assert classify(mace_file).kind == "pickle" and classify(mace_file).family == "mace"
    assert classify(SHIPPED).kind == "weights" and classify(aimnet_file).kind == "weights"
    assert weights_architecture(read_model_file(aimnet_file)) == "aimnet2"
    assert weights_architecture(read_model_file(SHIPPED)) == "embedded-aimnet2"
    # a legacy (pre-zip) torch.save of a MACE model is recognised too
    legacy = tmp_path / "legacy.model"
    torch.save(torch.load(mace_file, weights_only=False), legacy, _use_new_zipfile_serialization=False)
    assert classify(legacy).family == "mace"
    (tmp_path / "junk.pt").write_text("not a model")
    with pytest.raises(SetupError, match="neither a torch file"):
        load_adapter(tmp_path / "junk.pt")


def test_unknown_pickles_are_not_unpickled(tmp_path, monkeypatch):
    """A pickle of no known family is refused without running it, even with mace's environment variable set,
    and read_model_file (our files) stays weights-only under it."""
    monkeypatch.setenv(ENV, "1")
    marker = tmp_path / "ran"
    torch.save({"architecture": "embedded-aimnet2", "x": _Marker(marker)}, tmp_path / "evil.pt")
    with pytest.raises(SetupError, match="no known model family"):
        load_adapter(tmp_path / "evil.pt")
    with pytest.raises(SetupError, match="cannot be read"):
        read_model_file(tmp_path / "evil.pt")
    with open(tmp_path / "os.pt", "wb") as fh:                   # a classic: os.system on load
        pickle.dump({"x": _OsSystem()}, fh, protocol=2)
    with pytest.raises(SetupError, match="refused"):
        load_adapter(tmp_path / "os.pt")
    assert not marker.exists()


class _OsSystem:
    def __reduce__(self):
        return (os.system, ("true",))


def test_importing_mace_keeps_our_loading_weights_only(tmp_path):
    """`import mace` sets TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1; the adapter module restores it. Checked in a fresh
    process (this one may have imported mace already): after loading a MACE file the variable is unset and a
    bare torch.load refuses a pickle with code."""
    require("mace")
    marker = tmp_path / "ran"
    torch.save({"x": _Marker(marker)}, tmp_path / "evil.pt")
    code = f"""
import os, sys, torch
sys.path.insert(0, {str(ROOT / 'tests')!r})
from model_builders import build_mace
from potentials.adapters import load_adapter
load_adapter(build_mace({str(tmp_path / 'm.model')!r}), 'cpu')
assert os.environ.get({ENV!r}) is None, os.environ.get({ENV!r})
import mace, mace.modules   # already imported: no second change
try:
    torch.load({str(tmp_path / 'evil.pt')!r})
except Exception as exc:
    print('refused', type(exc).__name__)
"""
    env = {k: v for k, v in os.environ.items() if k != ENV}
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "refused" in res.stdout and not marker.exists()


# ------------------------------------------------------------------------------------------------ MACE
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_mace_adapter_matches_mace_calculator(mace_file, dtype, mace_calculator):
    from ase import Atoms

    MACECalculator = mace_calculator

    adapter = load_adapter(mace_file, "cpu", dtype=dtype)
    assert adapter.architecture == "mace" and adapter.elements == (1, 6, 7, 8)
    assert adapter.compute_dtype == getattr(torch, dtype) and not adapter.field_inputs
    x, numbers, pos, mol, phi, field = _batch(ETHANOL, ETHANOL_Z, 2)
    out = adapter.forward(numbers, pos, mol, torch.zeros(2, dtype=torch.float64), phi, field)
    g, = torch.autograd.grad(out["energy"].sum(), x)
    atoms = Atoms(numbers=ETHANOL_Z, positions=ETHANOL)
    atoms.calc = MACECalculator(model_paths=str(mace_file), device="cpu", default_dtype=dtype)
    e_ref, f_ref = atoms.get_potential_energy(), atoms.get_forces()
    tol_e, tol_f = (1e-9, 1e-9) if dtype == "float64" else (1e-5 * len(ETHANOL_Z), 1e-4)
    assert out["energy"].dtype == torch.float64
    np.testing.assert_allclose(out["energy"].detach().numpy() * EV_PER_KJMOL, [e_ref, e_ref], rtol=0, atol=tol_e)
    f = -g.numpy() / 2 * EV_PER_ANGSTROM_PER_KJMOL_PER_NM                 # both copies moved with x
    np.testing.assert_allclose(f, f_ref, rtol=0, atol=tol_f)


def test_mace_refuses_an_element_in_one_line(mace_file):
    adapter = load_adapter(mace_file, "cpu", model_type="mace")
    with pytest.raises(SetupError) as err:
        adapter.check_zone([6, 1, 16, 8], 0, where="m.model")
    assert str(err.value).count("\n") == 0 and "element S (Z=16)" in str(err.value)
    with pytest.raises(SetupError, match="neutral zones only"):
        adapter.check_zone([6, 1], -1, where="m.model")
    with pytest.raises(SetupError, match="predicts no atomic charges"):
        adapter.vacuum_charges([6, 1], np.zeros((2, 3)), 0)


# ------------------------------------------------------------------------------------------------ AIMNet2
@pytest.mark.parametrize("charge", [0, 1])
def test_aimnet2_adapter_matches_its_calculator(aimnet_file, charge):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from aimnet.calculators import AIMNet2Calculator

    adapter = load_adapter(aimnet_file, "cpu")
    assert adapter.architecture == "aimnet2" and adapter.predicts_charges and adapter.supports_charge
    assert adapter.elements == (1, 6, 7, 8, 16)
    x, numbers, pos, mol, phi, field = _batch(ETHANOL, ETHANOL_Z, 2)
    out = adapter.forward(numbers, pos, mol, torch.full((2,), float(charge), dtype=torch.float64), phi, field)
    g_e, = torch.autograd.grad(out["energy"].sum(), x, retain_graph=True)
    g_q, = torch.autograd.grad((out["charges"][:9] * torch.arange(9.0)).sum(), x)
    assert torch.isfinite(g_q).all() and float(g_q.abs().max()) > 0          # charges depend on positions
    calc = AIMNet2Calculator(model=load_adapter(aimnet_file, "cpu").module, device="cpu")
    ref = calc({"coord": torch.tensor(ETHANOL), "numbers": torch.tensor(ETHANOL_Z),
                "charge": torch.tensor([float(charge)])}, forces=True)
    np.testing.assert_allclose(out["energy"].detach().numpy() * EV_PER_KJMOL, [float(ref["energy"])] * 2,
                               rtol=0, atol=1e-5 * 9)
    f = -g_e.numpy() / 2 * EV_PER_ANGSTROM_PER_KJMOL_PER_NM
    np.testing.assert_allclose(f, ref["forces"].detach().numpy(), rtol=0, atol=1e-4)
    q = out["charges"].detach().numpy()
    np.testing.assert_allclose(q[:9], ref["charges"].detach().numpy(), rtol=0, atol=1e-5)
    assert abs(q[:9].sum() - charge) < 1e-2
    vac = adapter.vacuum_charges(ETHANOL_Z, ETHANOL * NM_PER_ANGSTROM, charge)
    np.testing.assert_allclose(vac, ref["charges"].detach().numpy(), rtol=0, atol=1e-5)


def test_aimnet2_refuses_float64_and_unknown_elements(aimnet_file):
    with pytest.raises(SetupError, match="float32"):
        load_adapter(aimnet_file, "cpu", dtype="float64")
    with pytest.raises(SetupError, match=r"element Cl \(Z=17\)"):
        load_adapter(aimnet_file, "cpu").check_zone([6, 17], 0)


# ------------------------------------------------------------------------------------------------ ANI
@pytest.fixture(scope="module")
def ani_files(tmp_path_factory):
    require("torchani")
    return build_ani(tmp_path_factory.mktemp("ani"))


@pytest.mark.parametrize("which", ["pickle", "torchscript", "ani2x"])
def test_ani_adapter_matches_torchani(ani_files, which):
    """Pickled model, TorchScript archive and the released ANI-2x weights file: TorchANI's own ASE calculator's
    energy and forces."""
    from ase import Atoms

    assert classify(ani_files[which]).kind == {"pickle": "pickle", "torchscript": "torchscript",
                                               "ani2x": "weights"}[which]
    adapter = load_adapter(ani_files[which], "cpu", dtype="float64")
    assert adapter.architecture == "ani" and not adapter.predicts_charges and not adapter.supports_charge
    module = ani_files["modules"]["ani2x" if which == "ani2x" else "small"]
    assert adapter.elements == tuple(sorted(int(z) for z in module.atomic_numbers))
    x, numbers, pos, mol, phi, field = _batch(ETHANOL, ETHANOL_Z, 2)
    out = adapter.forward(numbers, pos, mol, torch.zeros(2, dtype=torch.float64), phi, field)
    g, = torch.autograd.grad(out["energy"].sum(), x)
    atoms = Atoms(numbers=ETHANOL_Z, positions=ETHANOL)
    atoms.calc = module.to(torch.float64).ase()
    e_ref, f_ref = atoms.get_potential_energy(), atoms.get_forces()      # eV, eV/Å (TorchANI's hartree->eV)
    from torchani.units import hartree2ev

    e_ev = hartree2ev(out["energy"].detach().numpy() / units.KJMOL_PER_HARTREE)
    np.testing.assert_allclose(e_ev, [e_ref, e_ref], rtol=0, atol=1e-5 * 9)
    f = -hartree2ev(g.numpy() / 2 / units.KJMOL_PER_HARTREE) / units.ANGSTROM_PER_NM
    np.testing.assert_allclose(f, f_ref, rtol=0, atol=1e-4)
    with pytest.raises(SetupError, match="neutral zones only"):
        adapter.check_zone([6, 1], 1)


# ------------------------------------------------------------------------------------------------ evaluate
def test_evaluate_runs_other_families_on_qmmm_data(aimnet_file, mace_file):
    """`mlmm evaluate` on QM/MM frames: AIMNet2 in mechanical (fixed charges), model-charges and emle embedding,
    MACE in mechanical embedding (no ML charges: the zone in vacuum)."""
    from driver.pipeline import evaluated_model
    from potentials.evaluate import evaluate, format_table, load_frames

    frames = load_frames(ROOT / "tests" / "data" / "tiny_qmmm.nc", "test")[:4]
    assert frames
    model, names = evaluated_model(aimnet_file, "cpu")
    assert names == ("model-charges", "emle", "mechanical")
    from coupling.schemes import SCHEMES

    res = evaluate(model, frames, "cpu", schemes={n: SCHEMES.get(n)() for n in names})
    assert set(res) == set(names) and all(np.isfinite(v["energy"]) for n in ("model-charges", "emle")
                                          for v in res[n].values())
    assert "model-charges" in format_table(res)
    model, names = evaluated_model(mace_file, "cpu")
    assert names == ("mechanical",)
    res = evaluate(model, frames, "cpu", schemes={"mechanical": SCHEMES.get("mechanical")()})
    assert np.isfinite(res["mechanical"]["all"]["forces"]) and res["mechanical"]["all"]["dipole"] >= 0

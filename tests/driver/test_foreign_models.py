"""Bring your own potential, end to end: a fresh MACE model (mace-torch) and a fresh AIMNet2 model (the ``aimnet``
package), saved in their packages' own formats, served by ``mlmm client ml`` through a real i-PI socket in
mechanical embedding with the force field's charges on the ML atoms:

* the ML client's energy and forces are the package's own calculator's on the ML atoms (MACECalculator,
  AIMNet2Calculator; 1e-5 eV/atom, 1e-4 eV/Å), zero on the MM atoms;
* the total ML/MM energy (ML client + MM client) equals openmm-ml's ``createMixedSystem`` with the same model
  file and force field, to 1e-3 kJ/mol per atom: alanine dipeptide in a periodic TIP3P box (MACE) and acetate
  (ML zone charge -1) in a water droplet (AIMNet2).
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import openmm
import pytest
import tomli_w
from openmm import unit

from ipi.engine.forcefields import FFSocket
from ipi.interfaces.sockets import InterfaceSocket

from coupling.engines import EngineOptions, build_engine
from driver import units
from model_builders import E0_EV, build_aimnet2, build_mace
from potentials.core.errors import SetupError
from potentials.core.spec import SystemSpec
from potentials.openmm_system import load_system
from test_client import ask, sent

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "inputs" / "examples"
EV_A = units.EV_PER_ANGSTROM_PER_KJMOL_PER_NM
OPENMMML_MACE_KJMOL_PER_EV = 96.4853          # openmmml/models/macepotential.py: energyScale


def require(*packages: str) -> None:
    missing = [p for p in packages if importlib.util.find_spec(p) is None]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)}")


def _prepare(folder: Path, pdb: Path, args: list[str]) -> Path:
    """`mlmm prepare`, then mechanical embedding with the force field's charges on the ML atoms."""
    import tomllib

    from driver.cli import main as cli

    assert cli(["prepare", str(pdb), *args, "--out", str(folder)]) == 0
    toml = folder / "system.toml"
    data = tomllib.loads(toml.read_text())
    data["coupling"].update(embedding="mechanical", mechanical_charges="mm")
    toml.write_text(tomli_w.dumps(data))
    return toml


@contextlib.contextmanager
def ipi_socket(tmp_path: Path):
    """i-PI's FFSocket on a unix socket, patient with a slow first request (a loaded CI machine, model loading):
    its default 1 s would drop the client."""
    iface = InterfaceSocket(address="s", mode="unix", sockets_prefix=f"{tmp_path}/", timeout=600.0)
    ff = FFSocket(latency=1e-4, name="ml", interface=iface, dopbc=False, pars={"zone": "ml"})
    ff.start()
    try:
        yield ff, f"unix:{tmp_path}/s"
    finally:
        with contextlib.suppress(Exception):           # stopped already when the client was let go
            ff.stop()


@contextlib.contextmanager
def ml_client(tmp_path: Path, system: Path, model: Path, *extra: str):
    """A real i-PI socket with ``mlmm client ml`` (a subprocess) connected to it; yields the forcefield."""
    log = open(tmp_path / "client_ml.log", "w")
    with ipi_socket(tmp_path) as (ff, address):
        proc = subprocess.Popen([sys.executable, "-m", "driver.cli", "client", "ml", "--system", str(system),
                                 "--model", str(model), "--address", address, "--threads", "1", *extra],
                                cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        try:
            yield ff
        finally:
            ff.stop()                                 # the client sees the server go and exits
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.close()


def _serve(tmp_path, system, model, positions, box, *extra):
    """The ML client's energies (kJ/mol), forces (kJ/mol/nm) and extras of each structure, through i-PI, and its
    log."""
    with ml_client(tmp_path, system, model, *extra) as ff:
        answers = ask(ff, positions, [box] * len(positions), timeout=600.0)
    log = (tmp_path / "client_ml.log").read_text()
    return ([a[0] * units.KJMOL_PER_HARTREE for a in answers],
            [a[1] / units.HARTREE_PER_BOHR_PER_KJMOL_PER_NM for a in answers], [a[3] for a in answers], log)


def _mm_energy(spec, pos_nm, box) -> float:
    engine = build_engine("mm", spec, EngineOptions(platform="Reference"))
    return engine.compute(pos_nm[None], None if box is None else box[None])[0].energy


def _openmm_energy(system, pos_nm, box) -> float:
    ctx = openmm.Context(system, openmm.VerletIntegrator(1e-3), openmm.Platform.getPlatformByName("Reference"))
    if box is not None:
        ctx.setPeriodicBoxVectors(*[openmm.Vec3(*v) for v in box])
    ctx.setPositions(pos_nm)
    return ctx.getState(getEnergy=True).getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)


def _structures(pos: np.ndarray, ml: np.ndarray, seed: int = 1) -> list[np.ndarray]:
    """The prepared structure and one with the ML atoms displaced (0.005 nm), as the client receives them."""
    moved = pos.copy()
    moved[ml] += np.random.default_rng(seed).normal(0.0, 0.005, (len(ml), 3))
    return [sent(pos), sent(moved)]


# ------------------------------------------------------------------------------------------------ MACE
@pytest.fixture(scope="module")
def dipeptide_box(tmp_path_factory):
    """ACE-ALA-NME (ML zone, 22 atoms) in 232 TIP3P waters, 2 nm box, PME."""
    return _prepare(tmp_path_factory.mktemp("ala"), EXAMPLES / "alanine-dipeptide" / "input.pdb",
                    ["--ml", "chain A", "--solvate", "1.0", "--mm-cutoff", "0.7", "--embedding-cutoff", "0.4"])


def test_mace_through_the_ml_client(dipeptide_box, tmp_path, monkeypatch):
    require("mace", "openmmml")
    model = build_mace(tmp_path / "mace_small.model")
    spec = SystemSpec.load(dipeptide_box)
    topology, system, pos = load_system(spec)
    ml, box = np.asarray(spec.ml.indices), np.asarray(spec.structure.box_nm)
    structures = _structures(pos, ml)
    energies, forces, extras, log = _serve(tmp_path, dipeptide_box, model, structures, box, "--dtype", "float64")
    assert "pickled MACE model" in log and "runs code stored in the file" in log
    # a model without charges reports the force field's charges of the ML atoms (what the coupling uses), so
    # i-PI inputs that print ml.charges / ml.dipole (the templates do) run as with our network
    from coupling.mmsystem import mm_charges
    np.testing.assert_allclose(extras[0]["ml.charges"], mm_charges(system)[ml], atol=1e-12)

    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # mace's calculator and openmm-ml: bare torch.load
    from ase import Atoms
    from mace.calculators import MACECalculator

    import torch
    saved = torch.get_default_dtype()
    calc = MACECalculator(model_paths=str(model), device="cpu", default_dtype="float64")
    torch.set_default_dtype(saved)
    numbers = [a.element.atomic_number for a in topology.atoms()]
    for x, e, f in zip(structures, energies, forces):
        atoms = Atoms(numbers=np.asarray(numbers)[ml], positions=x[ml] * units.ANGSTROM_PER_NM)
        atoms.calc = calc
        assert abs(e * units.EV_PER_KJMOL - atoms.get_potential_energy()) < 1e-5 * len(ml)
        np.testing.assert_allclose(f[ml] * EV_A, atoms.get_forces(), rtol=0, atol=1e-4)
        assert not np.any(np.delete(f, ml, axis=0))

    from openmmml import MLPotential

    # openmm-ml converts MACE's eV with a 5-digit factor; the difference to ours (4e-7 relative, on the model's
    # total energy incl. its atomic reference energies, -1.7e4 eV here) is taken out
    mixed = MLPotential("mace", modelPath=str(model)).createMixedSystem(
        topology, system, ml.tolist(), precision="double", returnEnergyType="energy", mlLongRange=False)
    for x, e in zip(structures, energies):
        shift = e * units.EV_PER_KJMOL * (units.KJMOL_PER_EV - OPENMMML_MACE_KJMOL_PER_EV)
        ours, theirs = _mm_energy(spec, x, box) + e, _openmm_energy(mixed, x, box) + shift
        print(f"MACE ML/MM total energy: ours {ours:.6f}, openmm-ml {theirs:.6f} kJ/mol ({len(pos)} atoms)")
        assert abs(ours - theirs) < 1e-3 * len(pos), (ours, theirs)


# ------------------------------------------------------------------------------------------------ AIMNet2
@pytest.fixture(scope="module")
def acetate_droplet(tmp_path_factory):
    """Acetate (ML zone, charge -1) with Na+ in a droplet of 29 waters, no box."""
    return _prepare(tmp_path_factory.mktemp("act"), EXAMPLES / "acetate" / "input.pdb",
                    ["--ml", "resname ACT", "--solvate", "0.6", "--nonperiodic"])


def test_aimnet2_through_the_ml_client_charged_zone(acetate_droplet, tmp_path):
    require("aimnet", "openmmml")
    model = build_aimnet2(tmp_path / "aimnet")
    spec = SystemSpec.load(acetate_droplet)
    assert spec.ml.charge == -1
    topology, system, pos = load_system(spec)
    ml = np.asarray(spec.ml.indices)
    structures = _structures(pos, ml)
    energies, forces, extras, _ = _serve(tmp_path, acetate_droplet, model, structures, np.eye(3) * 5.0)

    import torch
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from aimnet.calculators import AIMNet2Calculator
    calc = AIMNet2Calculator(str(model), device="cpu")
    numbers = torch.tensor([a.element.atomic_number for a in topology.atoms()])[ml]
    for x, e, f, x_extras in zip(structures, energies, forces, extras):
        ref = calc({"coord": torch.tensor(x[ml] * units.ANGSTROM_PER_NM), "numbers": numbers,
                    "charge": torch.tensor([-1.0])}, forces=True)
        assert abs(e * units.EV_PER_KJMOL - float(ref["energy"])) < 1e-5 * len(ml)
        np.testing.assert_allclose(f[ml] * EV_A, ref["forces"].detach().numpy(), rtol=0, atol=1e-4)
        np.testing.assert_allclose(x_extras["ml.charges"], ref["charges"].detach().numpy(), atol=1e-5)
        assert not np.any(np.delete(f, ml, axis=0))

    from openmmml import MLPotential

    # both report the model's total energy, atomic reference energies included (-6.2e3 eV here), converted to
    # kJ/mol with different factors (OpenMM's CODATA eV, our i-PI atomic-unit factors: 1e-7 relative apart); the
    # constant that makes is taken out
    mixed = MLPotential("aimnet", modelPath=str(model)).createMixedSystem(topology, system, ml.tolist(), charge=-1)
    sae = sum(E0_EV[int(z)] for z in numbers)
    shift = sae * ((unit.ev / unit.item).conversion_factor_to(unit.kilojoule_per_mole) - units.KJMOL_PER_EV)
    for x, e in zip(structures, energies):
        ours, theirs = _mm_energy(spec, x, None) + e, _openmm_energy(mixed, x, None) - shift
        print(f"AIMNet2 ML/MM total energy: ours {ours:.6f}, openmm-ml {theirs:.6f} kJ/mol ({len(pos)} atoms)")
        assert abs(ours - theirs) < 1e-3 * len(pos), (ours, theirs)
    assert os.environ.get("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD") in (None, "")


def test_mlmm_run_passes_the_model_options(dipeptide_box, tmp_path):
    """`mlmm run --model-type/--dtype` reach each ML client's command line (and only theirs), and the launcher's
    preflight loads the file as the client will: a model without an element of the zone stops the run before
    anything starts, in one line."""
    require("mace")
    from driver import rundir
    from driver.rundir import initial_structure

    argv = rundir.client_argv_factory(dipeptide_box, tmp_path / "m.model", "cpu", None, False,
                                      model_options={"model_type": "mace", "dtype": "float32"})
    ml, mm = argv("ml", "unix:/x/ml"), argv("mm", "unix:/x/mm")
    assert ml[-4:] == ["--model-type", "mace", "--dtype", "float32"] and "--model-type" not in mm
    spec = SystemSpec.load(dipeptide_box)
    start = initial_structure(spec)
    rundir.check_model_file(build_mace(tmp_path / "hcno.model"), spec, start, dtype="float32")
    with pytest.raises(SetupError) as err:
        rundir.check_model_file(build_mace(tmp_path / "hco.model", elements=(1, 6, 8)), spec, start)
    assert "element N (Z=7)" in str(err.value) and "\n" not in str(err.value)

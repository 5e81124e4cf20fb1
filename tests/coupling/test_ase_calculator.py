"""The ASE calculator for the full ML/MM potential (coupling/ase_calculator.py) and `mlmm optimize`
(driver/optimize.py), on methanol (ML zone) in a 1.6 nm periodic TIP3P box made by `mlmm prepare`, with a
random-weight tiny network.

* energy and forces equal the sum of what the two socket clients (`mlmm client mm`, `mlmm client ml`, separate
  processes) send to a real i-PI socket server for the same positions;
* forces are minus the finite-difference gradient of the energy (eV, Å);
* ASE's BFGS lowers the energy and the largest force; `mlmm optimize` writes a structure + system.toml that
  load again and give the optimised energy.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from driver import codec, units
from driver.cli import main as cli
from potentials.core.errors import SetupError

ROOT = Path(__file__).resolve().parents[2]
PLATFORM = "Reference"          # double precision: the in-process and socket evaluations agree to ~1e-10

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def methanol_box(methanol_box_factory) -> tuple[Path, Path]:
    """(system.toml, model file): methanol in 117 TIP3P waters, PME, embedding cutoff 0.5 nm; tiny network,
    float64 weights (finite differences at 1e-4 Å)."""
    return methanol_box_factory("methanol_box", seed=5, double=True)


@pytest.fixture(scope="module")
def calc(methanol_box):
    from coupling.ase_calculator import MLMMCalculator

    return MLMMCalculator(*methanol_box, platform=PLATFORM)


def _displaced(calc, seed: int = 1, amplitude_ang: float = 0.05):
    """The prepared structure with the ML zone and a few waters displaced (forces well away from zero)."""
    atoms = calc.initial_atoms()
    rng = np.random.default_rng(seed)
    pos = atoms.get_positions()
    moved = np.r_[calc.spec.ml.indices, np.arange(6, 36)]
    pos[moved] += rng.normal(scale=amplitude_ang, size=(len(moved), 3))
    atoms.set_positions(pos)
    return atoms


# ------------------------------------------------------------------------------------------- socket clients
def test_equals_sum_of_socket_clients(methanol_box, calc):
    """One request to each real client over a real i-PI socket: E_MM + E_ML and F_MM + F_ML (Hartree, bohr,
    converted here with potentials.core.units) equal the calculator's eV and eV/Å."""
    from ipi.engine.atoms import Atoms
    from ipi.engine.cell import Cell
    from ipi.engine.forcefields import FFSocket
    from ipi.interfaces.sockets import InterfaceSocket

    system, model = methanol_box
    atoms = _displaced(calc)
    pos_nm = atoms.get_positions() * units.NM_PER_ANGSTROM
    box_nm = atoms.cell.array * units.NM_PER_ANGSTROM
    # the positions exactly as a client receives them: nm -> bohr (i-PI) -> nm (codec)
    atoms.set_positions(pos_nm * units.BOHR_PER_NM * units.NM_PER_BOHR * units.ANGSTROM_PER_NM)
    atoms.calc = calc
    e_calc, f_calc = atoms.get_potential_energy(), atoms.get_forces()

    total_e, total_f, procs, ffs = 0.0, 0.0, [], []
    try:
        for kind in ("mm", "ml"):
            name = f"mlmmase_{os.getpid()}_{uuid.uuid4().hex[:6]}"
            ff = FFSocket(latency=1e-4, name=kind, interface=InterfaceSocket(address=name, mode="unix", timeout=0.0),
                          dopbc=False)
            ff.start()
            ffs.append(ff)
            argv = [sys.executable, "-m", "driver.cli", "client", kind, "--system", str(system), "--address",
                    f"unix:{name}", "--timeout", "60"]
            argv += ["--platform", PLATFORM] if kind == "mm" else ["--model", str(model)]
            procs.append(subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                          text=True))
            a = Atoms(len(pos_nm))
            a.q[:] = (pos_nm * units.BOHR_PER_NM).ravel()
            req = ff.queue(a, Cell(codec.box_to_cell(box_nm)), reqid=0)
            deadline = time.monotonic() + 120
            while req["status"] != "Done":
                assert procs[-1].poll() is None, procs[-1].communicate()[0]
                assert time.monotonic() < deadline, f"the {kind} client sent nothing within 120 s"
                time.sleep(0.01)
            total_e += req["result"][0]
            total_f = total_f + np.reshape(req["result"][1], (-1, 3))
    finally:
        for ff in ffs:
            ff.stop()
        for p in procs:
            try:
                p.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.communicate()
    assert all(p.returncode == 0 for p in procs)
    e_ev = total_e * units.EV_PER_HARTREE
    f_ev = total_f * units.EV_PER_HARTREE * units.BOHR_PER_ANGSTROM
    assert e_calc == pytest.approx(e_ev, rel=1e-9, abs=1e-7)
    np.testing.assert_allclose(f_calc, f_ev, rtol=1e-7, atol=1e-7 * np.abs(f_ev).max())
    assert np.abs(f_calc[calc.spec.ml.indices]).max() > 0.05          # not a trivial comparison
    assert calc.results["energy_mm"] + calc.results["energy_ml"] == pytest.approx(e_calc, rel=1e-12)


def test_forces_are_minus_gradient(calc):
    """Central differences on ML atoms and on the MM atom the network pushes hardest, in eV and Å.

    h = 1e-4 Å: with 1e-3 Å a pair crossing the 0.7 nm MM cutoff already shows up as a 6 % error."""
    atoms = _displaced(calc, seed=2)
    atoms.calc = calc
    f = atoms.get_forces()
    pos_nm = atoms.get_positions()[None] * units.NM_PER_ANGSTROM
    f_ml = calc.ml.compute(pos_nm, atoms.cell.array[None] * units.NM_PER_ANGSTROM)[0].forces
    f_ml[calc.spec.ml.indices] = 0.0
    mm_atom = int(np.argmax(np.abs(f_ml).max(axis=1)))
    assert np.abs(f_ml[mm_atom]).max() > 1.0                     # kJ/mol/nm: an embedded atom, really felt
    h = 1e-4
    for i, k in [(0, 0), (1, 2), (4, 1), (mm_atom, 0), (mm_atom, 2)]:
        pos = atoms.get_positions()
        e = []
        for sign in (1, -1):
            p = pos.copy()
            p[i, k] += sign * h
            atoms.set_positions(p)
            e.append(atoms.get_potential_energy())
        atoms.set_positions(pos)
        assert -(e[0] - e[1]) / (2 * h) == pytest.approx(f[i, k], rel=1e-4, abs=1e-5), (i, k)


def test_lbfgs_lowers_energy_and_max_force(calc):
    # LBFGS, mlmm optimize's default: ASE's BFGS diagonalises a dense 3N x 3N Hessian every step (N = 2.6 k atoms
    # here), which took minutes on a loaded 2-core machine
    from ase.constraints import FixAtoms
    from ase.optimize import LBFGS

    from driver.optimize import free_atoms
    from potentials.openmm_system import read_structure

    atoms = _displaced(calc, seed=3, amplitude_ang=0.1)
    topology, pos_nm = read_structure(calc.spec.structure_path)
    moving = free_atoms(calc.spec, topology, atoms.get_positions() * units.NM_PER_ANGSTROM, "shell", 0.4)
    assert set(calc.spec.ml.indices) <= set(moving) and 6 < len(moving) < len(atoms)
    atoms.set_constraint(FixAtoms(indices=np.setdiff1d(np.arange(len(atoms)), moving)))
    atoms.calc = calc
    e0, f0 = atoms.get_potential_energy(), np.linalg.norm(atoms.get_forces(), axis=1).max()
    fixed = atoms.get_positions()[np.setdiff1d(np.arange(len(atoms)), moving)]
    LBFGS(atoms, logfile=None).run(fmax=0.1, steps=40)
    e1, f1 = atoms.get_potential_energy(), np.linalg.norm(atoms.get_forces(), axis=1).max()
    assert e1 < e0 - 0.1, (e0, e1)
    assert f1 < 0.5 * f0, (f0, f1)
    np.testing.assert_array_equal(atoms.get_positions()[np.setdiff1d(np.arange(len(atoms)), moving)], fixed)


# ------------------------------------------------------------------------------------------- mlmm optimize
def test_optimize_cli_writes_a_runnable_system(methanol_box, tmp_path):
    from coupling.ase_calculator import MLMMCalculator

    system, model = methanol_box
    out = tmp_path / "opt"
    # --free all: with a random-weight network the ML zone has no bonds to hold it, and freeing it with a few
    # neighbours lets BFGS/LBFGS pull methanol apart; all atoms free (LBFGS) descends here
    assert cli(["optimize", str(system), "--model", str(model), "--out", str(out), "--free", "all", "--steps",
                "20", "--fmax", "0.05", "--platform", PLATFORM]) == 0
    log_lines = (out / "optimized.log").read_text().split("\n")[1:]
    energies = [float(ln.split()[3]) for ln in log_lines if ln.strip()]
    assert len(energies) == 21 and energies[-1] < energies[0] - 0.05
    new = MLMMCalculator(out / "optimized.toml", model, platform=PLATFORM)
    assert new.spec.structure.file == "optimized.pdb" and new.spec.ml.indices == list(range(6))
    atoms = new.initial_atoms()
    atoms.calc = new
    # the PDB keeps 1e-3 Å: the reloaded energy is the optimiser's last one to a few meV
    assert atoms.get_potential_energy() == pytest.approx(energies[-1], abs=5e-3)
    assert atoms.get_potential_energy() < calc_energy(system, model) - 0.05
    # never overwrites
    assert cli(["optimize", str(system), "--model", str(model), "--out", str(out), "--steps", "1"]) == 2


def test_free_atoms_selection(calc):
    """--free shell: the ML zone plus whole residues with an atom within the shell (minimum image)."""
    from ase.geometry import get_distances

    from driver.optimize import free_atoms
    from potentials.openmm_system import read_structure

    topology, pos = read_structure(calc.spec.structure_path)
    ml = calc.spec.ml.indices
    shell = free_atoms(calc.spec, topology, pos, "shell", 0.35)
    assert list(free_atoms(calc.spec, topology, pos, "ml", 0.35)) == ml
    assert len(free_atoms(calc.spec, topology, pos, "all", 0.0)) == len(pos)
    _, d = get_distances(pos[ml], pos, cell=np.asarray(calc.spec.structure.box_nm), pbc=True)
    near = set(np.flatnonzero(d.min(axis=0) < 0.35))
    residues = {a.index: a.residue.index for a in topology.atoms()}
    expect = {a for a in residues if residues[a] in {residues[i] for i in near}}
    assert set(shell) == expect and set(ml) < set(shell) and len(shell) % 3 == 0     # whole waters + methanol


def calc_energy(system, model) -> float:
    from coupling.ase_calculator import MLMMCalculator

    c = MLMMCalculator(system, model, platform=PLATFORM)
    a = c.initial_atoms()
    a.calc = c
    return a.get_potential_energy()


def test_clear_errors(methanol_box):
    from coupling.ase_calculator import MLMMCalculator

    system, model = methanol_box
    with pytest.raises(SetupError, match="model"):
        MLMMCalculator(system)
    c = MLMMCalculator(system, model, platform=PLATFORM)
    atoms = c.initial_atoms()[:10]
    atoms.calc = c
    with pytest.raises(SetupError, match="initial_atoms"):
        atoms.get_potential_energy()


def test_relocated_forcefield_paths(tmp_path):
    """A force-field file next to the old system.toml is re-pathed for the new folder; built-in names are kept."""
    from driver.optimize import _relocated

    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "lig.xml").write_text("<ForceField/>")
    new = tmp_path / "elsewhere" / "opt"
    assert _relocated("lig.xml", tmp_path / "old", new) == "../../old/lig.xml"
    assert (new / _relocated("lig.xml", tmp_path / "old", new)).resolve() == (tmp_path / "old" / "lig.xml").resolve()
    assert _relocated("amber14-all.xml", tmp_path / "old", new) == "amber14-all.xml"

"""The client loop against the REAL i-PI socket server (``InterfaceSocket`` + ``FFSocket``, stood up in-process
as in i-PI's ipi_tests/unit_tests/communication/test_sockets.py): what i-PI receives must equal OpenMM's own
evaluation of the same positions, converted with potentials.core.units, over unix/inet, consolidated/legacy, batched."""
from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
import uuid

import numpy as np
import openmm
import openmm.app as app
import pytest
from ipi.engine.atoms import Atoms
from ipi.engine.cell import Cell
from ipi.engine.forcefields import FFSocket
from ipi.interfaces.sockets import InterfaceSocket
from openmm import unit

from driver import codec, units
from driver.client import ForceResult, connect, parse_address, serve
from potentials.core.errors import CalculationFailed, SetupError
from potentials.openmm_engine import OpenMMEngine

BOX = np.array([[1.8, 0.0, 0.0], [0.5, 1.7, 0.0], [-0.6, 0.4, 1.6]])    # triclinic, reduced form (nm rows)


# ------------------------------------------------------------------------------------------------ systems
@pytest.fixture(scope="module")
def water_box():
    """~480-atom flexible TIP3P box, triclinic, PME: (system, positions nm)."""
    ff = app.ForceField("amber14/tip3p.xml")
    m = app.Modeller(app.Topology(), [])
    m.addSolvent(ff, boxVectors=[openmm.Vec3(*v) for v in BOX] * unit.nanometer)
    system = ff.createSystem(m.topology, nonbondedMethod=app.PME, nonbondedCutoff=0.7 * unit.nanometer,
                             constraints=None, rigidWater=False)
    return system, np.array(m.positions.value_in_unit(unit.nanometer))


@pytest.fixture(scope="module")
def water_cluster():
    """8 flexible TIP3P waters, no box, NoCutoff: (system, positions nm)."""
    from run_helpers import tip3p_waters

    _, system, pos = tip3p_waters(8)
    return system, pos


def direct(system, pos_nm, box_nm=None):
    """OpenMM's own evaluation (fresh Reference context): energy kJ/mol, forces kJ/mol/nm."""
    ctx = openmm.Context(system, openmm.VerletIntegrator(1e-3), openmm.Platform.getPlatformByName("Reference"))
    if box_nm is not None:
        ctx.setPeriodicBoxVectors(*[openmm.Vec3(*v) for v in box_nm])
    ctx.setPositions(pos_nm)
    st = ctx.getState(getEnergy=True, getForces=True)
    return (st.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole),
            st.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer))


class ExtrasEngine(OpenMMEngine):
    """An OpenMM engine that also reports per-structure extras (to check they reach i-PI)."""

    def compute(self, positions, boxes=None):
        return [r._replace(extras={"mm.energy": r.energy, "mm.fmax": np.abs(r.forces).max()})
                for r in super().compute(positions, boxes)]


# ------------------------------------------------------------------------------------------------ i-PI side
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def ipi_server(mode: str, tmp_path, *, consolidate: bool = True, batch_size: int = 1):
    """A running i-PI FFSocket; yields (forcefield, client address string)."""
    if mode == "unix":
        name = f"mlmmtest_{os.getpid()}_{uuid.uuid4().hex[:8]}"
        iface = InterfaceSocket(address=name, mode="unix", consolidate_messages=consolidate, batch_size=batch_size)
        client_address = f"unix:{name}"
    elif mode == "unix-path":
        iface = InterfaceSocket(address="s", mode="unix", sockets_prefix=f"{tmp_path}/",
                                consolidate_messages=consolidate, batch_size=batch_size)
        client_address = f"unix:{tmp_path}/s"
    else:
        port = _free_port()
        iface = InterfaceSocket(address="localhost", port=port, mode="inet", consolidate_messages=consolidate,
                                batch_size=batch_size)
        client_address = f"localhost:{port}"
    ff = FFSocket(latency=1e-4, name="mm", interface=iface, dopbc=False, pars={"zone": "mm"})
    ff.start()
    try:
        yield ff, client_address
    finally:
        ff.stop()


class Client(threading.Thread):
    """``serve`` in a thread, keeping its return value or exception."""

    def __init__(self, engine, address):
        super().__init__(daemon=True)
        self.engine, self.address, self.result, self.error = engine, address, None, None

    def run(self):
        try:
            self.result = serve(self.engine, self.address, timeout=10.0, read_timeout=10.0)
        except Exception as exc:                        # noqa: BLE001 - inspected by the test
            self.error = exc


def ask(ff, positions_nm, boxes_nm, timeout=30.0):
    """Queue one i-PI request per structure and wait: list of (pot Ha, forces (N,3) Ha/bohr, virial Ha, extras)."""
    reqs = []
    for k, (pos, box) in enumerate(zip(positions_nm, boxes_nm)):
        atoms = Atoms(len(pos))
        atoms.q[:] = (pos * units.BOHR_PER_NM).ravel()
        reqs.append(ff.queue(atoms, Cell(codec.box_to_cell(box)), reqid=k))
    deadline = time.monotonic() + timeout
    for r in reqs:
        while r["status"] != "Done":
            assert time.monotonic() < deadline, "i-PI got no answer in time"
            time.sleep(1e-3)
    return [(r["result"][0], np.reshape(r["result"][1], (-1, 3)), r["result"][2], r["result"][3]) for r in reqs]


def sent(pos_nm):
    """Positions exactly as the client receives them (nm -> bohr in i-PI -> nm in the codec)."""
    return (pos_nm * units.BOHR_PER_NM) * units.NM_PER_BOHR


def check(system, pos_nm, box_nm, pot, force):
    e_ref, f_ref = direct(system, sent(pos_nm), box_nm)
    assert pot * units.KJMOL_PER_HARTREE == pytest.approx(e_ref, rel=1e-8)
    f_kj = force / units.HARTREE_PER_BOHR_PER_KJMOL_PER_NM
    np.testing.assert_allclose(f_kj, f_ref, rtol=1e-8, atol=1e-8 * np.abs(f_ref).max())


# ------------------------------------------------------------------------------------------------ tests
def test_periodic_unix_consolidated(water_box, tmp_path):
    system, pos = water_box
    engine = ExtrasEngine(system, platform="Reference")
    with ipi_server("unix", tmp_path) as (ff, address):
        client = Client(engine, address)
        client.start()
        (pot, force, vir, extras), = ask(ff, [pos], [BOX])
    client.join(10)
    assert client.error is None and client.result == 1
    check(system, pos, BOX, pot, force)
    assert extras["mm.energy"] == pytest.approx(pot * units.KJMOL_PER_HARTREE, rel=1e-12)
    # the periodic virial (finite differences of the box-dependent energy) arrives in hartree as the engine
    # computed it for the same structure
    own = engine.compute(sent(pos)[None], BOX[None])[0].virial
    np.testing.assert_allclose(vir * units.KJMOL_PER_HARTREE, own, rtol=1e-6, atol=1e-6 * np.abs(own).max())


@pytest.mark.parametrize("mode, consolidate", [("unix", False), ("unix-path", True), ("inet", True),
                                               ("inet", False)])
def test_nonperiodic_transports(water_cluster, tmp_path, mode, consolidate):
    system, pos = water_cluster
    rng = np.random.default_rng(1)
    structures = [pos, pos + rng.normal(scale=0.005, size=pos.shape) + 3.0]     # far outside the dummy cell
    cell = np.eye(3) * 2.0                          # i-PI needs a cell; the non-periodic engine ignores it
    with ipi_server(mode, tmp_path, consolidate=consolidate) as (ff, address):
        client = Client(OpenMMEngine(system, platform="Reference"), address)
        client.start()
        answers = ask(ff, structures, [cell, cell])
    client.join(10)
    assert client.error is None and client.result == 2
    for p, (pot, force, vir, _) in zip(structures, answers):
        check(system, p, None, pot, force)
        w = force.T @ (sent(p) * units.BOHR_PER_NM)          # exact cluster virial sum_i f_i (x) r_i, Ha
        np.testing.assert_allclose(vir, w, rtol=1e-8, atol=1e-10 * np.abs(w).max())


def test_batched_periodic(water_box, tmp_path):
    """batch_size=3 with 4 structures -> a full batch and a padded one; each with its own box."""
    system, pos = water_box
    rng = np.random.default_rng(2)
    scales = [1.0, 1.02, 0.99, 1.01]
    structures = [pos * s + rng.normal(scale=0.002, size=pos.shape) for s in scales]
    boxes = [BOX * s for s in scales]
    with ipi_server("unix", tmp_path, batch_size=3) as (ff, address):
        client = Client(OpenMMEngine(system, platform="Reference"), address)
        client.start()
        answers = ask(ff, structures, boxes)
    client.join(10)
    assert client.error is None and client.result == 2       # two batched requests
    energies = []
    for p, b, (pot, force, _, _) in zip(structures, boxes, answers):
        check(system, p, b, pot, force)
        energies.append(pot)
    assert len(set(energies)) == 4                            # the box really changed per structure


def test_atom_count_mismatch_real_ipi(water_cluster, tmp_path):
    system, pos = water_cluster
    with ipi_server("unix", tmp_path, consolidate=False) as (ff, address):
        client = Client(OpenMMEngine(system, platform="Reference"), address)
        client.start()
        atoms = Atoms(len(pos) + 3)
        ff.queue(atoms, Cell(np.eye(3) * 40.0), reqid=0)
        client.join(20)
    assert isinstance(client.error, CalculationFailed)
    assert f"i-PI sent {len(pos) + 3} atoms but this client's engine has {len(pos)}" in str(client.error)


def test_nonfinite_never_sent(water_cluster, tmp_path):
    """Two atoms on top of each other -> infinite Coulomb/LJ: the client stops instead of answering."""
    system, pos = water_cluster
    bad = pos.copy()
    bad[3] = bad[0]                                 # O of water 2 on O of water 1
    with ipi_server("unix", tmp_path, consolidate=False) as (ff, address):
        client = Client(OpenMMEngine(system, platform="Reference"), address)
        client.start()
        atoms = Atoms(len(pos))
        atoms.q[:] = (bad * units.BOHR_PER_NM).ravel()
        req = ff.queue(atoms, Cell(np.eye(3) * 40.0), reqid=0)
        client.join(20)
        assert req["result"] is None                # i-PI never got a number
    assert isinstance(client.error, CalculationFailed) and "non-finite" in str(client.error)


def test_evaluate_checks_engine_output(water_cluster):
    """Shape and count errors of an engine become CalculationFailed, not garbage on the wire."""
    from driver.client import evaluate

    class Wrong:
        natoms = 4

        def compute(self, positions, boxes):
            return [ForceResult(1.0, np.zeros((3, 3)), np.zeros((3, 3)), {})]

    with pytest.raises(CalculationFailed, match="expected"):
        evaluate(Wrong(), np.zeros((1, 4, 3)), None, batched=False)
    with pytest.raises(CalculationFailed, match="2 structures"):
        evaluate(Wrong(), np.zeros((2, 4, 3)), None, batched=True)


# ------------------------------------------------------------------------------------------------ addresses
def test_parse_address():
    assert parse_address("unix:mm") == (socket.AF_UNIX, "/tmp/ipi_mm")
    assert parse_address("unix:/run/x/sock") == (socket.AF_UNIX, "/run/x/sock")
    assert parse_address("localhost:31415") == (socket.AF_INET, ("localhost", 31415))
    assert parse_address("inet:10.0.0.1:99") == (socket.AF_INET, ("10.0.0.1", 99))
    assert parse_address("[::1]:31415") == (socket.AF_INET6, ("::1", 31415))
    for bad in ("mm", "unix:", "localhost:0", "localhost:http", ":31415", "unix:/" + "x" * 120):
        with pytest.raises(SetupError):
            parse_address(bad)


def test_connect_gives_up_clearly():
    t0 = time.monotonic()
    with pytest.raises(SetupError, match="no i-PI server at unix:nonexistent_mlmm_test after 0.5 s"):
        connect("unix:nonexistent_mlmm_test", timeout=0.5)
    assert time.monotonic() - t0 < 3.0


def test_connect_waits_for_late_server(water_cluster, tmp_path):
    """The client may start before i-PI: it retries until the socket appears."""
    system, pos = water_cluster
    name = f"mlmmlate_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    client = Client(OpenMMEngine(system, platform="Reference"), f"unix:{name}")
    client.start()
    time.sleep(0.5)
    iface = InterfaceSocket(address=name, mode="unix")
    ff = FFSocket(latency=1e-4, name="late", interface=iface, dopbc=False)
    ff.start()
    try:
        (pot, force, _, _), = ask(ff, [pos], [np.eye(3) * 3.0])
    finally:
        ff.stop()
    client.join(10)
    assert client.error is None and client.result == 1
    check(system, pos, None, pot, force)


# ------------------------------------------------------------------------------------------------ CLI
@pytest.fixture
def system_toml(tmp_path):
    """A periodic water box written as system.toml + PDB, as `mlmm prepare` would."""
    from potentials.core.spec import MMSpec, StructureSpec, SystemSpec

    ff = app.ForceField("amber14/tip3p.xml")
    m = app.Modeller(app.Topology(), [])
    m.addSolvent(ff, boxVectors=[openmm.Vec3(*v) for v in BOX] * unit.nanometer)
    with open(tmp_path / "box.pdb", "w") as fh:
        app.PDBFile.writeFile(m.topology, m.positions, fh)
    spec = SystemSpec(structure=StructureSpec(file="box.pdb", forcefield=["amber14/tip3p.xml"], periodic=True,
                                              box_nm=BOX.tolist()),
                      mm=MMSpec(nonbonded_method="PME", cutoff_nm=0.7))
    spec.save(tmp_path / "system.toml")
    return tmp_path / "system.toml"


def test_cli_mm_client_subprocess(system_toml, tmp_path):
    """`mlmm client mm` as its own process: builds the system from system.toml and serves i-PI until EXIT."""
    import subprocess
    import sys

    from potentials.core.spec import SystemSpec
    from potentials.openmm_system import load_system

    _, system, pos = load_system(SystemSpec.load(system_toml))
    with ipi_server("inet", tmp_path) as (ff, address):
        proc = subprocess.Popen([sys.executable, "-m", "driver.cli", "client", "mm", "--system", str(system_toml),
                                 "--address", address, "--platform", "Reference", "--timeout", "30"],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            (pot, force, _, _), = ask(ff, [pos], [BOX], timeout=60.0)
        finally:
            ff.stop()
            out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    check(system, pos, BOX, pot, force)


def test_ml_client_needs_model(system_toml):
    from coupling.engines import EngineOptions, build_ml_engine
    from potentials.core.spec import SystemSpec

    with pytest.raises(SetupError, match="--model"):
        build_ml_engine(SystemSpec.load(system_toml), EngineOptions(model=None))


def test_cli_no_server_is_one_line(system_toml):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "driver.cli", "client", "mm", "--system", str(system_toml),
                           "--address", f"unix:absent_{uuid.uuid4().hex[:8]}", "--platform", "Reference",
                           "--timeout", "0.3"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]   # (INFO logs go there too)
    assert len(errors) == 1 and errors[0].startswith("mlmm: error: no i-PI server at unix:absent_"), proc.stderr


def test_failed_client_does_not_hang_ipi(water_cluster, tmp_path):
    """A client that fails mid-request (here: wrong atom count) must leave i-PI able to hand the request to a
    replacement client (consolidated flow; ipi.md §2.7 shows an RST there kills i-PI's poll thread)."""
    system, pos = water_cluster
    wrong = openmm.System()
    for _ in range(len(pos) - 3):
        wrong.addParticle(1.0)
    with ipi_server("unix", tmp_path) as (ff, address):
        bad = Client(OpenMMEngine(wrong, platform="Reference"), address)
        bad.start()
        atoms = Atoms(len(pos))
        atoms.q[:] = (pos * units.BOHR_PER_NM).ravel()
        req = ff.queue(atoms, Cell(np.eye(3) * 40.0), reqid=0)
        bad.join(20)
        assert isinstance(bad.error, CalculationFailed)
        good = Client(OpenMMEngine(system, platform="Reference"), address)
        good.start()
        deadline = time.monotonic() + 20
        while req["status"] != "Done" and time.monotonic() < deadline:
            time.sleep(1e-3)
        assert req["status"] == "Done", "i-PI did not recover from the failed client"
        assert ff._thread.is_alive()
    good.join(10)
    check(system, pos, None, req["result"][0], np.reshape(req["result"][1], (-1, 3)))


def test_max_steps_leaves_cleanly(water_cluster, tmp_path):
    """A client that stops after max_steps hands back cleanly: i-PI gives the next request to another client."""
    system, pos = water_cluster
    with ipi_server("unix", tmp_path) as (ff, address):
        first = threading.Thread(target=lambda: serve(OpenMMEngine(system, platform="Reference"), address,
                                                      timeout=10, max_steps=1), daemon=True)
        first.start()
        ask(ff, [pos], [np.eye(3) * 3.0])
        first.join(10)
        assert not first.is_alive()
        second = Client(OpenMMEngine(system, platform="Reference"), address)
        second.start()
        (pot, force, _, _), = ask(ff, [pos + 0.01], [np.eye(3) * 3.0], timeout=20)
        assert ff._thread.is_alive()
    second.join(10)
    assert second.error is None and second.result == 1
    check(system, pos + 0.01, None, pot, force)

"""`mlmm run` end to end: real i-PI, real clients (the OpenMM MM client, or i-PI's own py driver where the test
needs a client that misbehaves), real sockets. Checks the outputs (NetCDF, properties), energy conservation,
clean errors for bad input, and that a dying client, a dying i-PI or Ctrl-C never hang and leave nothing
behind (no processes, no socket files)."""
from __future__ import annotations

import csv
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import openmm
import pytest
from openmm import app, unit

from driver import cli, launch, rundir
from potentials.core.errors import CalculationFailed, SetupError
from run_helpers import procs_in
from potentials.core.spec import MMSpec, StructureSpec, SystemSpec

REPO = Path(__file__).resolve().parents[2]
TEMPLATES = REPO / "inputs" / "templates"
PY_DRIVER = Path(sys.executable).parent / "i-pi-py_driver"
WATERS_IN_CLUSTER = 8
BOX_NM = 1.5
CUTOFF_NM = 0.7

pytestmark = pytest.mark.timeout(180)


# ------------------------------------------------------------------------------------------------ systems
def _save(folder: Path, modeller: app.Modeller, periodic: bool) -> Path:
    """Minimise (Modeller's waters have close contacts: ~1500 K after 5 fs otherwise) and write PDB + toml."""
    ff = app.ForceField("amber14/tip3p.xml")
    method = app.PME if periodic else app.NoCutoff
    system = ff.createSystem(modeller.topology, nonbondedMethod=method, nonbondedCutoff=CUTOFF_NM * unit.nanometer,
                             constraints=None, rigidWater=False)
    ctx = openmm.Context(system, openmm.VerletIntegrator(1e-3), openmm.Platform.getPlatformByName("CPU"))
    ctx.setPositions(modeller.positions)
    openmm.LocalEnergyMinimizer.minimize(ctx, 10.0, 200)
    modeller.positions = ctx.getState(getPositions=True).getPositions()
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "water.pdb", "w") as fh:
        app.PDBFile.writeFile(modeller.topology, modeller.positions, fh)
    box = None
    if periodic:
        box = [list(v) for v in modeller.topology.getPeriodicBoxVectors().value_in_unit(unit.nanometer)]
    mm = MMSpec(nonbonded_method="PME" if periodic else "NoCutoff", cutoff_nm=CUTOFF_NM, rigid_water=False)
    spec = SystemSpec(StructureSpec(file="water.pdb", forcefield=["amber14/tip3p.xml"], periodic=periodic,
                                    box_nm=box), mm=mm)
    spec.save(folder / "system.toml")
    return folder / "system.toml"


@pytest.fixture(scope="module")
def water_box(tmp_path_factory) -> Path:
    """~330 atoms of flexible TIP3P in a 1.5 nm cube, PME."""
    ff = app.ForceField("amber14/tip3p.xml")
    m = app.Modeller(app.Topology(), [])
    m.addSolvent(ff, boxSize=openmm.Vec3(BOX_NM, BOX_NM, BOX_NM) * unit.nanometer)
    return _save(tmp_path_factory.mktemp("box"), m, periodic=True)


@pytest.fixture(scope="module")
def water_cluster(tmp_path_factory) -> Path:
    """8 flexible TIP3P waters, no box."""
    ff = app.ForceField("amber14/tip3p.xml")
    m = app.Modeller(app.Topology(), [])
    m.addSolvent(ff, boxSize=openmm.Vec3(1.0, 1.0, 1.0) * unit.nanometer)
    m.delete(list(m.topology.residues())[WATERS_IN_CLUSTER:])
    m.topology.setPeriodicBoxVectors(None)
    return _save(tmp_path_factory.mktemp("cluster"), m, periodic=False)


# ------------------------------------------------------------------------------------------------ helpers
def _default_sigint() -> None:
    """In the child: Ctrl-C's default action. A test suite started in the background by a shell without job
    control (``pytest ... &``) inherits SIGINT ignored, and so would ``mlmm run``: Ctrl-C could not reach it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _mlmm(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "driver.cli", "run", *args, "--no-progress"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_default_sigint)


def _finish(proc: subprocess.Popen, timeout: float = 120.0) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail(f"mlmm run did not stop within {timeout} s")
    return proc.returncode, err


def _error_lines(err: str) -> list[str]:
    """stderr minus logging lines (HH:MM:SS name LEVEL: ...)."""
    return [ln for ln in err.splitlines() if ln.strip() and not ln[:8].replace(":", "").isdigit()]


def _assert_clean(folder: Path) -> None:
    """Nothing left running in the run folder; the private socket folder is gone."""
    assert procs_in(folder) == {}
    prefix = ET.parse(folder / "input.xml").getroot().get("sockets_prefix")
    assert prefix and not Path(prefix).exists()


def _wait_rows(folder: Path, n: int, timeout: float = 60.0) -> None:
    """Until i-PI's properties file has ``n`` data rows (the run is under way)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        f = folder / "sim.out"
        if f.is_file() and sum(1 for ln in f.read_text().splitlines() if ln and not ln.startswith("#")) >= n:
            return
        time.sleep(0.1)
    pytest.fail(f"no progress in {folder} within {timeout} s")


def _csv(folder: Path) -> dict[str, np.ndarray]:
    rows = list(csv.reader((folder / "properties.csv").open()))
    return {k: np.array([float(r[i]) for r in rows[1:]]) for i, k in enumerate(rows[0])}


def _py_driver(pes: Path, options: str):
    """Client command lines that run i-PI's own py driver with a custom PES instead of `mlmm client`."""
    def argv(name: str, address: str) -> list[str]:
        # -S '': the address is already the full socket path
        return [sys.executable, str(PY_DRIVER), "-u", "-S", "", "-a", address.removeprefix("unix:"),
                "-m", "custom", "-P", str(pes), "-o", options]
    return argv


DYING_PES = '''
import os, signal
from ipi.pes.dummy import Dummy_driver

__DRIVER_NAME__ = "dying"
__DRIVER_CLASS__ = "Dying_driver"


class Dying_driver(Dummy_driver):
    """Weak harmonic trap (a.u.) that fails after `after` calls: SIGKILLs itself or raises."""

    def __init__(self, after=1000000, how="raise", *args, **kwargs):
        self.after, self.how, self.calls = int(after), how, 0
        super().__init__(*args, **kwargs)

    def compute_structure(self, cell, pos):
        self.calls += 1
        if self.calls > self.after:
            if self.how == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError("simulated CUDA out of memory")
        return 0.5e-4 * (pos**2).sum(), -1e-4 * pos, cell * 0.0, ""
'''


@pytest.fixture
def dying_pes(tmp_path) -> Path:
    p = tmp_path / "dying_pes.py"
    p.write_text(DYING_PES)
    return p


# ------------------------------------------------------------------------------------------------ runs
def test_nvt_run_outputs(water_box, tmp_path):
    """Pure-MM NVT through the CLI with the OpenMM client: NetCDF readable by netCDF4 and MDTraj, the step-0
    potential equals OpenMM's energy of the starting structure, nothing left behind."""
    import mdtraj
    import netCDF4

    out = tmp_path / "run"
    rc, err = _finish(_mlmm(str(TEMPLATES / "nvt_bussi_mm.xml"), "--system", str(water_box), "--steps", "200",
                            "--out", str(out), "--seed", "7"))
    assert rc == 0, err
    _assert_clean(out)
    pdb = water_box.parent / "water.pdb"
    n_atoms = app.PDBFile(str(pdb)).topology.getNumAtoms()

    nc = out / "sim.pos_0.nc"
    with netCDF4.Dataset(nc) as ds:
        assert ds.Conventions == "AMBER" and ds.ConventionVersion == "1.0"
        assert ds.variables["coordinates"].shape == (3, n_atoms, 3)        # stride 100: steps 0, 100, 200
    traj = mdtraj.load(str(nc), top=str(pdb))
    assert traj.n_frames == 3 and traj.n_atoms == n_atoms
    np.testing.assert_allclose(traj.time, [0.0, 0.05, 0.1], atol=1e-6)
    np.testing.assert_allclose(traj.unitcell_lengths, BOX_NM, rtol=1e-5)
    np.testing.assert_allclose(traj.unitcell_angles, 90.0, rtol=1e-6)
    start = app.PDBFile(str(pdb)).getPositions(asNumpy=True).value_in_unit(unit.nanometer)
    np.testing.assert_allclose(traj.xyz[0], start, atol=2e-4)             # same atoms, same order, nm
    assert np.abs(traj.xyz[2] - traj.xyz[0]).max() > 1e-3                # and they moved

    props = _csv(out)
    np.testing.assert_array_equal(props["step"], np.arange(0, 201, 10))
    np.testing.assert_allclose(props["pot_mm_kjmol"], props["potential_kjmol"], rtol=1e-12)
    assert 150.0 < props["temperature_K"].mean() < 450.0

    # independent reference: OpenMM's own energy of the PDB structure, same force-field settings
    ff = app.ForceField("amber14/tip3p.xml")
    pdbf = app.PDBFile(str(pdb))
    system = ff.createSystem(pdbf.topology, nonbondedMethod=app.PME, nonbondedCutoff=CUTOFF_NM * unit.nanometer,
                             constraints=None, rigidWater=False, ewaldErrorTolerance=5e-4)
    ctx = openmm.Context(system, openmm.VerletIntegrator(1e-3), openmm.Platform.getPlatformByName("Reference"))
    ctx.setPositions(pdbf.positions)
    e0 = ctx.getState(getEnergy=True).getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
    assert props["potential_kjmol"][0] == pytest.approx(e0, rel=1e-4, abs=0.5)


def test_nve_conserves_energy(water_cluster, tmp_path):
    """NVE with the OpenMM client, 0.5 fs, 400 steps: the conserved energy neither drifts nor fluctuates by
    more than a small fraction of the kinetic-energy fluctuation."""
    out = tmp_path / "nve"
    rc, err = _finish(_mlmm(str(TEMPLATES / "nve_mm.xml"), "--system", str(water_cluster), "--steps", "400",
                            "--out", str(out)))
    assert rc == 0, err
    p = _csv(out)
    t, e = p["time_ps"], p["conserved_kjmol"]
    slope, icpt = np.polyfit(t, e, 1)
    drift = abs(slope) * (t[-1] - t[0])                       # kJ/mol over the run
    noise = np.std(e - (slope * t + icpt))
    scale = np.std(p["kinetic_md_kjmol"])                     # what a broken integrator would show
    assert scale > 1.0
    assert drift < 0.05 * scale, (drift, scale)
    assert noise < 0.05 * scale, (noise, scale)
    np.testing.assert_allclose(e, p["kinetic_md_kjmol"] + p["potential_kjmol"], atol=1e-3)


# ------------------------------------------------------------------------------------------------ bad input
MALFORMED = "<simulation>\n  <ffsocket name='mm' mode='unix'>\n</simulation>\n"


@pytest.mark.parametrize("case", ["malformed", "unknown_ff", "missing_system", "ml_without_model", "nonempty_out"])
def test_bad_input_one_line(case, water_cluster, tmp_path, capsys):
    xml = TEMPLATES / "nvt_bussi_mm.xml"
    system = str(water_cluster)
    out = tmp_path / "run"
    expect = {"malformed": "bad.xml:3:3: malformed XML", "unknown_ff": "<ffsocket name='qm'> has no client",
              "missing_system": "system file", "ml_without_model": "--model",
              "nonempty_out": "not empty"}[case]
    if case == "malformed":
        xml = tmp_path / "bad.xml"
        xml.write_text(MALFORMED)
    elif case == "unknown_ff":
        xml = tmp_path / "qm.xml"
        xml.write_text((TEMPLATES / "nvt_bussi_mm.xml").read_text().replace("'mm'", "'qm'"))
    elif case == "missing_system":
        system = str(tmp_path / "nope" / "system.toml")
    elif case == "ml_without_model":
        xml = TEMPLATES / "nvt_bussi.xml"
    elif case == "nonempty_out":
        out.mkdir()
        (out / "old.txt").write_text("x")
    rc = cli.main(["run", str(xml), "--system", system, "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    lines = _error_lines(err)
    assert rc == 2 and len(lines) == 1, err
    assert lines[0].startswith("mlmm: error:") and expect in lines[0]
    assert case == "nonempty_out" or not out.exists()       # nothing created before the input is valid


# ------------------------------------------------------------------------------------------------ failures
def test_client_killed_mid_run(water_box, tmp_path):
    """SIGKILL the real MM client mid-run (i-PI alone would hang forever, ipi.md §2.7): mlmm run exits with
    one error line, quickly, and leaves no process and no socket behind."""
    out = tmp_path / "run"
    proc = _mlmm(str(TEMPLATES / "nvt_bussi_mm.xml"), "--system", str(water_box), "--steps", "1000000",
                 "--out", str(out), "--max-restarts", "0")      # automatic recovery: tests/driver/test_reliability.py
    try:
        _wait_rows(out, 3)
        [pid] = [p for p, cmd in procs_in(out).items() if " client mm " in cmd]
        os.kill(pid, signal.SIGKILL)
        t0 = time.monotonic()
        rc, err = _finish(proc, timeout=60)
    finally:
        proc.kill()
    assert time.monotonic() - t0 < launch.IPI_GRACE_S + 15
    lines = _error_lines(err)
    assert rc == 2 and len(lines) == 1, err
    assert "client 'mm' died (killed by SIGKILL)" in lines[0] and "client_mm.log" in lines[0]
    _assert_clean(out)
    assert (out / "RESTART").is_file() and (out / "sim.pos_0.nc").is_file()


def test_client_exception_is_reported(water_cluster, dying_pes, tmp_path):
    """A client that raises (e.g. CUDA OOM) mid-run: the exception text ends up in the one-line error."""
    out = tmp_path / "run"
    t0 = time.monotonic()
    with pytest.raises(CalculationFailed) as exc:
        launch.run_simulation(TEMPLATES / "nvt_bussi_mm.xml", water_cluster, out=out, steps=100000,
                              progress=False, client_argv=_py_driver(dying_pes, "after=50,how=raise"),
                              max_restarts=0)
    assert time.monotonic() - t0 < 60
    msg = str(exc.value)
    assert "\n" not in msg and "client 'mm' died (exit code 1)" in msg
    assert "RuntimeError: simulated CUDA out of memory" in msg and str(out / "client_mm.log") in msg
    _assert_clean(out)


def test_self_killing_client_in_process(water_cluster, dying_pes, tmp_path):
    """Same as the CLI test with a client that SIGKILLs itself inside a force call (GETFORCE pending)."""
    out = tmp_path / "run"
    with pytest.raises(CalculationFailed, match=r"died \(killed by SIGKILL\) near step"):
        launch.run_simulation(TEMPLATES / "nvt_bussi_mm.xml", water_cluster, out=out, steps=100000,
                              progress=False, client_argv=_py_driver(dying_pes, "after=30,how=kill"),
                              max_restarts=0)
    _assert_clean(out)


def test_ipi_killed(water_cluster, dying_pes, tmp_path):
    """i-PI dies (SIGKILL, no RESTART update): mlmm reports it and stops the client."""
    out = tmp_path / "run"

    def kill_ipi():
        _wait_rows(out, 3)
        for pid, cmd in procs_in(out).items():
            if "i-pi input.xml" in cmd:
                os.kill(pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_ipi, daemon=True)
    killer.start()
    with pytest.raises(CalculationFailed, match=r"i-PI stopped \(killed by SIGKILL\) at step"):
        launch.run_simulation(TEMPLATES / "nvt_bussi_mm.xml", water_cluster, out=out, steps=1000000,
                              progress=False, client_argv=_py_driver(dying_pes, "after=100000000"))
    killer.join(5)
    _assert_clean(out)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_ctrl_c_stops_cleanly(sig, water_cluster, tmp_path):
    """Ctrl-C or SIGTERM to mlmm run: i-PI soft-exits (RESTART at the current step), exit code 128 + signal,
    one line, no leftovers, and the frames so far are in the NetCDF file."""
    import mdtraj

    out = tmp_path / "run"
    proc = _mlmm(str(TEMPLATES / "nvt_bussi_mm.xml"), "--system", str(water_cluster), "--steps", "1000000",
                 "--out", str(out))
    try:
        _wait_rows(out, 10)
        t0 = time.monotonic()
        proc.send_signal(sig)
        rc, err = _finish(proc, timeout=120)
        stop_s = time.monotonic() - t0
    finally:
        proc.kill()
    lines = _error_lines(err)
    assert rc == 128 + sig and len(lines) == 1 and lines[0].startswith("mlmm: interrupted: stopped at step"), err
    _assert_clean(out)
    step = int(ET.parse(out / "RESTART").getroot().findtext("step"))
    assert 90 <= step < 1000000
    # i-PI's soft exit polls once a second: seconds on an idle machine; the bound catches a hang, not a slow host
    assert stop_s < 60.0, stop_s
    traj = mdtraj.load(str(out / "sim.pos_0.nc"), top=str(water_cluster.parent / "water.pdb"))
    assert traj.n_frames == step // 100 + 1 or traj.n_frames == step // 100       # stride 100


def test_two_sockets_one_client_each(water_cluster, dying_pes, tmp_path):
    """The ML/MM template starts one client per <ffsocket> (here i-PI's py driver on both, same trap): both
    components are reported, named after their forcefield, and add up to the potential."""
    out = tmp_path / "run"
    seen: dict[str, str] = {}

    def argv(name: str, address: str) -> list[str]:
        seen[name] = address
        return _py_driver(dying_pes, "after=100000000")(name, address)

    # the py driver returns no JSON extras: drop the template's ML-extras trajectory (i-PI would stop on it)
    tree = ET.parse(TEMPLATES / "nvt_bussi.xml")
    output = tree.getroot().find("output")
    for t in output.findall("trajectory"):
        if (t.text or "").strip() == "extras":
            output.remove(t)
    tree.write(tmp_path / "nvt_bussi.xml")
    result = launch.run_simulation(tmp_path / "nvt_bussi.xml", water_cluster, out=out, steps=60, seed=1,
                                   progress=False, client_argv=argv)
    assert result.steps_done == result.total_steps == 60
    prefix = ET.parse(out / "input.xml").getroot().get("sockets_prefix")
    assert seen == {"mm": f"unix:{prefix}mm", "ml": f"unix:{prefix}ml"}
    assert {p.name for p in out.glob("client_*.log")} == {"client_mm.log", "client_ml.log"}
    p = _csv(out)
    np.testing.assert_allclose(p["pot_mm_kjmol"] + p["pot_ml_kjmol"], p["potential_kjmol"], rtol=1e-6)
    np.testing.assert_allclose(p["pot_mm_kjmol"], p["pot_ml_kjmol"], rtol=1e-9)
    assert result.trajectories == [out / "sim.pos_0.nc"] and result.properties_csv == out / "properties.csv"
    _assert_clean(out)


def test_inet_socket_as_named(water_cluster, dying_pes, tmp_path):
    """mode='inet' in the XML: i-PI binds the host/port the user named, the client gets HOST:PORT."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    xml = tmp_path / "inet.xml"
    xml.write_text((TEMPLATES / "nvt_bussi_mm.xml").read_text().replace(
        "mode='unix'", "mode='inet'").replace("<address> mm </address>",
                                              f"<address> 127.0.0.1 </address> <port> {port} </port>"))
    seen = []

    def argv(name: str, address: str) -> list[str]:
        seen.append(address)
        host, port_ = address.rsplit(":", 1)
        return [sys.executable, str(PY_DRIVER), "-a", host, "-p", port_, "-m", "custom", "-P", str(dying_pes),
                "-o", "after=100000000"]

    result = launch.run_simulation(xml, water_cluster, out=tmp_path / "run", steps=40, progress=False,
                                   client_argv=argv)
    assert seen == [f"127.0.0.1:{port}"] and result.steps_done == 40
    root = ET.parse(tmp_path / "run" / "input.xml").getroot()
    assert root.find("ffsocket").get("mode") == "inet" and root.findtext("ffsocket/port").strip() == str(port)


def test_unix_socket_is_private(water_cluster, dying_pes, tmp_path):
    """The socket folder is 0700 and i-PI's socket file in it 0600 (checked by the client before it connects)."""
    modes = tmp_path / "modes.txt"

    def argv(name: str, address: str) -> list[str]:
        path = address.split(":", 1)[1]
        inner = shlex.join(_py_driver(dying_pes, "after=100000000")(name, address))
        # wait for the socket, record the modes of folder and file, then run the real client
        return ["bash", "-c", f"for i in $(seq 200); do [ -S {path} ] && break; sleep 0.05; done; "
                              f"stat -c %a $(dirname {path}) {path} > {modes}; exec {inner}"]

    result = launch.run_simulation(TEMPLATES / "nvt_bussi_mm.xml", water_cluster, out=tmp_path / "run", steps=5,
                                   seed=1, progress=False, client_argv=argv)
    assert result.steps_done == 5
    assert modes.read_text().split() == ["700", "600"]
    _assert_clean(tmp_path / "run")


def test_client_threads_split_the_cores(monkeypatch):
    """Auto: half the cores for the CPU ML clients, all for OpenMM (its threads sleep when idle); explicit wins."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    assert launch.client_threads(None, "cpu", 1) == (4, 8)               # OpenMM's idle threads sleep
    assert launch.client_threads(None, "cpu", 2) == (2, 8)
    assert launch.client_threads(None, "cuda:0", 1) == (1, 8)            # the network is on the GPU
    assert launch.client_threads(None, "cpu", 0) == (1, 8)               # remote ML clients only
    assert launch.client_threads("1+1", "cpu", 1) == (1, 1)
    assert launch.client_threads("+6", "cpu", 1) == (4, 6)
    assert launch.client_threads("2+", "cpu", 2) == (2, 8)
    for bad in ("x", "0+1", "1+1+1", "2", "a+b"):
        with pytest.raises(SetupError, match="--threads"):
            launch.client_threads(bad, "cpu", 1)
    argv = rundir.client_argv_factory(Path("s.toml"), Path("m.pt"), "cpu", None, False, None, (3, 5), True)
    ml, mm = argv("ml", "unix:a"), argv("mm", "unix:b")
    assert ml[ml.index("--threads") + 1] == "3" and "--compile" in ml
    assert mm[mm.index("--threads") + 1] == "5" and "--compile" not in mm

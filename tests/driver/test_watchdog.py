"""Runs that never hang (issue 20): the watchdog for a client that hangs without dying, recovery from a killed
i-PI, remote clients watched by i-PI itself, and resumes that append to the outputs instead of rewriting them.
Real i-PI, real `mlmm client` processes, real sockets."""
from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from driver import checkpoints, heartbeat, launch, outputs, tails, trajectory, xmlinput
from potentials.core.errors import CalculationFailed
from potentials.core.spec import MLSpec, MMSpec, StructureSpec, SystemSpec
from run_helpers import procs_in, template_variant, tiny_model, write_water_cluster

REPO = Path(__file__).resolve().parents[2]
TEMPLATES = REPO / "inputs" / "templates"
SHIPPED_MODEL = REPO / "inputs" / "models" / "small_b3lyp_svp.pt"

pytestmark = pytest.mark.timeout(240)


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Path:
    """6 flexible TIP3P waters, no box, minimised; the first water is the ML zone of ``ml_system.toml``."""
    folder = tmp_path_factory.mktemp("cluster")
    write_water_cluster(folder)
    spec = SystemSpec(StructureSpec(file="water.pdb", forcefield=["amber14/tip3p.xml"], periodic=False),
                      mm=MMSpec(nonbonded_method="NoCutoff", rigid_water=False))
    spec.save(folder / "system.toml")
    spec.ml = MLSpec(selection="resid 1", indices=[0, 1, 2], charge=0)
    spec.save(folder / "ml_system.toml")
    return folder / "system.toml"


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """A random-weight tiny network: the ML client's real code path, cheap."""
    return tiny_model(tmp_path_factory.mktemp("model"))


def _steps(folder: Path) -> np.ndarray:
    return trajectory.read_properties(folder / "sim.out")[0]["step"]


def _nc_times(folder: Path) -> np.ndarray:
    import netCDF4

    with netCDF4.Dataset(folder / "sim.pos_0.nc") as ds:
        return np.asarray(ds["time"][:])


def _rows(folder: Path) -> int:
    f = folder / "sim.out"
    return sum(1 for ln in f.read_text().splitlines() if ln and not ln.startswith("#")) if f.is_file() else 0


def _signal_when(folder: Path, rows: int, needle: str, sig: int, hit: list, timeout: float = 120.0) -> None:
    """Send ``sig`` to the process whose command line contains ``needle`` once i-PI's properties file has
    ``rows`` rows; ``hit`` gets (pid, rows then)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        n = _rows(folder)
        if n >= rows:
            for pid, cmd in procs_in(folder).items():
                if needle in cmd:
                    os.kill(pid, sig)
                    hit.append((pid, n))
            return
        time.sleep(0.05)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------------ watchdog
def test_heartbeat_limits(tmp_path):
    """The writer's line reads back; a pending request or a silent client is hung past max(timeout, 10 x its
    slowest recent request), the first request gets 10 x timeout."""
    hb = heartbeat.Heartbeat(tmp_path / "hb")
    try:
        hb.begin()
        time.sleep(0.01)
        hb.end()
        beat = heartbeat.read(tmp_path / "hb")
        assert beat.pid == os.getpid() and beat.served == 1 and beat.busy_since == 0 and beat.slowest >= 0.01
    finally:
        hb.close()
    assert heartbeat.read(tmp_path / "hb") is None                  # done serving: not watched any more
    now = 1000.0
    fresh = heartbeat.Beat(1, 5, 0.0, 0.02, now)
    assert heartbeat.limit(fresh, 3.0) == 3.0 and heartbeat.hung(fresh, 3.0, now) is None
    assert heartbeat.limit(heartbeat.Beat(1, 5, 0.0, 1.0, now), 3.0) == 10.0        # slow client: its own pace
    assert "request 6 unanswered for 4 s" in heartbeat.hung(heartbeat.Beat(1, 5, now - 4, 0.02, now), 3.0, now)
    assert "no sign of life" in heartbeat.hung(heartbeat.Beat(1, 5, 0.0, 0.02, now - 4), 3.0, now)
    assert heartbeat.hung(heartbeat.Beat(1, 5, 0.0, 0.02, now - 2), 0.5, now) is None    # silent: >= 3 beats
    first = heartbeat.Beat(1, 0, now - 20, 0.0, now)                                 # compiling: 30 s allowed
    assert heartbeat.hung(first, 3.0, now) is None and heartbeat.hung(first, 1.5, now) is not None


@pytest.mark.slow
def test_stopped_client_is_detected_and_replaced(cluster, tmp_path, caplog):
    """SIGSTOP of the MM client mid-run (alive but answering nothing: i-PI alone would wait forever): the watchdog
    names it with its last log line, kills it, and the run goes on from RESTART to the end with every step's row
    and frame once."""
    xml = template_variant(TEMPLATES / "nvt_bussi_mm.xml", tmp_path / "nvt.xml", props=5, pos=10, safe=10)
    out = tmp_path / "run"
    hit: list = []
    stopper = threading.Thread(target=_signal_when, args=(out, 8, " client mm ", signal.SIGSTOP, hit), daemon=True)
    stopper.start()
    t0 = time.monotonic()
    with caplog.at_level("INFO"):
        result = launch.run_simulation(xml, cluster, out=out, steps=600, seed=4, progress=False, client_timeout=3.0)
    stopper.join(5)
    assert len(hit) == 1, "the MM client was never stopped: the test did not test anything"
    assert result.steps_done == 600
    lines = [r.getMessage() for r in caplog.records if "automatic restart 1 of 3" in r.getMessage()]
    assert len(lines) == 1 and "\n" not in lines[0], lines
    assert "client 'mm' hung (" in lines[0] and "--client-timeout 3 s" in lines[0], lines[0]
    assert "its last log line: " in lines[0] and "client_mm.log" in lines[0]
    np.testing.assert_array_equal(_steps(out), np.arange(0, 601, 5))
    np.testing.assert_allclose(_nc_times(out), np.arange(0, 601, 10) * 0.5e-3, atol=1e-6)
    assert procs_in(out) == {}
    assert time.monotonic() - t0 < 120


# ------------------------------------------------------------------------------------------------ dead i-PI
@pytest.mark.slow
def test_killed_ipi_is_recovered(cluster, tmp_path, caplog):
    """SIGKILL of i-PI itself mid-run (no soft exit, no RESTART written): the run continues from the newest
    automatic checkpoint with a fresh i-PI and fresh clients; every step's row and frame once, the same numbers
    as an uninterrupted run with the same seed, the checkpoints cleaned up at the end."""
    xml = template_variant(TEMPLATES / "nvt_bussi_mm.xml", tmp_path / "nvt.xml", props=2, pos=4, safe=10)
    out, ref = tmp_path / "killed", tmp_path / "ref"
    hit: list = []
    killer = threading.Thread(target=_signal_when, args=(out, 30, "i-pi input.xml", signal.SIGKILL, hit),
                              daemon=True)
    killer.start()
    with caplog.at_level("INFO"):
        result = launch.run_simulation(xml, cluster, out=out, steps=120, seed=9, progress=False,
                                       checkpoint_stride=20)
    killer.join(5)
    assert len(hit) == 1, "i-PI was never killed: the test did not test anything"
    assert result.steps_done == 120
    lines = [r.getMessage() for r in caplog.records if "automatic restart 1 of 3" in r.getMessage()]
    assert len(lines) == 1 and "i-PI died (killed by SIGKILL)" in lines[0], lines
    step = int(lines[0].split(" at step ")[1].split()[0])
    assert "from sim.autosave_" in lines[0] and step % 20 == 0 and 0 < step <= 2 * hit[0][1]
    launch.run_simulation(xml, cluster, out=ref, steps=120, seed=9, progress=False)
    np.testing.assert_array_equal(_steps(out), np.arange(0, 121, 2))
    a, b = trajectory.read_properties(ref / "sim.out")[0], trajectory.read_properties(out / "sim.out")[0]
    for k in a:       # RESTART's text state: ~1e-7 relative, growing over the 80 continued steps; a lost step or
        np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-4, err_msg=k)    # a reseeded thermostat: ~1
    np.testing.assert_allclose(_nc_times(out), np.arange(0, 121, 4) * 0.5e-3, atol=1e-6)
    assert not checkpoints.autosaves(out, xmlinput.load(out / "input.xml").getroot())
    assert procs_in(out) == {}


# ------------------------------------------------------------------------------------------------ remote clients
def _remote_client(system: Path, model: Path, port: int, log: Path):
    import subprocess

    return subprocess.Popen([sys.executable, "-m", "driver.cli", "client", "ml", "--system", str(system),
                             "--model", str(model), "--address", f"127.0.0.1:{port}", "--threads", "1"],
                            cwd=REPO, stdout=open(log, "ab"), stderr=subprocess.STDOUT)


# the client is signalled at step 25-30 (6 rows); the resumed rest is ~30 ms a step with the shipped model: 100 steps
# leave > 2 s between the signal and the end of the run, and no continuation longer than the test needs (CI time)
REMOTE_STEPS = 100


@pytest.mark.slow
@pytest.mark.parametrize("how", ["kill", "stop"])
def test_remote_client_failure_ends_run_cleanly(how, cluster, tmp_path):
    """A remote ML client (started by hand, inet socket, --ml-clients 0 --remote-ml-clients 1) killed -9 or
    stopped mid-run: i-PI itself drops it (exit_on_disconnect, timeout), writes RESTART and stops; mlmm run ends
    with one line naming the client, nothing left running. After the kill, a new remote client and --resume
    finish the run with every step once."""
    port = _free_port()
    system, model = cluster.parent / "ml_system.toml", SHIPPED_MODEL     # a random network would blow water up
    xml = template_variant(TEMPLATES / "nvt_bussi.xml", tmp_path / "nvt.xml", props=5, pos=10, safe=5, inet_ml=port)
    out = tmp_path / "run"
    client = _remote_client(system, model, port, tmp_path / "remote.log")
    hit: list = []
    sig = signal.SIGKILL if how == "kill" else signal.SIGSTOP
    # the remote client does not run in the run folder: it is signalled by its pid
    actor = threading.Thread(target=lambda: (_wait_rows(out, 6), os.kill(client.pid, sig), hit.append(1)),
                             daemon=True)
    actor.start()
    try:
        with pytest.raises(CalculationFailed) as exc:
            launch.run_simulation(xml, system, out=out, model=model, steps=REMOTE_STEPS, seed=2, progress=False,
                                  ml_clients=0, remote_ml_clients=1, client_timeout=0.5)
    finally:
        client.kill()
        client.wait()
    actor.join(5)
    msg = str(exc.value)
    assert hit and "\n" not in msg, msg
    assert "the client at ('127.0.0.1'," in msg and "i-PI stopped at step" in msg and "--resume" in msg, msg
    # killed: FIN (i-PI drops it) or, killed with data unread, RST (i-PI's socket thread dies, mlmm stops i-PI)
    assert ("disconnected" in msg or "dropped its connection in the middle of a request" in msg) if how == "kill" \
        else ("did not answer a request within 5 s" in msg), msg
    step = xmlinput.restart_step(out / "RESTART")
    assert 0 < step < REMOTE_STEPS and procs_in(out) == {}
    if how == "stop":
        return                      # the continuation is the same as after a kill (CI time)
    client = _remote_client(system, model, port, tmp_path / "remote.log")
    try:
        result = launch.resume_simulation(out, progress=False)
    finally:
        client.wait(30)
        client.kill()
    assert result.steps_done == REMOTE_STEPS
    np.testing.assert_array_equal(_steps(out), np.arange(0, REMOTE_STEPS + 1, 5))
    np.testing.assert_allclose(_nc_times(out), np.arange(0, REMOTE_STEPS + 1, 10) * 0.5e-3, atol=1e-6)


def _wait_rows(folder: Path, n: int, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _rows(folder) < n:
        time.sleep(0.05)


def test_ipi_log_names_the_lost_client(tmp_path):
    """The phrases read from i-PI's log: a dropped client (closed connection, timeout) and a reset connection
    that killed a socket's thread, naming the network client."""
    from driver.supervise import ipi_lost_client

    log = tmp_path / "ipi.log"
    hello = (" @interfacesocket.pool_update:   Client asked for connection from . Now hand-shaking.\n"
             " @interfacesocket.pool_update:   Client asked for connection from ('10.0.0.7', 4711). Now hand-shaking.\n")
    log.write_text(hello + " !W!  @SOCKET:   Client ('10.0.0.7', 4711) died or got unresponsive(C). Removing\n")
    assert ipi_lost_client(log) == "the client at ('10.0.0.7', 4711) disconnected (it died or was killed)"
    log.write_text(hello + " !W!  @SOCKET:  Timeout! request has been running for 5.0012 sec.\n"
                   " !W!  @SOCKET:   Client ('10.0.0.7', 4711) died or got unresponsive(A). Disconnecting.\n")
    assert "('10.0.0.7', 4711) did not answer a request within 5 s" in ipi_lost_client(log)
    log.write_text(hello + "Exception in thread poll_ml:\nTraceback (most recent call last):\n"
                   "ConnectionResetError: [Errno 104] Connection reset by peer\n")
    assert ipi_lost_client(log, "ml") == ("the client at ('10.0.0.7', 4711) dropped its connection in the middle of "
                                          "a request (it died or was killed)")
    assert ipi_lost_client(tmp_path / "none.log") is None


DYING_PES = '''
import os, signal
from ipi.pes.dummy import Dummy_driver

__DRIVER_NAME__ = "dying"
__DRIVER_CLASS__ = "Dying_driver"


class Dying_driver(Dummy_driver):
    """Weak harmonic trap (a.u.) that SIGKILLs itself inside its call number `after` (GETFORCE still unread)."""

    def __init__(self, after=1000000, *args, **kwargs):
        self.after, self.calls = int(after), 0
        super().__init__(*args, **kwargs)

    def compute_structure(self, cell, pos):
        self.calls += 1
        if self.calls >= self.after:
            os.kill(os.getpid(), signal.SIGKILL)
        return 0.5e-4 * (pos**2).sum(), -1e-4 * pos, cell * 0.0, ""
'''


@pytest.mark.timeout(120)
@pytest.mark.xfail(reason="timed out once (240 s) in a clean-clone CI run, passed in two others: a race between "
                          "i-PI's broken poll thread and the supervisor, under investigation", strict=False)
def test_remote_client_reset_stops_run_cleanly(cluster, tmp_path):
    """A remote client killed with a request unread (i-PI's own py driver, which does not read GETFORCE ahead):
    the reset connection kills i-PI's socket thread, so i-PI would wait forever; the supervisor sees it in i-PI's
    log, stops i-PI (RESTART written) and names the client in one line, quickly."""
    import subprocess

    pes = tmp_path / "dying.py"
    pes.write_text(DYING_PES)
    port = _free_port()
    driver = Path(sys.executable).parent / "i-pi-py_driver"
    xml = template_variant(TEMPLATES / "nvt_bussi.xml", tmp_path / "nvt.xml", props=5, pos=10, safe=5, inet_ml=port)
    tree = xmlinput.load(xml)                              # the py driver sends no extras
    output = tree.getroot().find("output")
    for t in output.findall("trajectory"):
        if (t.text or "").strip() == "extras":
            output.remove(t)
    xmlinput.write(tree, xml)

    def argv(name: str, address: str) -> list[str]:           # the local MM client: a harmless py driver
        return [sys.executable, str(driver), "-u", "-S", "", "-a", address.removeprefix("unix:"), "-m", "custom",
                "-P", str(pes), "-o", "after=100000000"]

    remote = subprocess.Popen([sys.executable, str(driver), "-a", "127.0.0.1", "-p", str(port), "-m", "custom",
                               "-P", str(pes), "-o", "after=60"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    out = tmp_path / "run"
    t0 = time.monotonic()
    try:
        with pytest.raises(CalculationFailed) as exc:
            launch.run_simulation(xml, cluster, out=out, steps=100000, progress=False, client_argv=argv,
                                  ml_clients=0, remote_ml_clients=1)
    finally:
        remote.kill()
        remote.wait()
    msg = str(exc.value)
    assert "\n" not in msg and "the client at ('127.0.0.1'," in msg, msg
    assert "dropped its connection in the middle of a request" in msg and "--resume" in msg, msg
    assert 0 < xmlinput.restart_step(out / "RESTART") < 100 and procs_in(out) == {}
    assert time.monotonic() - t0 < 60

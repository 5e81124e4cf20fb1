"""Reliability of `mlmm run` (issue 7): resuming from i-PI's RESTART, automatic recovery from a killed client,
cutting appended outputs back to the restart step. Real i-PI, real OpenMM / network clients, real sockets.

Equivalence is checked against an uninterrupted run with the same seed: the Bussi thermostat's random stream
is restored from RESTART, so the continued run must reproduce every printed property (i-PI prints 8 significant
digits; the thermostat energy in RESTART is stored as text, so `conserved` may differ in the last digits).
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from openmm import app, unit

from driver import launch, trajectory, xmlinput
from potentials.core.errors import CalculationFailed, SetupError
from run_helpers import minimised_example, procs_in, template_variant, tiny_model, write_water_cluster
from potentials.core.spec import MMSpec, StructureSpec, SystemSpec

REPO = Path(__file__).resolve().parents[2]
TEMPLATES = REPO / "inputs" / "templates"

pytestmark = pytest.mark.timeout(240)


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Path:
    """6 flexible TIP3P waters, no box, minimised (fast MM client start)."""
    folder = tmp_path_factory.mktemp("cluster")
    write_water_cluster(folder)
    SystemSpec(StructureSpec(file="water.pdb", forcefield=["amber14/tip3p.xml"], periodic=False),
               mm=MMSpec(nonbonded_method="NoCutoff", rigid_water=False)).save(folder / "system.toml")
    return folder / "system.toml"


@pytest.fixture(scope="module")
def example(tmp_path_factory) -> Path:
    """The methanol example as `mlmm prepare` left it: the random network below would pull a water onto the
    hydrogen-bonded hydroxyl H of the equilibrated one (run_helpers.minimised_example)."""
    return minimised_example(tmp_path_factory.mktemp("example"))


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """A random-weight tiny network: the ML client's real code path, cheap."""
    return tiny_model(tmp_path_factory.mktemp("model"))


def _props(folder: Path) -> dict[str, np.ndarray]:
    values, _ = trajectory.read_properties(folder / "sim.out")
    return values


def _nc(folder: Path, name: str = "sim.pos_0.nc") -> tuple[np.ndarray, np.ndarray]:
    import netCDF4

    with netCDF4.Dataset(folder / name) as ds:
        return np.asarray(ds["time"][:]), np.asarray(ds["coordinates"][:])


def _assert_same_run(a: Path, b: Path, steps: np.ndarray) -> None:
    """Two run folders hold the same trajectory: every property row once, same values, same frames."""
    pa, pb = _props(a), _props(b)
    np.testing.assert_array_equal(pb["step"], steps)
    assert set(pa) == set(pb)
    for k in pa:
        # i-PI prints 8 digits; RESTART's text state and OpenMM's single-precision forces let the continued run
        # drift from the uninterrupted one by ~1e-7 relative over these 20 steps (a lost step or a reseeded
        # thermostat gives differences of order 1)
        np.testing.assert_allclose(pb[k], pa[k], rtol=1e-6, atol=1e-5, err_msg=k)
    ta, xa = _nc(a)
    tb, xb = _nc(b)
    np.testing.assert_allclose(tb, ta, atol=1e-6)
    np.testing.assert_allclose(xb, xa, atol=1e-4)           # float32 Å
    assert np.all(np.diff(tb) > 0)


# ------------------------------------------------------------------------------------------------ trimming
def test_trim_outputs_cuts_back_to_step(tmp_path):
    """Properties rows, xyz frames and extras blocks after the restart step are cut, a half-written row too;
    earlier content is byte-identical."""
    keep_props = "# column   1     --> step : The current simulation time step.\n" + \
        "".join(f"{s:10d} {s * 0.1:.8e}\n" for s in range(0, 21, 2))
    (tmp_path / "sim.out").write_text(keep_props + "".join(f"{s:10d} {s * 0.1:.8e}\n" for s in (22, 24)) + "  26 1.")

    def xyz(s: int) -> str:
        return f"2\n# CELL(abcABC): 1 1 1 90 90 90 Step: {s:10d} Bead: 0 positions{{angstrom}}\n" \
               f"O 0 0 {s}\nH 0 1 {s}\n"
    (tmp_path / "sim.pos_0.xyz").write_text("".join(xyz(s) for s in (0, 10, 20, 30)))

    def extras(s: int) -> str:
        return f" #ML.DIPOLE(ml.dipole)# Step:  {s:10d} Bead:      0 \n 0.1 0.2 0.3\n"
    (tmp_path / "sim.ml_extras_0").write_text("".join(extras(s) for s in (10, 20, 30)))
    (tmp_path / "sim.pos_0.nc").write_bytes(b"left alone")
    root = ET.fromstring("<simulation><output prefix='sim'><properties filename='out'/>"
                         "<trajectory filename='pos' format='xyz'> positions </trajectory>"
                         "<trajectory filename='ml_extras'> extras </trajectory></output></simulation>")
    launch.trim_outputs(tmp_path, root, 20)
    assert (tmp_path / "sim.out").read_text() == keep_props
    assert (tmp_path / "sim.pos_0.xyz").read_text() == "".join(xyz(s) for s in (0, 10, 20))
    assert (tmp_path / "sim.ml_extras_0").read_text() == "".join(extras(s) for s in (10, 20))
    assert (tmp_path / "sim.pos_0.nc").read_bytes() == b"left alone"
    launch.trim_outputs(tmp_path, root, 20)                        # idempotent
    assert (tmp_path / "sim.out").read_text() == keep_props


# ------------------------------------------------------------------------------------------------ resume
def test_resume_matches_uninterrupted(cluster, tmp_path):
    """Seeded SVR NVT: 40 steps in one go == 20 steps + `mlmm run --resume` to 40 (through the CLI): the same
    properties to i-PI's printed precision, each row once, one continuous NetCDF trajectory."""
    from driver import cli

    xml = template_variant(TEMPLATES / "nvt_bussi_mm.xml", tmp_path / "nvt.xml", props=2, pos=4, safe=10)
    full, split = tmp_path / "full", tmp_path / "split"
    launch.run_simulation(xml, cluster, out=full, steps=40, seed=11, progress=False)
    launch.run_simulation(xml, cluster, out=split, steps=20, seed=11, progress=False)
    assert _props(split)["step"][-1] == 20
    with pytest.raises(SetupError, match="already reached step 20 of 20"):
        launch.resume_simulation(split, progress=False)
    assert cli.main(["run", "--resume", str(split), "--steps", "40", "--no-progress"]) == 0
    _assert_same_run(full, split, np.arange(0, 41, 2))
    assert (split / "resume.xml").is_file() and xmlinput.restart_step(split / "RESTART") == 40
    assert len(_nc(split)[0]) == 11                              # steps 0, 4, ..., 40


# ------------------------------------------------------------------------------------------------ recovery
def _rows(folder: Path) -> int:
    f = folder / "sim.out"
    return sum(1 for ln in f.read_text().splitlines() if ln and not ln.startswith("#")) if f.is_file() else 0


def _kill_when(folder: Path, rows: int, needle: str, killed: list[int], timeout: float = 120.0) -> None:
    """SIGKILL the process whose command line contains ``needle`` once i-PI's properties file has ``rows`` rows;
    ``killed`` gets the pid and the number of rows written once the kill has landed. That count is taken after it:
    i-PI can finish steps between the first count and the kill (milliseconds a step with a tiny model), and none
    after it, as the dead client's forces never come."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _rows(folder) >= rows:
            for pid, cmd in procs_in(folder).items():
                if needle in cmd:
                    os.kill(pid, signal.SIGKILL)
                    time.sleep(0.2)                 # i-PI writes the outputs of the step it had finished
                    killed += [pid, _rows(folder)]
            return
        time.sleep(0.05)


def test_killed_ml_client_recovers(model, example, tmp_path, caplog):
    """kill -9 of the ML client mid-run (methanol in water, real network and OpenMM clients): the supervisor
    stops i-PI (RESTART), cuts the outputs back to RESTART's step (safe_stride 10 > properties stride 2, so rows
    past it exist), restarts everything and finishes. Every step's row once, one continuous trajectory, and
    the same numbers as an uninterrupted run with the same seed."""
    xml = template_variant(TEMPLATES / "nvt_bussi.xml", tmp_path / "nvt.xml", props=2, pos=10, safe=10)
    out, ref = tmp_path / "killed", tmp_path / "ref"
    killed: list[int] = []
    killer = threading.Thread(target=_kill_when, args=(out, 8, " client ml ", killed), daemon=True)
    killer.start()
    with caplog.at_level("INFO"):
        result = launch.run_simulation(xml, example, out=out, model=model, steps=30, seed=5, progress=False)
    killer.join(5)
    assert len(killed) == 2, "the ML client was never killed: the test did not test anything"
    assert result.steps_done == 30
    restarts = [r.getMessage() for r in caplog.records if "automatic restart 1 of 3" in r.getMessage()]
    assert len(restarts) == 1 and "client 'ml' died (killed by SIGKILL)" in restarts[0]
    restart_step = int(restarts[0].split("from RESTART at step ")[1].split()[0])
    assert restart_step % 10 == 0 and restart_step <= 2 * (killed[1] - 1)
    if 2 * (killed[1] - 1) > restart_step:      # rows past RESTART's step existed: they must have been cut
        assert any("sim.out: removed" in r.getMessage() for r in caplog.records)
    log = (out / "client_ml.log").read_text()
    assert log.count("summary:") == 1           # the first client died without one; its log was kept, appended
    assert (out / "resume.xml").is_file() and procs_in(out) == {}
    launch.run_simulation(xml, example, out=ref, model=model, steps=30, seed=5, progress=False)
    _assert_same_run(ref, out, np.arange(0, 31, 2))
    assert len(_nc(out)[0]) == 4                # steps 0, 10, 20, 30


def test_client_error_is_not_restarted(cluster, tmp_path):
    """A client that stops with its own one-line error (exit code 2: bad input, exploding structure) is not
    restarted: the same error would come back. Here: an MM client handed the wrong system (atom-count mismatch)."""
    other = tmp_path / "other"
    other.mkdir()
    spec = SystemSpec.load(cluster)
    # the same waters minus one: the client's atom count disagrees with i-PI's
    pdb = app.PDBFile(str(spec.structure_path))
    m = app.Modeller(pdb.topology, pdb.positions)
    m.delete(list(m.topology.residues())[:1])
    with open(other / "water.pdb", "w") as fh:
        app.PDBFile.writeFile(m.topology, m.positions, fh)
    SystemSpec(StructureSpec(file="water.pdb", forcefield=["amber14/tip3p.xml"], periodic=False),
               mm=MMSpec(nonbonded_method="NoCutoff", rigid_water=False)).save(other / "system.toml")

    def argv(name: str, address: str) -> list[str]:
        return [sys.executable, "-m", "driver.cli", "client", name, "--system", str(other / "system.toml"),
                "--address", address]
    t0 = time.monotonic()
    with pytest.raises(CalculationFailed) as exc:
        launch.run_simulation(TEMPLATES / "nvt_bussi_mm.xml", cluster, out=tmp_path / "run", steps=20,
                              progress=False, client_argv=argv)
    msg = str(exc.value)
    assert "client 'mm' died (exit code 2)" in msg and "atom" in msg and "automatic restart" not in msg, msg
    assert time.monotonic() - t0 < 60
    assert not (tmp_path / "run" / "resume.xml").exists()


# ------------------------------------------------------------------------------------------------ exploding
def _timestep(src: Path, dst: Path, fs: float) -> Path:
    tree = xmlinput.load(src)
    tree.getroot().find("system/motion/dynamics/timestep").text = f" {fs} "
    xmlinput.write(tree, dst)
    return dst


def test_exploding_structure_stops_with_last_good_frame(cluster, tmp_path):
    """A 10 fs step with flexible water blows up: the MM client refuses forces above the threshold, the run stops
    (no automatic restart: the same state would explode again) with one line naming the request, atoms and a
    cause, and the last accepted state is saved as a readable PDB."""
    xml = _timestep(template_variant(TEMPLATES / "nvt_bussi_mm.xml", tmp_path / "a.xml", props=1, pos=1, safe=1),
                    tmp_path / "nvt.xml", 10.0)
    out = tmp_path / "run"
    with pytest.raises(CalculationFailed) as exc:
        launch.run_simulation(xml, cluster, out=out, steps=2000, seed=3, progress=False, max_force=2.0e4)
    msg = str(exc.value)
    assert "\n" not in msg and "client 'mm' died (exit code 2)" in msg and "automatic restart" not in msg, msg
    assert "exploding structure at request" in msg and "above --max-force 2e+04" in msg and "likely cause:" in msg
    assert "HOH" in msg and ", MM)" in msg                   # worst atoms named with residue and ML/MM
    assert "last good frame" in msg and str(out / "last_good.pdb") in msg
    good = app.PDBFile(str(out / "last_good.pdb"))
    step = xmlinput.restart_step(out / "RESTART")
    assert 0 < step < 2000 and good.topology.getNumAtoms() == 18
    # it is the state i-PI holds at that step: the frame of the (every-step) trajectory at the same step
    frames = {s: p for s, p, _, _ in trajectory.ipi_frames(out / "sim.pos_0.xyz")}
    np.testing.assert_allclose(good.getPositions(asNumpy=True).value_in_unit(unit.angstrom), frames[step],
                               atol=2e-3)


def test_lj_clash_is_named(cluster, tmp_path):
    """Two waters overlapping (O on top of another water's H): the cause named is a Lennard-Jones clash."""
    spec = SystemSpec.load(cluster)
    pdb = app.PDBFile(str(spec.structure_path))
    pos = pdb.getPositions(asNumpy=True).value_in_unit(unit.nanometer)
    pos[3] = pos[1] + np.array([0.05, 0.0, 0.0])             # O of water 2 at 0.05 nm from H of water 1
    folder = tmp_path / "clash"
    folder.mkdir()
    with open(folder / "water.pdb", "w") as fh:
        app.PDBFile.writeFile(pdb.topology, pos * unit.nanometer, fh)
    SystemSpec(StructureSpec(file="water.pdb", forcefield=["amber14/tip3p.xml"], periodic=False),
               mm=MMSpec(nonbonded_method="NoCutoff", rigid_water=False)).save(folder / "system.toml")
    with pytest.raises(CalculationFailed, match=r"exploding structure at request 1 .*likely cause: a Lennard-Jones "
                                                r"clash: atom \d+ and atom \d+ \(O HOH 2, MM\) of another residue are 0.0\d\d nm"):
        launch.run_simulation(TEMPLATES / "nvt_bussi_mm.xml", folder / "system.toml", out=tmp_path / "run",
                              steps=20, progress=False)


# ------------------------------------------------------------------------------------------------ bad input
def _run_cli(*args: str) -> tuple[int, list[str]]:
    """`mlmm run ...` in a subprocess: exit code and the stderr lines that are not logging lines."""
    import subprocess

    proc = subprocess.run([sys.executable, "-m", "driver.cli", "run", *args, "--no-progress"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and not ln[:8].replace(":", "").isdigit()]
    return proc.returncode, lines


@pytest.fixture(scope="module")
def ml_cluster(cluster) -> Path:
    """The water cluster with its first water as the ML zone."""
    from potentials.core.spec import MLSpec

    spec = SystemSpec.load(cluster)
    spec.ml = MLSpec(selection="resid 1", indices=[0, 1, 2], charge=0)
    path = cluster.parent / "ml_system.toml"
    spec.save(path)
    return path


@pytest.mark.parametrize("case", ["other_version", "unknown_element", "port_in_use", "resume_not_a_run"])
def test_bad_input_one_line_nothing_written(case, ml_cluster, model, tmp_path):
    """Each bad input: exit code 2, one `mlmm: error:` line naming the problem, no run folder written."""
    import socket

    import torch

    out = tmp_path / "run"
    args = [str(TEMPLATES / "nvt_bussi.xml"), "--system", str(ml_cluster), "--out", str(out), "--steps", "5"]
    held = None
    if case == "other_version":
        d = torch.load(model, weights_only=True)
        d["format_version"] = 99
        torch.save(d, tmp_path / "old.pt")
        args += ["--model", str(tmp_path / "old.pt")]
        expect = "has format_version 99"
    elif case == "unknown_element":
        from potentials.model_io import save_model
        from potentials.network import EmbeddedAIMNet2, ModelConfig

        cfg = ModelConfig.from_toml(REPO / "inputs/models/configs/tiny.toml", elements=[1, 6])
        save_model(tmp_path / "hc.pt", EmbeddedAIMNet2(cfg, seed=1))
        args += ["--model", str(tmp_path / "hc.pt")]
        expect = "cannot describe the ML zone"
    elif case == "port_in_use":
        held = socket.socket()
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        tree = xmlinput.load(TEMPLATES / "nvt_bussi_mm.xml")
        el = tree.getroot().find("ffsocket")
        el.set("mode", "inet")
        el.find("address").text = "127.0.0.1"
        ET.SubElement(el, "port").text = str(port)
        xmlinput.write(tree, tmp_path / "inet.xml")
        args = [str(tmp_path / "inet.xml"), "--system", str(ml_cluster), "--out", str(out), "--steps", "5"]
        expect = f"127.0.0.1:{port} is not free"
    else:
        (tmp_path / "junk").mkdir()
        args = ["--resume", str(tmp_path / "junk")]
        expect = "no readable run.json"
    try:
        rc, lines = _run_cli(*args)
    finally:
        if held is not None:
            held.close()
    assert rc == 2 and len(lines) == 1, lines
    assert lines[0].startswith("mlmm: error:") and expect in lines[0], lines
    assert not out.exists()


def test_force_guard_names_ml_atoms_and_cause(ml_cluster):
    """The client's check on its own: a NaN force on an ML atom -> 'non-finite', the atom named as ML, the
    model's training domain as the likely cause; forces under the threshold pass; a bad threshold is refused."""
    from driver.client import ForceGuard

    spec = SystemSpec.load(ml_cluster)
    pos = app.PDBFile(str(spec.structure_path)).getPositions(asNumpy=True).value_in_unit(unit.nanometer)
    guard = ForceGuard(spec, max_force=1e4)
    forces = np.full((len(pos), 3), 10.0)
    guard.check(None, pos, None, -1.0, forces, 1, 0)             # fine: no exception
    forces[1] = np.nan
    with pytest.raises(CalculationFailed, match=r"request 7 \(structure 0\).*non-finite.*worst atoms: atom 1 "
                                                r"\(H1 HOH 1, ML\).*training domain"):
        guard.check(None, pos, None, -1.0, forces, 7, 0)
    forces[1], forces[10] = 0.0, [0.0, 3e4, 0.0]                # above the threshold, an MM atom
    with pytest.raises(CalculationFailed, match=r"above --max-force 1e\+04.*atom 10 \(\w+ HOH 4, MM\) \|F\| = 3e\+04"
                                                r".*time step"):
        guard.check(None, pos, None, -1.0, forces, 7, 0)
    with pytest.raises(SetupError, match="--max-force"):
        ForceGuard(spec, max_force=0.0)


def test_killed_mm_client_recovers_cli(cluster, tmp_path):
    """`mlmm run` (CLI, its own process) with the MM client killed -9 mid-run: exit code 0, every step's row
    exactly once, the NetCDF continuous, no process left."""
    import subprocess

    xml = template_variant(TEMPLATES / "nvt_bussi_mm.xml", tmp_path / "nvt.xml", props=5, pos=10, safe=20)
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "driver.cli", "run", str(xml), "--system", str(cluster),
                             "--out", str(out), "--steps", "300", "--seed", "2", "--no-progress"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed: list[int] = []
    try:
        _kill_when(out, 6, " client mm ", killed)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert len(killed) == 2 and proc.returncode == 0, err
    assert "automatic restart 1 of 3" in err
    np.testing.assert_array_equal(_props(out)["step"], np.arange(0, 301, 5))
    t, _ = _nc(out)
    np.testing.assert_allclose(t, np.arange(0, 301, 10) * 0.5e-3, atol=1e-6)
    assert procs_in(out) == {}

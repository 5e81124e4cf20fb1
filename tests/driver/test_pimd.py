"""Path-integral ML/MM through `mlmm run`: real i-PI, the real ML client (a random-weight tiny network) and the
real OpenMM client on the shipped methanol-in-water example (2637 atoms, PME).

What is checked: the quantum (centroid-virial) kinetic energy exceeds the classical one with 4 beads and is the
classical one with 1 bead; batched bead evaluation gives the forces of one-by-one evaluation (through i-PI and
in the engine); ring-polymer contraction evaluates each force on the stated number of beads (counted by the
clients: each one logs how many structures it computed); two ML clients share the beads of one forcefield.
The templates are parsed by i-PI's own input classes.
"""
from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

from driver import launch, rundir, xmlinput
from driver.client import distinct_prefix
from potentials.core.errors import SetupError
from potentials.core.spec import SystemSpec
from run_helpers import minimised_example

REPO = Path(__file__).resolve().parents[2]
TEMPLATES = REPO / "inputs" / "templates"
PIMD = sorted(TEMPLATES.glob("pimd_*.xml"))
EXAMPLE = REPO / "inputs" / "examples" / "methanol" / "prepared" / "system.toml"
T_K = 300.0

pytestmark = pytest.mark.timeout(240)


START = EXAMPLE                 # the system the runs start from (set by _example_start)


@pytest.fixture(scope="module", autouse=True)
def _example_start(tmp_path_factory) -> None:
    """The runs start from the example as `mlmm prepare` left it, not from its equilibrated structure: the random
    network below would pull a water onto the hydrogen-bonded hydroxyl H (run_helpers.minimised_example)."""
    global START
    START = minimised_example(tmp_path_factory.mktemp("example"))


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """A random-weight tiny network (same code paths as a trained one; the dynamics only has to stay finite)."""
    from potentials.model_io import save_model
    from potentials.network import EmbeddedAIMNet2, ModelConfig

    path = tmp_path_factory.mktemp("model") / "tiny.pt"
    save_model(path, EmbeddedAIMNet2(ModelConfig.from_toml(REPO / "inputs/models/configs/tiny.toml"), seed=1))
    return path


# ------------------------------------------------------------------------------------------------ helpers
def _variant(src: Path, dst: Path, *, batch: int | None = None, stride: int | None = None,
             forces_out: bool = False) -> Path:
    """A copy of template ``src``: ``batch`` sets every socket's <batch_size> (1 = unbatched), ``stride`` the
    properties stride, ``forces_out`` adds a per-bead force trajectory written every step."""
    tree = xmlinput.load(src)
    root = tree.getroot()
    if batch is not None:
        for el in root.iter("ffsocket"):
            bs = el.find("batch_size")
            if bs is None:
                bs = ET.SubElement(el, "batch_size")
            bs.text = str(batch)
    if stride is not None:
        root.find("output/properties").set("stride", str(stride))
        root.set("safe_stride", str(stride))
    if forces_out:
        ET.SubElement(root.find("output"), "trajectory", filename="frc", stride="1", format="xyz").text = \
            "forces{piconewton}"
    xmlinput.write(tree, dst)
    return dst


def _run(xml: Path, model: Path, out: Path, steps: int, beads: int, **kw) -> launch.RunResult:
    return launch.run_simulation(xml, START, out=out, model=model, steps=steps, seed=7, beads=beads,
                                 progress=False, **kw)


def _csv(folder: Path) -> dict[str, np.ndarray]:
    lines = (folder / "properties.csv").read_text().splitlines()
    head = lines[0].split(",")
    rows = np.array([[float(v) for v in ln.split(",")] for ln in lines[1:]])
    return {k: rows[:, i] for i, k in enumerate(head)}


def _summary(log: Path) -> dict[str, float]:
    """The client's closing ``summary:`` line (driver/client.py) as numbers."""
    found = re.findall(r"summary: (.*)", log.read_text())
    assert found, f"no summary line in {log}"
    return {k: float(v) for k, v in (kv.split("=") for kv in found[-1].split())}


def _bead_forces(folder: Path, beads: int) -> np.ndarray:
    """(beads, frames, N, 3) forces from the per-bead ``sim.frc_<k>.xyz`` files."""
    import ase.io

    return np.array([[a.positions for a in ase.io.read(folder / f"sim.frc_{k}.xyz", index=":", format="xyz")]
                     for k in range(beads)])


# ------------------------------------------------------------------------------------------------ templates
@pytest.mark.parametrize("path", PIMD, ids=lambda p: p.name)
def test_pimd_template_is_valid_ipi_input(path, tmp_path):
    """Each PIMD template patched by mlmm run (beads, batch sizes) is read by i-PI's own input classes, has
    the outputs that matter and a path-integral thermostat."""
    from ipi.inputs.simulation import InputSimulation
    from ipi.utils.io.inputs.io_xml import xml_parse_string

    tree = xmlinput.load(path)
    root = tree.getroot()
    names = ["mm-fast", "mm-slow", "ml"] if "rpc" in path.stem else ["mm", "ml"]   # rpc: slow MM part contracted
    assert [s.name for s in xmlinput.sockets(root)] == names == xmlinput.force_components(root)
    text = root.find("output/properties").text
    for col in ("kinetic_cv{kiloj/mol}", "conserved{kiloj/mol}", "temperature{kelvin}", "potential{kiloj/mol}",
                *(f"pot_component_raw({i}){{kiloj/mol}}" for i in range(len(names)))):
        assert col in text
    assert {t.what for t in xmlinput.position_trajectories(root)} == {"positions", "x_centroid"}
    assert root.find("system/motion/dynamics/thermostat").get("mode") in ("pile_l", "pile_g")
    assert xmlinput.nbeads(root) == 8
    xmlinput.set_beads(root, 4)
    clients = {n: (2 if n == "ml" else 1) for n in names}
    sizes = xmlinput.fit_batches(root, clients)
    seen = xmlinput.beads_per_forcefield(root)
    assert all(sizes[n] == -(-seen[n] // c) for n, c in clients.items())
    if "rpc" in path.stem:
        assert seen == {"mm-fast": 4, "mm-slow": 2, "ml": 4}
    xmlinput.patch(root, init_file="init.extxyz", sockets_prefix=f"{tmp_path}/", steps=5, seed=3)
    sim = InputSimulation()
    sim.parse(xml_parse_string(ET.tostring(root, encoding="unicode")).fields[0][1])
    assert sim.total_steps.fetch() == 5


def test_device_list_is_spread_over_ml_clients():
    argv = rundir.client_argv_factory(EXAMPLE, EXAMPLE, "cuda:0,cuda:1", None, False)
    devices = [argv("ml", "localhost:1")[-1] for _ in range(3)]
    assert devices == ["cuda:0", "cuda:1", "cuda:0"]
    assert "--device" not in argv("mm", "localhost:2")


def test_padding_is_detected():
    """i-PI pads a short batch with copies of its last structure: only distinct leading ones are computed."""
    rng = np.random.default_rng(0)
    pos = rng.normal(size=(5, 4, 3))
    pos[3:] = pos[2]
    assert distinct_prefix(pos, None) == 3
    boxes = np.repeat(np.eye(3)[None], 5, axis=0)
    assert distinct_prefix(pos, boxes) == 3
    boxes[4] *= 2.0                                  # same positions, other cell: a different structure
    assert distinct_prefix(pos, boxes) == 5
    assert distinct_prefix(pos[:1], None) == 1


# ------------------------------------------------------------------------------------------------ physics
def test_quantum_kinetic_energy_4_beads_vs_1(model, tmp_path):
    """4 beads: the centroid-virial kinetic energy exceeds the classical 3/2 N kT by far (zero-point motion of
    the O-H/C-H stretches) once the ring polymers have spread; 1 bead: it is the classical value and the
    spring energy is zero."""
    from scipy.constants import R

    natoms = sum(1 for _ in open(REPO / "inputs/examples/methanol/prepared/system.pdb")
                 if _.startswith(("ATOM", "HETATM")))
    classical = 1.5 * natoms * R * 1e-3 * T_K        # kJ/mol
    xml = _variant(TEMPLATES / "pimd_pile_l.xml", tmp_path / "pile_l.xml", stride=5)
    res = _run(xml, model, tmp_path / "p4", steps=20, beads=4)       # rows at steps 0, 5, ..., 20
    assert res.steps_done == 20
    p4 = _csv(res.folder)
    kcv = p4["kinetic_cv_kjmol"]
    assert kcv[0] == pytest.approx(classical, rel=1e-5)      # all beads start at one structure
    assert np.all(kcv[2:] > 1.3 * classical), (kcv / classical).round(3)
    assert np.all(p4["spring_kjmol"][1:] > 0)
    assert np.all(np.isfinite(p4["conserved_kjmol"]))
    for k in range(4):          # the ML client's JSON extras ("ml.dipole", e·Å), one file per bead
        rows = [ln.split() for ln in (res.folder / f"sim.ml_dipole_{k}").read_text().splitlines()
                if ln.strip() and not ln.lstrip().startswith("#")]
        assert len(rows) == 1 and len(rows[0]) == 3 and np.all(np.isfinite(np.array(rows[0], dtype=float)))

    res1 = _run(xml, model, tmp_path / "p1", steps=10, beads=1)
    p1 = _csv(res1.folder)
    np.testing.assert_allclose(p1["kinetic_cv_kjmol"], classical, rtol=1e-5)
    np.testing.assert_allclose(p1["spring_kjmol"], 0.0, atol=1e-9)


def test_batched_and_unbatched_beads_give_the_same_forces(model, tmp_path):
    """Same seed, 4 beads, 3 steps: one request of 4 beads per forcefield vs 4 requests of one bead. The bead
    forces i-PI integrated agree to round-off at every step (so the trajectories coincide), and the batched
    clients received fewer requests."""
    steps, beads = 3, 4
    runs = {}
    for batch in (1, 4):
        xml = _variant(TEMPLATES / "pimd_pile_l.xml", tmp_path / f"b{batch}.xml", batch=batch, forces_out=True)
        runs[batch] = _run(xml, model, tmp_path / f"run_b{batch}", steps=steps, beads=beads).folder
    f1, f4 = _bead_forces(runs[1], beads), _bead_forces(runs[4], beads)
    assert f1.shape == f4.shape == (beads, steps + 1, f1.shape[2], 3)
    scale = np.abs(f1).max()
    # i-PI's xyz files hold 6 significant digits: agreement to the last printed digit
    np.testing.assert_allclose(f4, f1, rtol=2e-5, atol=1e-6 * scale)
    assert np.abs(f1[:, -1] - f1[:, -1].mean(axis=0)).max() > 1e-3 * scale    # the beads differ by then
    for name in ("ml", "mm"):
        s1, s4 = _summary(runs[1] / f"client_{name}.log"), _summary(runs[4] / f"client_{name}.log")
        assert s1["requests"] == s1["structures"] == beads * (steps + 1)
        assert s4["batch_size"] == beads and s4["requests"] < s1["requests"]


def test_batched_engine_matches_one_by_one(model):
    """The ML engine's one network call for B structures equals B single calls (4 displaced structures)."""
    from coupling.ml_engine import MLEngine

    spec = SystemSpec.load(EXAMPLE)
    engine = MLEngine.from_spec(spec, model)
    engine.model.double()          # float64 weights: batching must not change anything beyond rounding
    start = launch.initial_structure(spec)
    pos0 = start.positions / 10.0
    box = np.asarray(start.cell) / 10.0
    rng = np.random.default_rng(3)
    pos = pos0[None] + rng.normal(scale=0.005, size=(4, *pos0.shape))
    boxes = np.repeat(box[None], 4, axis=0)
    batched = engine.compute(pos, boxes)
    for b in range(4):
        [single] = engine.compute(pos[b:b + 1], boxes[b:b + 1])
        assert batched[b].energy == pytest.approx(single.energy, rel=1e-9, abs=1e-7)
        np.testing.assert_allclose(batched[b].forces, single.forces, rtol=0, atol=1e-7 * np.abs(single.forces).max())
    assert abs(batched[0].energy - batched[1].energy) > 1e-6       # really different structures


@pytest.mark.parametrize("template, counts", [("pimd_rpc_mm.xml", {"ml": 4, "mm-fast": 4, "mm-slow": 2})])
def test_contracted_force_on_stated_beads(template, counts, model, tmp_path):
    """RPC with 4 beads and the slow MM part on nbeads='2': the clients computed exactly 2 and 4 structures per force
    evaluation (steps + 1 evaluations: the initial one and one per step). Unbatched, so each request is one
    structure and nothing is padding."""
    steps = 4
    xml = _variant(TEMPLATES / template, tmp_path / template, batch=1)
    res = _run(xml, model, tmp_path / "run", steps=steps, beads=4)
    for name, n in counts.items():
        s = _summary(res.folder / f"client_{name}.log")
        assert s["requests"] == s["structures"] == s["computed"] == n * (steps + 1), (name, s)
    assert np.all(np.isfinite(_csv(res.folder)["kinetic_cv_kjmol"]))


def test_two_ml_clients_share_the_beads(model, tmp_path):
    """`--ml-clients 2`: two ML clients on the 'ml' socket; together they computed every bead of every step
    exactly once, and each computed some. (i-PI starts with the first client that connects: enough steps that
    the second one, started at the same time, gets work.)"""
    steps, beads = 15, 4
    xml = _variant(TEMPLATES / "pimd_pile_l.xml", tmp_path / "two.xml", batch=1)
    res = _run(xml, model, tmp_path / "run", steps=steps, beads=beads, ml_clients=2)
    a, b = _summary(res.folder / "client_ml.log"), _summary(res.folder / "client_ml-2.log")
    assert a["structures"] > 0 and b["structures"] > 0
    assert a["structures"] + b["structures"] == beads * (steps + 1)
    assert _summary(res.folder / "client_mm.log")["structures"] == beads * (steps + 1)


def test_batch_size_shared_among_ml_clients(model, tmp_path):
    """Batched template, 4 beads, 2 ML clients: mlmm run asks i-PI for batches of 2 on 'ml', 4 on 'mm'."""
    res = _run(TEMPLATES / "pimd_pile_l.xml", model, tmp_path / "run", steps=6, beads=4, ml_clients=2)
    root = ET.parse(res.folder / "input.xml").getroot()
    sizes = {el.get("name"): int(el.findtext("batch_size")) for el in root.iter("ffsocket")}
    assert sizes == {"mm": 4, "ml": 2}
    served = [_summary(res.folder / log) for log in ("client_ml.log", "client_ml-2.log")]
    assert all(s["batch_size"] == 2 for s in served if s["requests"] > 0)
    assert sum(s["structures"] for s in served) == 2 * sum(s["requests"] for s in served) >= 4 * 7


def test_remote_ml_client_over_tcp(model, tmp_path):
    """The ML client started by hand, as on a GPU node (only system.toml + model, `--address HOST:PORT`), serves
    an inet 'ml' socket of a batched PIMD run that `mlmm run --ml-clients 0 --remote-ml-clients 1` drives."""
    import socket
    import subprocess
    import sys

    with socket.socket() as s:                     # a free port (tiny race, harmless in a test)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tree = xmlinput.load(TEMPLATES / "pimd_pile_l.xml")
    el = next(e for e in tree.getroot().iter("ffsocket") if e.get("name") == "ml")
    el.set("mode", "inet")
    el.find("address").text = "127.0.0.1"
    ET.SubElement(el, "port").text = str(port)
    xmlinput.write(tree, tmp_path / "inet.xml")
    with pytest.raises(SetupError, match="mode='inet'"):
        _run(TEMPLATES / "pimd_pile_l.xml", model, tmp_path / "bad", steps=2, beads=2, ml_clients=0,
             remote_ml_clients=1)
    log = open(tmp_path / "remote_ml.log", "w")
    client = subprocess.Popen([sys.executable, "-m", "driver.cli", "client", "ml", "--system", str(EXAMPLE),
                               "--model", str(model), "--address", f"127.0.0.1:{port}", "--timeout", "120"],
                              cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
        res = _run(tmp_path / "inet.xml", model, tmp_path / "run", steps=3, beads=2, ml_clients=0,
                   remote_ml_clients=1)
        assert client.wait(30) == 0
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
        log.close()
    assert not (res.folder / "client_ml.log").exists()
    s = _summary(tmp_path / "remote_ml.log")
    assert s["batch_size"] == 2 and s["requests"] >= 4
    assert np.all(np.isfinite(_csv(res.folder)["pot_ml_kjmol"]))

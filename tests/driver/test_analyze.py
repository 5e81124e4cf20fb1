"""`mlmm analyze` (driver/analyze.py) on real short runs: `mlmm run` of methanol (ML zone, random-weight tiny
network) in a 1.6 nm TIP3P box, classical NVT with the ML client's extras written, and a 2-bead PIMD run.

Every figure must be a valid, non-empty PNG; the summary's drift and mean temperature must equal what this
test computes from i-PI's raw properties file; the RDF must tend to 1 far from the solute; what a run lacks is
skipped with a line, not an error.
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from driver import launch
from driver.analyze import read_extras
from driver.cli import main as cli

ROOT = Path(__file__).resolve().parents[2]
TEMPLATES = ROOT / "inputs" / "templates"
STEPS = 40

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def prepared(methanol_box_factory) -> tuple[Path, Path]:
    """(system.toml, model): methanol in about 117 waters, PME; tiny network with random weights."""
    return methanol_box_factory("analyze", seed=11)


def _n_atoms(system_toml) -> int:
    """Atoms of the prepared system (the solvent count follows the solute's LJ radii in Modeller)."""
    from potentials.core.spec import SystemSpec
    from potentials.openmm_system import read_structure

    return read_structure(SystemSpec.load(system_toml).structure_path)[0].getNumAtoms()


@pytest.fixture(scope="module")
def nvt_run(prepared, tmp_path_factory) -> Path:
    """40 steps of ML/MM NVT; properties every 2 steps, positions every 5, extras (charges, dipole) every 4."""
    text = (TEMPLATES / "nvt_bussi.xml").read_text()
    text = text.replace("<properties stride='10'", "<properties stride='2'")
    text = text.replace("safe_stride='10'", "safe_stride='2'")
    text = text.replace("<trajectory filename='pos' stride='100'", "<trajectory filename='pos' stride='5'")
    assert "<trajectory filename='ml_extras' stride='10' extra_type='ml.charges,ml.dipole'>" in text
    text = text.replace("<trajectory filename='ml_extras' stride='10'", "<trajectory filename='xtr' stride='4'")
    folder = tmp_path_factory.mktemp("nvt")
    xml = folder / "nvt.xml"
    xml.write_text(text)
    system, model = prepared
    launch.run_simulation(xml, system, out=folder / "run", model=model, steps=STEPS, seed=3, progress=False)
    return folder / "run"


def _summary(path: Path) -> dict[str, float]:
    out = {}
    for line in path.read_text().splitlines():
        m = re.match(r"([^:]+): ([-+0-9.eE]+)(?: |$)", line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


def _raw_properties(path: Path) -> dict[str, np.ndarray]:
    """i-PI's properties file parsed here, independently of driver.trajectory: {label: column}."""
    cols = {}
    for line in path.read_text().splitlines():
        m = re.match(r"#\s*column\s+(\d+)\s+-->\s+(\S+?)(\{[^}]*\})?\s", line)
        if m:
            cols[m.group(2)] = int(m.group(1)) - 1
    data = np.loadtxt(path, comments="#", ndmin=2)
    return {k: data[:, i] for k, i in cols.items()}


def _assert_png(path: Path) -> None:
    import matplotlib.image

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 400, (path, img.shape)
    assert img[..., :3].std() > 0.02, f"{path} is blank"


def test_analyze_classical_run(nvt_run, prepared, capsys):
    system, _ = prepared
    assert cli(["analyze", str(nvt_run), "--system", str(system)]) == 0
    out = nvt_run / "analysis"
    for name in ("energy", "temperature", "ml_charges", "rdf"):
        _assert_png(out / f"{name}.png")
    assert not (out / "quantum_kinetic.png").exists()
    text = (out / "summary.txt").read_text()
    assert text == capsys.readouterr().out
    assert re.search(r"^skipped quantum_kinetic\.png: .*kinetic_cv", text, re.M)

    s = _summary(out / "summary.txt")
    raw = _raw_properties(nvt_run / "sim.out")
    t, conserved = raw["time"], raw["conserved"]
    assert len(t) == STEPS // 2 + 1
    slope = np.polyfit(t, conserved, 1)[0]                 # kJ/mol/ps: the template prints kiloj/mol and ps
    assert s["conserved-energy drift"] == pytest.approx(slope, rel=1e-5)
    n_atoms = _n_atoms(system)
    assert s["conserved-energy drift per atom"] == pytest.approx(slope / n_atoms, rel=1e-5)
    assert s["mean temperature"] == pytest.approx(raw["temperature"].mean(), rel=1e-5)
    assert s["target temperature"] == 300.0
    assert s["mean ML potential"] == pytest.approx(raw["pot_component_raw(1)"].mean(), rel=1e-5)
    assert s["mean MM potential"] == pytest.approx(raw["pot_component_raw(0)"].mean(), rel=1e-5)
    assert s["steps"] == STEPS and s["atoms"] == n_atoms and s["beads"] == 1
    assert s["speed"] > 0

    # the extras the ML-charge figure shows: 6 charges summing to the zone's charge (0 e) and a dipole
    steps, rows = read_extras(nvt_run / "sim.xtr_0")
    np.testing.assert_array_equal(steps, np.arange(0, STEPS + 1, 4))
    assert rows.shape == (len(steps), 6 + 3)
    np.testing.assert_allclose(rows[:, :6].sum(axis=1), 0.0, atol=1e-5)
    assert s["mean ML dipole |mu|"] == pytest.approx(np.linalg.norm(rows[:, 6:], axis=1).mean(), rel=1e-5)

    # RDF: 9 frames, no water O inside the methanol, g -> 1 at long range (periodic box normalisation)
    assert s["RDF frames"] == STEPS // 5 + 1
    assert 0.25 < s["RDF highest peak (water O around the ML zone)"] < 0.8


def test_rdf_normalisation(nvt_run, prepared):
    """g(r) from the analysis histogram: zero inside 0.2 nm, ~1 on average over 0.5-0.8 nm."""
    import mdtraj

    from driver.analyze import _rdf_histogram
    from potentials.core.spec import SystemSpec
    from potentials.openmm_system import read_structure

    spec = SystemSpec.load(prepared[0])
    top, _ = read_structure(spec.structure_path)
    water_o = [a.index for a in top.atoms() if a.residue.name == "HOH" and a.element.symbol == "O"]
    edges, hist, frames, rho = _rdf_histogram([nvt_run / "sim.pos_0.nc"], top, [0, 1], water_o, 0.0, True)
    assert frames == STEPS // 5 + 1 and edges[-1] == pytest.approx(0.8, abs=0.011)
    assert rho == pytest.approx(len(water_o) / 1.6 ** 3, rel=1e-3)
    r = 0.5 * (edges[1:] + edges[:-1])
    g = hist / (frames * 2 * rho * 4 / 3 * np.pi * (edges[1:] ** 3 - edges[:-1] ** 3))
    assert g[r < 0.2].sum() == 0
    assert 0.7 < g[(r > 0.5) & (r < 0.8)].mean() < 1.3
    # total count up to r_max: the same pairs counted directly from the NetCDF with MDTraj
    traj = mdtraj.load(str(nvt_run / "sim.pos_0.nc"), top=mdtraj.Topology.from_openmm(top))
    d = mdtraj.compute_distances(traj, np.array([(i, j) for i in (0, 1) for j in water_o]), periodic=True)
    assert hist.sum() == np.sum(d < edges[-1])


def test_analyze_without_system_and_extras(nvt_run, tmp_path):
    """No --system: the system comes from run.json; without run.json the RDF is skipped with the fix in the
    summary; a bad folder is one clear error line."""
    assert cli(["analyze", str(nvt_run), "--out", str(tmp_path / "r"), "--skip", "0.005"]) == 0
    _assert_png(tmp_path / "r" / "rdf.png")                   # system found through run.json
    bare = tmp_path / "bare"
    shutil.copytree(nvt_run, bare)
    (bare / "run.json").unlink()
    assert cli(["analyze", str(bare), "--out", str(tmp_path / "a"), "--skip", "0.005"]) == 0
    text = (tmp_path / "a" / "summary.txt").read_text()
    assert re.search(r"^skipped rdf\.png: .*--system", text, re.M)
    assert "averages from: 0.005 ps" in text
    _assert_png(tmp_path / "a" / "energy.png")
    assert cli(["analyze", str(tmp_path / "nothing")]) == 2
    assert cli(["analyze", str(nvt_run), "--skip", "10"]) == 2


def test_analyze_pimd_run(prepared, tmp_path):
    """2-bead PIMD (pimd_pile_l.xml): the quantum kinetic energy figure and its mean; dipole from bead extras."""
    system, model = prepared
    text = (TEMPLATES / "pimd_pile_l.xml").read_text()
    text = text.replace("<properties stride='10'", "<properties stride='2'").replace("safe_stride='10'",
                                                                                       "safe_stride='2'")
    text = text.replace("filename='xc' stride='100'", "filename='xc' stride='5'")
    text = text.replace("filename='ml_dipole' stride='100'", "filename='ml_dipole' stride='2'")
    xml = tmp_path / "pimd.xml"
    xml.write_text(text)
    run = tmp_path / "run"
    launch.run_simulation(xml, system, out=run, model=model, steps=10, seed=5, progress=False, beads=2)
    assert cli(["analyze", str(run), "--system", str(system)]) == 0
    for name in ("energy", "temperature", "quantum_kinetic", "ml_charges", "rdf"):
        _assert_png(run / "analysis" / f"{name}.png")
    s = _summary(run / "analysis" / "summary.txt")
    raw = _raw_properties(run / "sim.out")
    assert s["beads"] == 2
    assert s["mean centroid-virial kinetic energy"] == pytest.approx(raw["kinetic_cv"].mean(), rel=1e-5)
    assert s["classical kinetic energy 3/2 N k_B T"] == pytest.approx(1.5 * _n_atoms(prepared[0]) * 8.314462618e-3 * 300, rel=1e-5)
    dips = [read_extras(run / f"sim.ml_dipole_{k}")[1] for k in range(2)]
    assert s["mean ML dipole |mu|"] == pytest.approx(np.linalg.norm(np.mean(dips, axis=0), axis=1).mean(), rel=1e-5)

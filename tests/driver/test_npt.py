"""NPT end to end: the MM client's strain virial reaches i-PI unchanged (real i-PI socket server, real client),
`mlmm run` of the NPT template runs a flexible TIP3P box with i-PI's barostat, and the pressure i-PI prints at
step 0 is (2K + tr W)/3V with tr W from independent finite differences of OpenMM's energy under strain."""
from __future__ import annotations

import csv
import os
import subprocess
import sys
import threading
import time
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import openmm
import pytest
from ipi.engine.atoms import Atoms
from ipi.engine.cell import Cell
from ipi.engine.forcefields import FFSocket
from ipi.interfaces.sockets import InterfaceSocket
from openmm import app, unit

from driver import codec
from driver.client import serve
from driver.xmlinput import needs_virial, virial_kind
from potentials.core import units
from potentials.core.spec import MMSpec, StructureSpec, SystemSpec
from potentials.openmm_engine import OpenMMEngine

REPO = Path(__file__).resolve().parents[2]
TEMPLATES = REPO / "inputs" / "templates"
BOX_NM = 1.8
CUTOFF_NM = 0.7
BAR_PER_KJMOL_NM3 = 1e3 / 6.02214076e23 / 1e-27 / 1e5          # 16.6054 bar per kJ/mol/nm^3

pytestmark = pytest.mark.timeout(300)


def _tip3p_system(topology) -> openmm.System:
    ff = app.ForceField("amber14/tip3p.xml")
    return ff.createSystem(topology, nonbondedMethod=app.PME, nonbondedCutoff=CUTOFF_NM * unit.nanometer,
                           constraints=None, rigidWater=False, ewaldErrorTolerance=5e-4)


@pytest.fixture(scope="module")
def water_box(tmp_path_factory) -> Path:
    """~555 atoms of flexible TIP3P in a 1.8 nm cube, PME, relaxed; written as system.pdb + system.toml."""
    ff = app.ForceField("amber14/tip3p.xml")
    m = app.Modeller(app.Topology(), [])
    m.addSolvent(ff, boxSize=openmm.Vec3(BOX_NM, BOX_NM, BOX_NM) * unit.nanometer)
    ctx = openmm.Context(_tip3p_system(m.topology), openmm.VerletIntegrator(1e-3),
                         openmm.Platform.getPlatformByName("CPU"))
    ctx.setPositions(m.positions)
    openmm.LocalEnergyMinimizer.minimize(ctx, 10.0, 200)
    m.positions = ctx.getState(getPositions=True).getPositions()
    folder = tmp_path_factory.mktemp("npt_box")
    with open(folder / "water.pdb", "w") as fh:
        app.PDBFile.writeFile(m.topology, m.positions, fh)
    box = [list(v) for v in m.topology.getPeriodicBoxVectors().value_in_unit(unit.nanometer)]
    spec = SystemSpec(StructureSpec(file="water.pdb", forcefield=["amber14/tip3p.xml"], periodic=True, box_nm=box),
                      mm=MMSpec(nonbonded_method="PME", cutoff_nm=CUTOFF_NM, rigid_water=False))
    spec.save(folder / "system.toml")
    return folder / "system.toml"


def _structure(toml: Path):
    pdb = app.PDBFile(str(toml.parent / "water.pdb"))
    box = np.array(pdb.topology.getPeriodicBoxVectors().value_in_unit(unit.nanometer))
    return pdb.topology, pdb.getPositions(asNumpy=True).value_in_unit(unit.nanometer), box


def _trace_virial_fd(system, pos, box, span=1e-2, n=41) -> float:
    """-dE/d(eps) under isotropic strain of positions and cell: a degree-6 fit of OpenMM's total energy
    (fresh Reference context) at n strains, independent of the engine's own finite differences."""
    ctx = openmm.Context(system, openmm.VerletIntegrator(1e-3), openmm.Platform.getPlatformByName("Reference"))
    ts = np.linspace(-span, span, n)
    es = []
    for t in ts:
        ctx.setPeriodicBoxVectors(*(box * (1 + t)))
        ctx.setPositions(pos * (1 + t))
        es.append(ctx.getState(getEnergy=True).getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole))
    return -np.polyfit(ts, es, 6)[-2]


def test_templates_need_the_virial():
    for name in ("npt_bussi.xml", "npt_bussi_mm.xml"):
        root = ET.parse(TEMPLATES / name).getroot()
        assert "npt" in needs_virial(root) and "pressure_md" in needs_virial(root)
        assert virial_kind(root) == "isotropic"
    for name in ("nvt_bussi.xml", "nvt_bussi_mm.xml", "nve.xml", "pimd_pile_l.xml"):
        assert needs_virial(ET.parse(TEMPLATES / name).getroot()) is None


def _input(motion: str = "<dynamics mode='nvt'/>", props: str = "step, potential") -> ET.Element:
    return ET.fromstring(f"<simulation><output><properties>[ {props} ]</properties></output>"
                         f"<system><motion mode='dynamics'>{motion}</motion></system></simulation>")


@pytest.mark.parametrize("motion, props, kind, words", [
    ("<dynamics mode='nvt'/>", "step, potential{kiloj/mol}, pot_component_raw(0)", None, None),
    ("<dynamics mode='nvt'><barostat mode='isotropic'/></dynamics>", "step", None, None),     # never stepped
    ("<dynamics mode='npt'><barostat mode='isotropic'/></dynamics>", "step", "isotropic",
     "<dynamics mode='npt'> (barostat mode='isotropic')"),
    ("<dynamics mode='npt'><barostat mode='flexible'/></dynamics>", "step", "full", "barostat mode='flexible'"),
    ("<dynamics mode='nst'/>", "step", "full", "<dynamics mode='nst'>"),
    ("<dynamics mode=' scnpt '/>", "step", "isotropic", "scnpt"),
    ("<dynamics mode='nve'/>", "time{picosecond}, pressure_md{bar}", "isotropic", "the property pressure_md"),
    ("<dynamics/>", "stress_md{bar}", "full", "stress_md"),
    ("<dynamics mode='nvt'/>", "vir_component(1){bar}, kinetic_md", "full", "vir_component"),
    ("<dynamics mode='nvt'/>", "ensemble_pressure{bar}, kstress_md, kinetic_cv", None, None),
])
def test_needs_virial(motion, props, kind, words):
    root = _input(motion, props)
    assert virial_kind(root) == kind
    what = needs_virial(root)
    assert (what is None) if kind is None else (words in what)


def test_needs_virial_lists_every_use():
    root = _input("<dynamics mode='npt'><barostat mode='isotropic'/></dynamics>", "pressure_md{bar}, stress_md")
    assert needs_virial(root) == ("<dynamics mode='npt'> (barostat mode='isotropic'), the property pressure_md, "
                                  "the property stress_md")
    assert virial_kind(root) == "full"


def test_virial_reaches_ipi(water_box):
    """i-PI's own FFSocket receives the engine's virial, in hartree, full tensor (i-PI keeps its upper triangle)."""
    topology, pos, box = _structure(water_box)
    system = _tip3p_system(topology)
    engine = OpenMMEngine(system, platform="Reference")
    name = f"mlmmnpt_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    iface = InterfaceSocket(address=name, mode="unix")
    ff = FFSocket(latency=1e-4, name="mm", interface=iface, dopbc=False)
    ff.start()
    result = {}
    client = threading.Thread(target=lambda: result.update(n=serve(engine, f"unix:{name}", timeout=10.0)),
                              daemon=True)
    try:
        client.start()
        atoms = Atoms(len(pos))
        atoms.q[:] = (pos * units.BOHR_PER_NM).ravel()
        req = ff.queue(atoms, Cell(codec.box_to_cell(box)), reqid=0)
        deadline = time.monotonic() + 60.0
        while req["status"] != "Done":
            assert time.monotonic() < deadline, "i-PI got no answer in time"
            time.sleep(1e-3)
    finally:
        ff.stop()
    client.join(10)
    vir_ha = np.asarray(req["result"][2]).reshape(3, 3)
    sent = (pos * units.BOHR_PER_NM) * units.NM_PER_BOHR          # what the client decoded
    expected = OpenMMEngine(system, platform="Reference").compute(sent, box)[0].virial
    np.testing.assert_allclose(vir_ha / units.HARTREE_PER_KJMOL, expected, rtol=1e-7,
                               atol=1e-7 * np.abs(expected).max())
    assert np.trace(expected) < -1000.0                             # a relaxed liquid: attractive virial


@pytest.mark.slow
def test_npt_run_mm(water_box, tmp_path):
    """`mlmm run` of the MM-only NPT template: it runs, the cell moves, pressure/volume/density are printed and
    finite, and i-PI's step-0 pressure is (2K + tr W)/3V with an independent tr W."""
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "driver.cli", "run", str(TEMPLATES / "npt_bussi_mm.xml"),
                           "--system", str(water_box), "--steps", "200", "--out", str(out), "--seed", "3",
                           "--no-progress"], cwd=REPO, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.reader((out / "properties.csv").open()))
    props = {k: np.array([float(r[i]) for r in rows[1:]]) for i, k in enumerate(rows[0])}
    np.testing.assert_array_equal(props["step"], np.arange(0, 201, 10))
    for key in ("pressure_md_bar", "volume_angstrom3", "density_gcm3", "conserved_kjmol"):
        assert np.all(np.isfinite(props[key])), key
    vol = props["volume_angstrom3"]
    assert vol[0] == pytest.approx(BOX_NM ** 3 * 1000.0, rel=1e-6)
    assert np.ptp(vol) > 1e-3 * vol[0]                              # the barostat moves the cell
    assert np.all((props["density_gcm3"] > 0.8) & (props["density_gcm3"] < 1.2))

    # step 0 is the prepared structure: i-PI's pressure is (2K + tr W)/3V with the virial the client sent (an
    # engine on the same structure; the CPU and Reference platforms agree to ~1e-4 of tr W), and that tr W is
    # -dE/d(eps) of an independent fit (loosely here: a 555-atom box with a 0.7 nm cutoff has ~1.5 % noise from
    # pairs crossing the cutoff; the 2 % check on the larger example is in tests/potentials/test_virial.py)
    topology, pos, box = _structure(water_box)
    system = _tip3p_system(topology)
    # `mlmm run` asks the MM client for what the input reads: the trace, for this isotropic barostat
    trw = np.trace(OpenMMEngine(system, platform="Reference", virial="isotropic").compute(pos, box)[0].virial)
    v_nm3 = BOX_NM ** 3
    p0 = (2.0 * props["kinetic_md_kjmol"][0] + trw) / (3.0 * v_nm3) * BAR_PER_KJMOL_NM3
    assert props["pressure_md_bar"][0] == pytest.approx(p0, abs=1e-3 * abs(trw) / v_nm3 * BAR_PER_KJMOL_NM3)
    assert trw == pytest.approx(_trace_virial_fd(system, pos, box), rel=0.06)


@pytest.mark.slow
def test_npt_run_mlmm(methanol_box_factory, tmp_path):
    """`mlmm run` of the ML/MM NPT template (methanol in 117 TIP3P waters, tiny random network): both clients'
    virials reach the barostat, the run ends cleanly with finite pressure, volume and density."""
    system_toml, model = methanol_box_factory("npt_mlmm", seed=5)
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "driver.cli", "run", str(TEMPLATES / "npt_bussi.xml"),
                           "--system", str(system_toml), "--model", str(model), "--steps", "40", "--out", str(out),
                           "--seed", "3", "--no-progress"], cwd=REPO, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.reader((out / "properties.csv").open()))
    props = {k: np.array([float(r[i]) for r in rows[1:]]) for i, k in enumerate(rows[0])}
    np.testing.assert_array_equal(props["step"], np.arange(0, 41, 10))
    for key in ("pressure_md_bar", "volume_angstrom3", "density_gcm3", "pot_ml_kjmol", "pot_mm_kjmol"):
        assert np.all(np.isfinite(props[key])), key
    assert np.ptp(props["volume_angstrom3"]) > 0.0

"""Issue 16.3: ring-polymer contraction of the slow MM part only (client kinds mm-fast / mm-slow,
inputs/templates/pimd_rpc_mm.xml) keeps the quantum kinetic energy of flexible water; contracting the whole
MM force (the old pimd_rpc_mm.xml: O–H stretches on 2 beads) does not.

Pure-MM PIMD of a flexible TIP3P box through `mlmm run` (real i-PI, real OpenMM clients), 8 beads, PILE-L
300 K, 0.25 fs, the same seed in every run (paired: the runs differ only by their forces):
  full   'mm' on all 8 beads
  split  'mm-fast' on 8 + 'mm-slow' (PME reciprocal space) on 2
  whole  'mm' on 2 (every MM term contracted)
The long comparison (statistics, step times) is tests/bench/bench_rpc_split.py; it reuses these helpers.
"""
from __future__ import annotations

import csv
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import openmm
import pytest
from openmm import app, unit

from driver import launch, xmlinput
from potentials.core.spec import MMSpec, StructureSpec, SystemSpec

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = ROOT / "inputs" / "templates" / "pimd_rpc_mm.xml"
MODES = ("full", "split", "whole")

pytestmark = pytest.mark.timeout(300)


def water_box(folder: Path, box_nm: float = 1.5, cutoff_nm: float = 0.7) -> Path:
    """Flexible TIP3P in a cube (PME), minimised; returns its system.toml (no ML zone)."""
    ff = app.ForceField("amber14/tip3p.xml")
    m = app.Modeller(app.Topology(), [])
    m.addSolvent(ff, boxSize=openmm.Vec3(box_nm, box_nm, box_nm) * unit.nanometer)
    system = ff.createSystem(m.topology, nonbondedMethod=app.PME, nonbondedCutoff=cutoff_nm * unit.nanometer,
                             constraints=None, rigidWater=False)
    ctx = openmm.Context(system, openmm.VerletIntegrator(1e-3), openmm.Platform.getPlatformByName("CPU"))
    ctx.setPositions(m.positions)
    openmm.LocalEnergyMinimizer.minimize(ctx, 10.0, 200)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "water.pdb", "w") as fh:
        app.PDBFile.writeFile(m.topology, ctx.getState(getPositions=True).getPositions(), fh)
    box = [list(v) for v in m.topology.getPeriodicBoxVectors().value_in_unit(unit.nanometer)]
    spec = SystemSpec(StructureSpec(file="water.pdb", forcefield=["amber14/tip3p.xml"], periodic=True, box_nm=box),
                      mm=MMSpec(nonbonded_method="PME", cutoff_nm=cutoff_nm, rigid_water=False))
    spec.save(folder / "system.toml")
    return folder / "system.toml"


def variant(dst: Path, mode: str, stride: int = 10) -> Path:
    """pimd_rpc_mm.xml without the ML client, its MM force as ``mode`` says (module docstring)."""
    tree = xmlinput.load(TEMPLATE)
    root = tree.getroot()
    out = root.find("output")
    for t in out.findall("trajectory"):
        out.remove(t)
    props = out.find("properties")
    props.set("stride", str(stride))
    root.set("safe_stride", str(stride))
    props.text = " [ step, time{picosecond}, conserved{kiloj/mol}, temperature{kelvin}, kinetic_cv{kiloj/mol}, " \
                 "potential{kiloj/mol} ] "
    forces = root.find("system/forces")
    for el in list(root.findall("ffsocket")) + list(forces):
        root.remove(el) if el.tag == "ffsocket" else forces.remove(el)
    names = {"full": [("mm", 0)], "split": [("mm-fast", 0), ("mm-slow", 2)], "whole": [("mm", 2)]}[mode]
    for i, (name, nbeads) in enumerate(names):
        sock = ET.Element("ffsocket", name=name, mode="unix", pbc="false")
        for tag, text in (("address", name), ("latency", "1e-4"), ("batch_size", "8")):
            ET.SubElement(sock, tag).text = f" {text} "
        root.insert(3 + i, sock)
        force = ET.SubElement(forces, "force", forcefield=name, name=name)
        if nbeads:
            force.set("nbeads", str(nbeads))
    xmlinput.write(tree, dst)
    return dst


def run_mode(system: Path, mode: str, work: Path, steps: int, seed: int = 11, stride: int = 10) -> launch.RunResult:
    work.mkdir(parents=True, exist_ok=True)
    xml = variant(work / f"{mode}.xml", mode, stride)
    return launch.run_simulation(xml, system, out=work / mode, steps=steps, seed=seed, progress=False)


def kinetic_cv(run: Path, skip: int = 0) -> np.ndarray:
    """kinetic_cv (kJ/mol) per printed step from the run's properties.csv, the first ``skip`` rows left out."""
    with open(run / "properties.csv") as fh:
        rows = list(csv.DictReader(fh))
    return np.array([float(r["kinetic_cv_kjmol"]) for r in rows])[skip:]


@pytest.mark.slow
def test_slow_part_contraction_keeps_kinetic_cv(tmp_path):
    system = water_box(tmp_path / "box")
    k = {mode: kinetic_cv(run_mode(system, mode, tmp_path, steps=160).folder, skip=2) for mode in MODES}
    rel = {mode: k[mode].mean() / k["full"].mean() - 1 for mode in MODES}
    print({mode: f"{k[mode].mean():.1f} kJ/mol ({100 * rel[mode]:+.2f} %)" for mode in MODES})
    assert abs(rel["split"]) < 0.02
    assert abs(rel["whole"]) > 2 * abs(rel["split"])

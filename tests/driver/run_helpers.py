"""Helpers shared by the driver tests that start real i-PI runs."""
from __future__ import annotations

import os
from pathlib import Path


def procs_in(folder: Path) -> dict[int, str]:
    """Processes whose working directory is ``folder`` (i-PI and the clients run there): pid -> cmdline."""
    out = {}
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            if os.readlink(p / "cwd") == str(folder):
                out[int(p.name)] = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
    return out


REPO = Path(__file__).resolve().parents[2]
EXAMPLE_DIR = REPO / "inputs" / "examples" / "methanol" / "prepared"
MINIMISED = REPO / "tests" / "data" / "methanol_minimised.npz"


def minimised_example(folder: Path) -> Path:
    """The shipped example's system as `mlmm prepare` left it, before the ML/MM equilibration whose final state
    ``inputs/examples/methanol/prepared/system.pdb`` holds: same topology, box and system.toml, the positions of
    ``tests/data/methanol_minimised.npz`` (the solvent minimised around the ML zone, no water at the hydroxyl H).
    For runs with random-weight networks: their ML-MM forces are arbitrary, and from the equilibrated,
    hydrogen-bonded structure they pull a water onto the hydroxyl H within ~15 steps. Returns the system.toml."""
    import numpy as np
    from openmm import app, unit

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "system.toml").write_text((EXAMPLE_DIR / "system.toml").read_text())
    pdb = app.PDBFile(str(EXAMPLE_DIR / "system.pdb"))
    x = np.load(MINIMISED)["positions_nm"].astype(np.float64)
    assert x.shape == (pdb.topology.getNumAtoms(), 3)
    with open(folder / "system.pdb", "w") as fh:
        app.PDBFile.writeFile(pdb.topology, x * unit.nanometer, fh, keepIds=True)
    return folder / "system.toml"


def tip3p_waters(n_waters: int, box_nm: float = 1.0):
    """``n_waters`` flexible TIP3P waters cut from a ``box_nm`` solvent box, no periodic box, NoCutoff:
    (topology, system, positions nm as an (N, 3) array)."""
    import numpy as np
    import openmm
    from openmm import app, unit

    ff = app.ForceField("amber14/tip3p.xml")
    m = app.Modeller(app.Topology(), [])
    m.addSolvent(ff, boxSize=openmm.Vec3(box_nm, box_nm, box_nm) * unit.nanometer)
    m.delete(list(m.topology.residues())[n_waters:])
    m.topology.setPeriodicBoxVectors(None)
    system = ff.createSystem(m.topology, nonbondedMethod=app.NoCutoff, constraints=None, rigidWater=False)
    return m.topology, system, np.array(m.positions.value_in_unit(unit.nanometer), dtype=np.float64)


def write_water_cluster(folder: Path, n_waters: int = 6) -> Path:
    """``n_waters`` flexible TIP3P waters, no box, minimised (a fast MM client start), as ``folder/water.pdb``."""
    import openmm
    from openmm import app, unit

    topology, system, pos = tip3p_waters(n_waters)
    ctx = openmm.Context(system, openmm.VerletIntegrator(1e-3), openmm.Platform.getPlatformByName("Reference"))
    ctx.setPositions(pos * unit.nanometer)
    openmm.LocalEnergyMinimizer.minimize(ctx, 10.0, 200)
    with open(folder / "water.pdb", "w") as fh:
        app.PDBFile.writeFile(topology, ctx.getState(getPositions=True).getPositions(), fh)
    return folder / "water.pdb"


def water_cluster_spec(folder: Path, n_waters: int = 6, **coupling):
    """A system of :func:`write_water_cluster` (no box, NoCutoff, flexible water) with water 1 as the neutral ML
    zone and ``coupling`` as its [coupling] keys (unsaved: callers adjust and save it)."""
    from potentials.core.spec import CouplingSpec, MLSpec, MMSpec, StructureSpec, SystemSpec

    write_water_cluster(folder, n_waters)
    return SystemSpec(StructureSpec(file="water.pdb", forcefield=["amber14/tip3p.xml"], periodic=False),
                      ml=MLSpec(selection="resid 1", indices=[0, 1, 2], charge=0),
                      mm=MMSpec(nonbonded_method="NoCutoff", rigid_water=False), coupling=CouplingSpec(**coupling))


def template_variant(src: Path, dst: Path, *, props: int, pos: int, safe: int, inet_ml: int | None = None) -> Path:
    """Template ``src`` with properties every ``props`` steps, positions every ``pos``, ``safe_stride`` = ``safe``
    (> props: a RESTART then lags the last written row, which resuming must cope with); with ``inet_ml`` the 'ml'
    socket listens on 127.0.0.1:inet_ml (clients from "other nodes")."""
    import xml.etree.ElementTree as ET

    from driver import xmlinput

    tree = xmlinput.load(src)
    root = tree.getroot()
    root.set("safe_stride", str(safe))
    root.find("output/properties").set("stride", str(props))
    for t in root.findall("output/trajectory"):
        t.set("stride", str(pos))
    if inet_ml is not None:
        el = next(e for e in root.iter("ffsocket") if e.get("name") == "ml")
        el.set("mode", "inet")
        el.find("address").text = "127.0.0.1"
        ET.SubElement(el, "port").text = str(inet_ml)
    xmlinput.write(tree, dst)
    return dst


def tiny_model(folder: Path) -> Path:
    """A random-weight tiny network (seed 1) saved as ``folder/tiny.pt``: the ML client's real code path, cheap."""
    from potentials.model_io import save_model
    from potentials.network import EmbeddedAIMNet2, ModelConfig

    path = folder / "tiny.pt"
    save_model(path, EmbeddedAIMNet2(ModelConfig.from_toml(REPO / "inputs/models/configs/tiny.toml"), seed=1))
    return path

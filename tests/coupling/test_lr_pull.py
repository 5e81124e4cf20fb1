"""A Na+ pulled away from a -1 ML zone (acetate, the shipped model) through the embedding cutoff, in a periodic box
prepared by `mlmm prepare` with its defaults (electrostatic-lr), through the ML and MM clients' engines.

With the cutoff-only scheme the ML–ion energy falls from about -k/r to 0 between 1.0 and 1.2 nm, and the radial
force in the switching shell is several times the Coulomb force at contact; with the long-range term the energy
follows Coulomb's -1/+1 difference and the force stays smooth and bounded.
"""
from pathlib import Path

import numpy as np
import openmm
import pytest
from openmm import app, unit

from coupling.engines import EngineOptions, build_ml_engine, build_mm_engine
from potentials.core.spec import SystemSpec
from potentials.core.units import COULOMB_KJMOL_NM

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "inputs/models/small_b3lyp_svp.pt"
BOX_NM = 6.0
DISTANCES = np.round(np.arange(0.70, 2.501, 0.02), 3)         # nm from the acetate's centroid

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """acetate (input.pdb) + one Na+ 0.7 nm above its plane in a 6 nm box (no water), through `mlmm prepare`
    (without relaxation: it would move the ion) with its defaults otherwise."""
    from driver.cli import main as cli

    folder = tmp_path_factory.mktemp("acetate_na")
    pdb = app.PDBFile(str(ROOT / "inputs/examples/acetate/input.pdb"))
    m = app.Modeller(pdb.topology, pdb.positions)
    ion = app.Topology()
    ion.addAtom("NA", app.element.sodium, ion.addResidue("NA", ion.addChain()))
    centre = np.mean(m.positions.value_in_unit(unit.nanometer), axis=0)
    m.add(ion, [openmm.Vec3(*(centre + [0.0, 0.0, 0.7]))] * unit.nanometer)
    m.topology.setPeriodicBoxVectors(np.eye(3) * BOX_NM * unit.nanometer)
    pos = np.array(m.positions.value_in_unit(unit.nanometer)) - centre + BOX_NM / 2
    with open(folder / "acetate_na.pdb", "w") as fh:
        app.PDBFile.writeFile(m.topology, pos * 10.0, fh)
    assert cli(["prepare", str(folder / "acetate_na.pdb"), "--ml", "resname ACT", "--no-minimize",
                "--out", str(folder / "prep")]) == 0
    return folder / "prep" / "system.toml"


def _pull(spec: SystemSpec):
    """Total energy (kJ/mol) and the radial force on the ion (kJ/mol/nm, > 0 outwards) along the line."""
    from potentials.openmm_system import load_system

    _, _, pos = load_system(spec)
    box = np.asarray(spec.structure.box_nm)
    ml = np.asarray(spec.ml.indices)
    na = int(np.setdiff1d(np.arange(len(pos)), ml)[0])
    centre = pos[ml].mean(axis=0)
    u = (pos[na] - centre) / np.linalg.norm(pos[na] - centre)
    ml_engine = build_ml_engine(spec, EngineOptions(model=str(MODEL)))
    mm_engine = build_mm_engine(spec, EngineOptions(platform="Reference"))
    energies, forces = [], []
    for d in DISTANCES:
        p = pos.copy()
        p[na] = centre + d * u
        a = ml_engine.compute(p[None], box[None])[0]
        b = mm_engine.compute(p[None], box[None])[0]
        energies.append(a.energy + b.energy)
        forces.append((a.forces[na] + b.forces[na]) @ u)
    return np.array(energies), np.array(forces)


def test_na_pulled_from_acetate_follows_coulomb(prepared):
    spec = SystemSpec.load(prepared)
    assert spec.coupling.embedding == "electrostatic-lr" and spec.ml.charge == -1 and spec.structure.periodic
    e, f = _pull(spec)
    k = COULOMB_KJMOL_NM
    coulomb = -k / DISTANCES                                          # -1/+1 pair
    de, de_coulomb = e - e[0], coulomb - coulomb[0]
    f_contact = k / DISTANCES[0] ** 2                                 # |Coulomb force| at 0.7 nm, 284 kJ/mol/nm
    print(f"\nNa+ pulled 0.70 -> {DISTANCES[-1]:.2f} nm: total energy change {de[-1]:+.1f} kJ/mol (Coulomb -1/+1 "
          f"{de_coulomb[-1]:+.1f}); largest |radial force| {np.abs(f).max():.0f} kJ/mol/nm (Coulomb at 0.7 nm "
          f"{f_contact:.0f}); in the switching shell 1.0-1.4 nm: "
          f"{np.abs(f[(DISTANCES > 1.0) & (DISTANCES < 1.4)]).max():.0f}")
    assert abs(de[-1] - de_coulomb[-1]) < 0.3 * abs(de_coulomb[-1])
    assert np.all(np.abs(de - de_coulomb) < 0.3 * abs(de_coulomb[-1]))
    assert np.all(np.abs(f) < 1.5 * f_contact)
    assert np.all(f < 0)                                              # attracted all the way
    shell = (DISTANCES > 0.9) & (DISTANCES < 1.5)                    # around the 1.0-1.2 nm switch
    assert np.all(np.abs(f[shell]) < 1.5 * k / DISTANCES[shell] ** 2)  # no spike: Coulomb-sized there too
    # the forces are the energy's derivative along the line (trapezoid rule)
    work = -0.5 * (f[1:] + f[:-1]) * np.diff(DISTANCES)
    assert np.abs(np.diff(e) - work).max() < 0.02 * np.abs(np.diff(e)).max() + 0.05


def test_cutoff_only_scheme_shows_the_artefact(prepared):
    """The same pull with [coupling] embedding = "electrostatic" (cutoff only, still available by name): the
    energy stops changing at the cutoff and the force spikes in the switching shell, which the test above
    would catch."""
    spec = SystemSpec.load(prepared)
    spec.coupling.embedding = "electrostatic"
    e, f = _pull(spec)
    at = lambda d: int(np.argmin(np.abs(DISTANCES - d)))           # noqa: E731
    print(f"\ncutoff only: energy at 1.0 nm {e[at(1.0)] - e[-1]:+.1f} kJ/mol, at 1.2 nm {e[at(1.2)] - e[-1]:+.1f} "
          f"(relative to {DISTANCES[-1]:.1f} nm); largest |radial force| {np.abs(f).max():.0f} kJ/mol/nm at "
          f"{DISTANCES[np.argmax(np.abs(f))]:.2f} nm")
    beyond = DISTANCES > 1.2 + 0.3                                    # every acetate atom beyond the cutoff
    assert np.ptp(e[beyond]) < 1.0                                    # flat: no Coulomb beyond the cutoff
    assert np.abs(f).max() > 1.5 * COULOMB_KJMOL_NM / DISTANCES[0] ** 2

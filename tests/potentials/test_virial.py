"""The virial the clients send i-PI is -dE/d(strain) (positions and cell deformed together, as i-PI's barostats do):
checked against independent finite differences of the total energy (fresh OpenMM contexts, a polynomial fit over
many strains, never the engine's own code path), for the MM client on a periodic box (trace on the shipped example,
every tensor component on a triclinic box) and for the ML client with the shipped model."""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import openmm
import openmm.app as app
import pytest
from openmm import unit

from potentials.core.errors import SetupError
from potentials.openmm_engine import OpenMMEngine

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "inputs/examples/methanol/prepared/system.toml"
MODEL = ROOT / "inputs/models/small_b3lyp_svp.pt"
BOX = np.array([[1.8, 0.0, 0.0], [0.5, 1.7, 0.0], [-0.6, 0.4, 1.6]])    # triclinic, reduced (nm rows)
UPPER = [(a, b) for a in range(3) for b in range(a, 3)]


def strain_derivative(energy, direction, span=1e-2, n=41, degree=6) -> float:
    """-dE/dt at t = 0 for the deformation F = I + t * direction, from a polynomial fit of ``energy(F)`` at ``n``
    strains in [-span, span]. A fit over many points averages the small energy jumps of pairs crossing the
    real-space cutoff, which make a single two-point difference noisy (the engine's own noise: module docstring
    of potentials.openmm_engine)."""
    ts = np.linspace(-span, span, n)
    es = [energy(np.eye(3) + t * direction) for t in ts]
    return -np.polyfit(ts, es, degree)[-2]


def context_energy(system, pos, box, platform="Reference", properties=None):
    """energy(F): total energy of a fresh context at positions F r and cell F h (independent of the engine)."""
    ctx = openmm.Context(copy.deepcopy(system), openmm.VerletIntegrator(1e-3),
                         openmm.Platform.getPlatformByName(platform), properties or {})

    def energy(deform):
        ctx.setPeriodicBoxVectors(*(box @ deform.T))      # upper-triangular F keeps the cell reduced here
        ctx.setPositions(pos @ deform.T)
        return ctx.getState(getEnergy=True).getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)

    return energy


@pytest.fixture(scope="module")
def triclinic_box():
    """~480-atom flexible TIP3P in a triclinic cell, PME with 0.7 nm cutoff and the dispersion correction,
    relaxed (Modeller's close contacts would give an unphysical, strongly repulsive virial)."""
    ff = app.ForceField("amber14/tip3p.xml")
    m = app.Modeller(app.Topology(), [])
    m.addSolvent(ff, boxVectors=[openmm.Vec3(*v) for v in BOX] * unit.nanometer)
    system = ff.createSystem(m.topology, nonbondedMethod=app.PME, nonbondedCutoff=0.7 * unit.nanometer,
                             constraints=None, rigidWater=False)
    ctx = openmm.Context(system, openmm.VerletIntegrator(1e-3), openmm.Platform.getPlatformByName("Reference"))
    ctx.setPeriodicBoxVectors(*BOX)
    ctx.setPositions(m.positions)
    openmm.LocalEnergyMinimizer.minimize(ctx, 10.0, 100)
    return system, ctx.getState(getPositions=True).getPositions(asNumpy=True).value_in_unit(unit.nanometer)


@pytest.fixture(scope="module")
def example():
    """The shipped example (methanol in 2637 atoms of TIP3P, 3 nm box): spec, positions nm, box nm."""
    from potentials.core.spec import SystemSpec
    from potentials.openmm_system import load_system

    spec = SystemSpec.load(EXAMPLE)
    _, _, pos = load_system(spec)
    return spec, np.asarray(pos), np.array(spec.structure.box_nm, dtype=np.float64)


def test_full_tensor_matches_strain_derivatives_triclinic(triclinic_box):
    """Every upper-triangular component (the ones i-PI reads) on a triclinic cell, the lower triangle mirrored;
    energies and forces are the same whatever the virial mode."""
    system, pos = triclinic_box
    engine = OpenMMEngine(system, platform="Reference")
    assert engine.virial == "full" and engine.provides_virial
    res = engine.compute(pos, BOX)[0]
    w = res.virial
    energy = context_energy(system, pos, BOX)
    scale = abs(np.trace(w)) / 3.0
    for a, b in UPPER:
        direction = np.zeros((3, 3))
        direction[a, b] = 1.0
        ref = strain_derivative(energy, direction)
        assert w[a, b] == pytest.approx(ref, abs=0.03 * scale), (a, b, w[a, b], ref)
    np.testing.assert_allclose(w, w.T, rtol=0, atol=1e-9 * np.abs(w).max())     # rotation invariance
    iso = np.trace(w)
    assert iso == pytest.approx(strain_derivative(energy, np.eye(3)), rel=0.02)
    assert iso < -1000.0                                 # relaxed liquid: attractive, far from zero

    none = OpenMMEngine(system, platform="Reference", virial="none")
    assert not none.provides_virial
    plain = none.compute(pos, BOX)[0]
    assert np.all(plain.virial == 0.0)
    assert plain.energy == pytest.approx(res.energy, rel=1e-12)
    np.testing.assert_allclose(plain.forces, res.forces, rtol=0, atol=1e-9 * np.abs(res.forces).max())
    # the context is left at the structure itself, not at a strained one
    st = engine.context.getState(getPositions=True)
    np.testing.assert_allclose(st.getPositions(asNumpy=True).value_in_unit(unit.nanometer), pos, atol=1e-12)


@pytest.mark.slow
def test_mm_trace_on_the_example(example):
    """The MM client's engine on the shipped example, as `mlmm client mm` builds it (CPU platform, mixed
    precision): tr W within 2 % of -dE/d(eps) under isotropic strain; "isotropic" gives the same trace."""
    from coupling.engines import EngineOptions, build_mm_engine

    spec, pos, box = example
    engine = build_mm_engine(spec, EngineOptions(platform="CPU", threads=1))
    assert engine.periodic and engine.virial == "full"
    w = engine.compute(pos, box)[0].virial
    system = copy.deepcopy(engine.context.getSystem())
    ref = strain_derivative(context_energy(system, pos, box, "CPU", {"Threads": "1"}), np.eye(3))
    assert np.trace(w) == pytest.approx(ref, rel=0.02)
    iso = OpenMMEngine(system, platform="CPU", threads=1, virial="isotropic").compute(pos, box)[0].virial
    assert np.trace(iso) == pytest.approx(ref, rel=0.02)


@pytest.mark.slow
def test_ml_virial_trace_on_the_example(example):
    """The ML client (shipped model, electrostatic embedding): its sum_i f_i (x) r_i over the images it used
    is -dE/d(strain) of its energy under isotropic strain of positions and cell."""
    from coupling.engines import EngineOptions, build_ml_engine

    spec, pos, box = example
    engine = build_ml_engine(spec, EngineOptions(model=str(MODEL)))
    w = engine.compute(pos[None], box[None])[0].virial

    def energy(deform):
        return engine.compute((pos @ deform.T)[None], (box @ deform.T)[None])[0].energy

    h = 1e-3                                                # the ML energy is smooth (switched embedding)
    ref = -(energy(np.eye(3) * (1 + h)) - energy(np.eye(3) * (1 - h))) / (2 * h)
    assert abs(np.trace(w)) > 1.0
    assert np.trace(w) == pytest.approx(ref, rel=0.02)


def test_virial_options_are_checked(triclinic_box):
    system, _ = triclinic_box
    with pytest.raises(SetupError, match="virial = 'fd'"):
        OpenMMEngine(system, platform="Reference", virial="fd")
    with pytest.raises(SetupError, match="strain_step"):
        OpenMMEngine(system, platform="Reference", strain_step=0.5)

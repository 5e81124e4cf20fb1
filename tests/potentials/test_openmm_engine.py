"""OpenMMEngine: forces are the gradient of its energies, the box i-PI sends is the one used, unwrapped and
non-reduced input changes nothing, the virial is -dE/d(strain), and bad systems are refused before step 0."""
from __future__ import annotations

import numpy as np
import openmm
import openmm.app as app
import pytest
from openmm import unit

from potentials.core.errors import CalculationFailed, SetupError
from potentials.openmm_engine import OpenMMEngine, available_platforms

BOX = np.array([[1.8, 0.0, 0.0], [0.5, 1.7, 0.0], [-0.6, 0.4, 1.6]])    # triclinic, reduced (nm rows)
FF = app.ForceField("amber14/tip3p.xml")


def _waters(box=None, size=None, nkeep=None):
    m = app.Modeller(app.Topology(), [])
    if box is not None:
        m.addSolvent(FF, boxVectors=[openmm.Vec3(*v) for v in box] * unit.nanometer)
    else:
        m.addSolvent(FF, boxSize=openmm.Vec3(*size) * unit.nanometer)
    if nkeep is not None:
        m.delete(list(m.topology.residues())[nkeep:])
    return m, np.array(m.positions.value_in_unit(unit.nanometer))


@pytest.fixture(scope="module")
def box_system():
    """~480-atom triclinic flexible TIP3P box with PME."""
    m, pos = _waters(box=BOX)
    system = FF.createSystem(m.topology, nonbondedMethod=app.PME, nonbondedCutoff=0.7 * unit.nanometer,
                             constraints=None, rigidWater=False)
    return system, pos, m.topology


@pytest.fixture(scope="module")
def cluster_system():
    """8 flexible TIP3P waters without a box."""
    m, pos = _waters(size=(1.0, 1.0, 1.0), nkeep=8)
    m.topology.setPeriodicBoxVectors(None)
    return FF.createSystem(m.topology, nonbondedMethod=app.NoCutoff, constraints=None, rigidWater=False), pos


def _energy(engine, pos, box=None):
    return engine.compute(pos[None], None if box is None else box[None])[0].energy


def test_forces_are_energy_gradient_periodic(box_system):
    system, pos, _ = box_system
    engine = OpenMMEngine(system, platform="Reference", virial="none")     # 37 energies: no strain virial
    box = BOX * 1.01                                   # not the system's default box
    res = engine.compute(pos[None], box[None])[0]
    rng = np.random.default_rng(0)
    h = 1e-5
    for i in rng.choice(len(pos), 6, replace=False):
        for a in range(3):
            p, m = pos.copy(), pos.copy()
            p[i, a] += h
            m[i, a] -= h
            fd = -(_energy(engine, p, box) - _energy(engine, m, box)) / (2 * h)
            assert fd == pytest.approx(res.forces[i, a], rel=1e-5, abs=1e-3)


def test_box_from_ipi_is_used(box_system):
    system, pos, _ = box_system
    engine = OpenMMEngine(system, platform="Reference")
    ref = openmm.Context(system, openmm.VerletIntegrator(1e-3), openmm.Platform.getPlatformByName("Reference"))
    for scale in (1.0, 1.03, 0.99, 1.0):
        box = BOX * scale
        ref.setPeriodicBoxVectors(*[openmm.Vec3(*v) for v in box])
        ref.setPositions(pos)
        e_ref = ref.getState(getEnergy=True).getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
        assert _energy(engine, pos, box) == pytest.approx(e_ref, rel=1e-12)
    assert _energy(engine, pos, BOX * 1.03) != pytest.approx(_energy(engine, pos, BOX), rel=1e-6)


def test_unwrapped_and_unreduced_input(box_system):
    """i-PI sends unwrapped positions and may send a non-reduced cell: neither changes energy or forces."""
    system, pos, topology = box_system
    engine = OpenMMEngine(system, platform="Reference")
    base = engine.compute(pos, BOX)[0]
    rng = np.random.default_rng(3)
    shifted = pos.copy()
    for res in topology.residues():                   # move whole molecules by random lattice vectors
        idx = [a.index for a in res.atoms()]
        shifted[idx] += rng.integers(-2, 3, size=3) @ BOX
    other = BOX.copy()
    other[1] += BOX[0]                                 # b + a: same lattice, not OpenMM's reduced form
    other[2] -= BOX[1]
    for p, b in ((shifted, BOX), (pos, other), (shifted, other)):
        r = engine.compute(p, b)[0]
        assert r.energy == pytest.approx(base.energy, rel=1e-9)
        np.testing.assert_allclose(r.forces, base.forces, rtol=1e-6, atol=1e-6 * np.abs(base.forces).max())


def test_batch_matches_single(box_system):
    system, pos, _ = box_system
    engine = OpenMMEngine(system, platform="Reference")
    stack = np.stack([pos, pos + 0.001, pos - 0.002])
    boxes = np.stack([BOX, BOX * 1.01, BOX])
    batch = engine.compute(stack, boxes)
    assert len(batch) == 3
    for p, b, r in zip(stack, boxes, batch):
        single = engine.compute(p, b)[0]
        assert r.energy == single.energy
        np.testing.assert_array_equal(r.forces, single.forces)


def test_nonperiodic_ignores_cell_and_virial(cluster_system):
    system, pos = cluster_system
    engine = OpenMMEngine(system, platform="Reference")
    a = engine.compute(pos, np.eye(3) * 2.0)[0]
    b = engine.compute(pos + 5.0, np.eye(3) * 1.0)[0]           # far outside a (ignored) small cell
    assert a.energy == pytest.approx(b.energy, rel=1e-10)
    # the virial is -dE/d(eps) for r -> (1 + eps) r: check it against a finite-difference strain
    h = 1e-5
    for i, j in ((0, 0), (1, 1), (2, 2), (0, 1), (0, 2), (1, 2)):
        de = []
        for sign in (1, -1):
            deform = np.eye(3)
            deform[i, j] += sign * h
            de.append(_energy(engine, pos @ deform.T))
        assert -(de[0] - de[1]) / (2 * h) == pytest.approx(a.virial[i, j], rel=1e-6, abs=1e-4)
    np.testing.assert_allclose(a.virial, a.virial.T, atol=1e-8 * np.abs(a.virial).max())   # rotation invariance


def test_periodic_virial_modes(box_system):
    """Periodic: the strain virial by default (checked against finite differences in test_virial.py), zeros
    only when asked for (virial="none")."""
    system, pos, _ = box_system
    assert np.all(OpenMMEngine(system, platform="Reference", virial="none").compute(pos, BOX)[0].virial == 0.0)
    assert np.abs(OpenMMEngine(system, platform="Reference").compute(pos, BOX)[0].virial).max() > 100.0


def test_refuses_bad_systems(cluster_system):
    system, _ = cluster_system
    rigid = openmm.XmlSerializer.deserialize(openmm.XmlSerializer.serialize(system))
    rigid.addConstraint(0, 1, 0.09572)
    with pytest.raises(SetupError, match="1 constraints"):
        OpenMMEngine(rigid, platform="Reference")
    with pytest.raises(SetupError, match=r"available: \["):
        OpenMMEngine(system, platform="NoSuchPlatform")
    m = app.Modeller(app.Topology(), [])
    tip4p = app.ForceField("amber14/tip4pew.xml")
    m.addSolvent(tip4p, model="tip4pew", boxSize=openmm.Vec3(1.0, 1.0, 1.0) * unit.nanometer)
    vs = tip4p.createSystem(m.topology, nonbondedMethod=app.PME, constraints=None, rigidWater=False)
    with pytest.raises(SetupError, match="virtual sites"):
        OpenMMEngine(vs, platform="Reference")


def test_bad_input_is_calculation_failed(box_system):
    system, pos, _ = box_system
    engine = OpenMMEngine(system, platform="Reference")
    with pytest.raises(CalculationFailed, match="positions of shape"):
        engine.compute(pos[:-3])
    rotated = BOX.copy()
    rotated[0] = [1.2, 1.3, 0.2]                                 # a not along x
    with pytest.raises(CalculationFailed, match="standard orientation"):
        engine.compute(pos, rotated)


def test_default_platform_agrees_with_reference(box_system):
    system, pos, _ = box_system
    engine = OpenMMEngine(system, properties={"Threads": "1"} if "CUDA" not in available_platforms() else None)
    assert engine.platform in ("CUDA", "CPU")
    fast = engine.compute(pos, BOX)[0]
    ref = OpenMMEngine(system, platform="Reference").compute(pos, BOX)[0]
    assert fast.energy == pytest.approx(ref.energy, rel=1e-4)
    np.testing.assert_allclose(fast.forces, ref.forces, rtol=0, atol=1e-3 * np.abs(ref.forces).max())


def test_cpu_threads_apply_to_the_cpu_platform_only(cluster_system):
    """--threads reaches OpenMM's CPU platform and changes nothing in the result; Reference ignores it."""
    system, pos = cluster_system
    if "CPU" not in available_platforms():
        pytest.skip("no OpenMM CPU platform")
    one = OpenMMEngine(system, platform="CPU", threads=1)
    assert one.context.getPlatform().getPropertyValue(one.context, "Threads") == "1"
    two = OpenMMEngine(system, platform="CPU", threads=2)
    assert two.context.getPlatform().getPropertyValue(two.context, "Threads") == "2"
    a, b = one.compute(pos)[0], two.compute(pos)[0]
    assert a.energy == pytest.approx(b.energy, rel=1e-6) and np.allclose(a.forces, b.forces, atol=1e-3)
    assert OpenMMEngine(system, platform="Reference", threads=3).compute(pos)[0].energy == \
        pytest.approx(a.energy, rel=1e-5)

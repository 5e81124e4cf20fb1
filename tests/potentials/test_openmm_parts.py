"""Issue 16.3: the MM force split into a fast part (bonded + real space) and a slow part (PME reciprocal space)
for ring-polymer contraction (potentials/openmm_engine.py ``part``, client kinds mm-fast / mm-slow)."""
import numpy as np
import openmm
import pytest
from openmm import app, unit

from coupling.engines import ENGINES
from potentials.core.errors import SetupError
from potentials.openmm_engine import OpenMMEngine

BOX_NM = 1.6


@pytest.fixture(scope="module")
def water():
    """~400 atoms of flexible TIP3P, PME 0.7 nm, slightly displaced from Modeller's grid."""
    ff = app.ForceField("amber14/tip3p.xml")
    m = app.Modeller(app.Topology(), [])
    m.addSolvent(ff, boxSize=openmm.Vec3(BOX_NM, BOX_NM, BOX_NM) * unit.nanometer)
    system = ff.createSystem(m.topology, nonbondedMethod=app.PME, nonbondedCutoff=0.7 * unit.nanometer,
                             constraints=None, rigidWater=False)
    pos = np.asarray(m.positions.value_in_unit(unit.nanometer))
    pos = pos + np.random.default_rng(0).normal(scale=0.003, size=pos.shape)
    return system, pos, np.eye(3) * BOX_NM


@pytest.mark.parametrize("virial", ["full", "isotropic", "none"])
def test_fast_plus_slow_is_all(water, virial):
    system, pos, box = water
    r = {part: OpenMMEngine(system, platform="Reference", virial=virial, part=part).compute(pos, box)[0]
         for part in ("all", "fast", "slow")}
    assert r["fast"].energy + r["slow"].energy == pytest.approx(r["all"].energy, rel=1e-10, abs=1e-6)
    np.testing.assert_allclose(r["fast"].forces + r["slow"].forces, r["all"].forces, atol=1e-6)
    np.testing.assert_allclose(r["fast"].virial + r["slow"].virial, r["all"].virial, atol=1e-5)
    if virial != "none":
        assert np.abs(r["slow"].virial).max() > 1.0          # each part really has its own virial
    # the slow part is smooth: stretching an O-H bond changes it ~1e2 times less than the whole force
    engine = OpenMMEngine(system, platform="Reference", virial="none", part="slow")
    moved = pos.copy()
    moved[1] += [0.002, 0.0, 0.0]                              # stretch the first O-H bond by ~2 pm
    df_slow = engine.compute(moved, box)[0].forces[1] - r["slow"].forces[1]
    full = OpenMMEngine(system, platform="Reference", virial="none")
    df_all = full.compute(moved, box)[0].forces[1] - r["all"].forces[1]
    assert np.linalg.norm(df_slow) < 0.03 * np.linalg.norm(df_all)     # measured 1.3 % (0.7 nm cutoff)


def test_kinds_and_errors(water):
    assert {"mm", "mm-fast", "mm-slow"} <= set(ENGINES.names())
    system, _, _ = water
    with pytest.raises(SetupError, match="part = 'medium'"):
        OpenMMEngine(system, platform="Reference", part="medium")
    cluster = openmm.System()
    cluster.addParticle(1.0)
    cluster.addForce(openmm.NonbondedForce())
    with pytest.raises(SetupError, match="needs reciprocal space"):
        OpenMMEngine(cluster, platform="Reference", part="slow")

"""The oracle test: ML client (stand-in potential = the force field's own ML-zone terms) + MM client == full MM.

If the MM-system surgery, the embedding and the ML engine's unit conversions and autograd forces are right,
the two clients together reproduce OpenMM's energy and forces of the unsplit system:

* cluster, NoCutoff, all MM charges embedded: exact (1e-6 relative requested; float64 gives ~1e-9);
* periodic box, PME, mechanical mode: exact up to PME accuracy (the ML–MM Coulomb stays in PME);
* periodic box, PME, electrostatic mode: the ML–MM Coulomb is a 1.2 nm cutoff sum instead of PME, so the
  two differ by the interaction of the ML zone with water dipoles beyond the cutoff; bounded analytically.
"""
import numpy as np
import pytest

from coupling.bookkeeping import check_split
from coupling.embedding import MMEnvironment
from coupling.ml_engine import MLEngine
from coupling.mmsystem import mlmm_mm_system, mm_charges
from coupling_cases import openmm_energy_forces
from oracle import ForceFieldOracle
from potentials.openmm_engine import OpenMMEngine

COULOMB = 138.935456
TIP3P_DIPOLE = 0.0489            # e·nm (2.35 D)
WATER_DENSITY = 33.4             # molecules / nm^3


def oracle_engine(case, cutoff, width=0.2, mode="electrostatic"):
    residues = np.array([a.residue.index for a in case.topology.atoms()])
    env = MMEnvironment(mm_charges(case.system), residues, case.ml, cutoff=cutoff, switch_width=width)
    return MLEngine(ForceFieldOracle(case.system, case.ml), case.numbers(), case.charge, env, mode=mode,
                    periodic=case.box is not None)


def split_sum(case, mode, cutoff):
    """Energy and forces of the two clients' engines (the MM client's OpenMMEngine, Reference platform)."""
    mm = mlmm_mm_system(case.system, case.ml, mode)
    engine = oracle_engine(case, cutoff, mode=mode)
    check_split(mm, case.ml, mode, full_system=case.system, engine=engine)
    boxes = None if case.box is None else case.box[None]
    mm_res, = OpenMMEngine(mm, platform="Reference").compute(case.positions[None], boxes)
    res, = engine.compute(case.positions[None], boxes)
    return mm_res.energy + res.energy, mm_res.forces + res.forces, res


@pytest.mark.parametrize("mode", ["electrostatic", "mechanical"])
def test_cluster_split_equals_full_system(cluster, mode):
    e_full, f_full = openmm_energy_forces(cluster.system, cluster.positions)
    e, f, res = split_sum(cluster, mode, cutoff=10.0)          # every water fully embedded
    if mode == "electrostatic":
        assert res.extras["ml.n_embedded"] == cluster.topology.getNumAtoms() - len(cluster.ml)
        assert np.abs(res.forces[len(cluster.ml):]).max() > 10        # the ML client pushes MM atoms
    else:
        assert res.extras["ml.n_embedded"] == 0 and np.all(res.forces[len(cluster.ml):] == 0)
    assert abs(e - e_full) < 1e-6 * abs(e_full)
    assert np.linalg.norm(f - f_full) < 1e-6 * np.linalg.norm(f_full)
    assert np.abs(f - f_full).max() < 1e-6 * np.abs(f_full).max()


def test_periodic_mechanical_split_equals_pme(water_box):
    """ML–MM Coulomb stays in PME (fixed MM charges); the oracle adds the ML zone's vacuum terms. ML–ML pairs
    are all inside the MM cutoff, so PME's excluded-pair correction removes exactly what the oracle adds."""
    pos, ml = water_box.positions, water_box.ml
    assert np.linalg.norm(pos[ml][:, None] - pos[ml][None], axis=-1).max() < 1.0
    e_full, f_full = openmm_energy_forces(water_box.system, pos, water_box.box)
    e, f, _ = split_sum(water_box, "mechanical", cutoff=1.2)
    assert abs(e - e_full) < 1e-6 * abs(e_full)
    assert np.linalg.norm(f - f_full) < 1e-6 * np.linalg.norm(f_full)


def test_periodic_electrostatic_split_within_cutoff_scheme_difference(water_box):
    """Electrostatic embedding in a PME box: the ML–MM Coulomb is summed over whole waters within 1.2 nm of
    an ML atom (switched from 1.0 nm) instead of by PME. What is left out is the field of the water dipoles
    beyond r_c = 1.0 nm. For uncorrelated dipoles it has the RMS magnitude
    E = k mu sqrt(8 pi rho / (3 r_c^3)) ~ 98 kJ/mol/nm/e (an order-of-magnitude estimate; water's dipole
    correlations can raise it), so with a factor-2 margin:
    * forces on ML atoms: RMS |dF| < 2 q_rms E;
    * energy: the ML dipole in that field, 3 sigma: |dE| < 3 |mu_ML| E / sqrt(3);
    * MM atoms beyond 1.6 nm: only PME lets them feel the ML zone, a dipole field of at most
      2 k |q| mu_ML / d^3 (bound at 2x for higher multipoles and images).
    Everything else (bonded, LJ, MM–MM PME) agrees exactly, as the mechanical test shows; and the force
    bound is below the ML–MM Coulomb force itself, so a missing or doubled ML–MM Coulomb term would fail.
    """
    pos, ml = water_box.positions, water_box.ml
    e_full, f_full = openmm_energy_forces(water_box.system, pos, water_box.box)
    e, f, res = split_sum(water_box, "electrostatic", cutoff=1.2)
    r_c = 1.0
    field_rms = COULOMB * TIP3P_DIPOLE * np.sqrt(8 * np.pi * WATER_DENSITY / (3 * r_c**3))
    q = mm_charges(water_box.system)
    mu_ml = np.linalg.norm(res.extras["ml.dipole"]) / 10.0                       # e·Å -> e·nm
    d = np.linalg.norm(pos[:, None] - pos[None, ml], axis=-1).min(axis=1)
    far = d > 1.6
    df = f - f_full
    rms = lambda x: np.sqrt(np.mean(np.sum(x ** 2, axis=1)))       # noqa: E731  (per-atom vector norms)
    force_bound = 2 * np.sqrt(np.mean(q[ml] ** 2)) * field_rms
    assert rms(df[ml]) < force_bound
    assert abs(e - e_full) < 3 * mu_ml * field_rms / np.sqrt(3)
    bound_far = 2 * 2 * COULOMB * np.abs(q[far]) * mu_ml / d[far] ** 3
    assert far.sum() > 1000 and np.all(np.linalg.norm(df[far], axis=1) < bound_far)
    _, f_mech = openmm_energy_forces(mlmm_mm_system(water_box.system, ml, "mechanical"), pos, water_box.box)
    _, f_elec = openmm_energy_forces(mlmm_mm_system(water_box.system, ml, "electrostatic"), pos, water_box.box)
    assert rms((f_mech - f_elec)[ml]) > force_bound                 # the ML–MM Coulomb forces themselves


def test_gas_phase_zone_without_mm_atoms(dipeptide):
    """Everything ML, nothing to embed: the ML client alone is the force field (and the MM client is zero)."""
    from openmm import app

    ff, top, pos = dipeptide
    system = ff.createSystem(top, nonbondedMethod=app.NoCutoff, constraints=None)
    ml = np.arange(len(pos))
    env = MMEnvironment(mm_charges(system), np.array([a.residue.index for a in top.atoms()]), ml)
    engine = MLEngine(ForceFieldOracle(system, ml), [a.element.atomic_number for a in top.atoms()], 0, env,
                      periodic=False)
    res, = engine.compute(pos[None], None)
    e_full, f_full = openmm_energy_forces(system, pos)
    assert res.extras["ml.n_embedded"] == 0
    assert abs(res.energy - e_full) < 1e-6 * abs(e_full)
    assert np.abs(res.forces - f_full).max() < 1e-6 * np.abs(f_full).max()

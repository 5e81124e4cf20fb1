"""MM-system surgery: the MM client keeps MM–MM and ML–MM LJ terms and nothing internal to the ML zone."""
import copy

import numpy as np
import openmm
import pytest
from openmm import app, unit

from coupling_cases import openmm_energy_forces
from coupling.bookkeeping import OWNERSHIP, check_split, ownership_table
from coupling.engines import mm_system_from_spec
from coupling.mmsystem import boundary_bonds, check_selection, mlmm_mm_system, mm_charges, mm_environment
from potentials.core.errors import SetupError
from potentials.core.spec import CouplingSpec, MLSpec, StructureSpec, SystemSpec

ONE_4PI_EPS0 = 138.935456


def _nb(system):
    return next(f for f in system.getForces() if isinstance(f, openmm.NonbondedForce))


def _params(system):
    nb = _nb(system)
    p = [nb.getParticleParameters(i) for i in range(system.getNumParticles())]
    return np.array([[x[0].value_in_unit(unit.elementary_charge), x[1].value_in_unit(unit.nanometer),
                      x[2].value_in_unit(unit.kilojoule_per_mole)] for x in p])


@pytest.mark.parametrize("method,mode", [("NoCutoff", "electrostatic"), ("NoCutoff", "mechanical"),
                                         ("CutoffNonPeriodic", "electrostatic"), ("CutoffNonPeriodic", "mechanical"),
                                         ("PME", "electrostatic")])
def test_ml_zone_alone_gives_zero(dipeptide, method, mode):
    """Every atom ML: the MM client must return exactly zero energy and forces (no ML internal term survives).

    PME: in mechanical mode the ML charges still meet their own periodic images (owned by the MM client, see
    OWNERSHIP), so only the electrostatic mode is exactly zero there; the LJ dispersion correction is a
    constant over all atom types and is switched off for this check.
    """
    ff, top, pos = dipeptide
    top = copy.deepcopy(top)
    top.setPeriodicBoxVectors(np.eye(3) * 3.0 if method == "PME" else None)
    system = ff.createSystem(top, nonbondedMethod=getattr(app, method), constraints=None, rigidWater=False)
    _nb(system).setUseDispersionCorrection(False)
    full_e, _ = openmm_energy_forces(system, pos, np.eye(3) * 3.0 if method == "PME" else None)
    mm = mlmm_mm_system(system, range(len(pos)), mode)
    e, f = openmm_energy_forces(mm, pos, np.eye(3) * 3.0 if method == "PME" else None)
    assert abs(full_e) > 10                     # the force field does give the molecule an energy
    assert abs(e) < 1e-9 and np.abs(f).max() < 1e-9
    check_split(mm, range(len(pos)), mode, full_system=system)


def test_input_untouched_and_ml_terms_removed(cluster):
    before = openmm.XmlSerializer.serialize(cluster.system)
    mm = mlmm_mm_system(cluster.system, cluster.ml)
    assert openmm.XmlSerializer.serialize(cluster.system) == before
    ml = set(cluster.ml.tolist())
    for f_full, f_mm in zip(cluster.system.getForces(), mm.getForces()):
        assert type(f_full) is type(f_mm)
        if isinstance(f_full, openmm.HarmonicBondForce):
            n_ml = sum(all(a in ml for a in f_full.getBondParameters(k)[:2]) for k in range(f_full.getNumBonds()))
            assert n_ml == 21 and f_mm.getNumBonds() == f_full.getNumBonds() - n_ml    # 21 bonds in ACE-ALA-NME
        if isinstance(f_full, openmm.PeriodicTorsionForce):
            assert f_mm.getNumTorsions() == 0                                            # water has none
    p0, p1 = _params(cluster.system), _params(mm)
    assert np.all(p1[cluster.ml, 0] == 0)                                             # no ML charge
    mm_atoms = np.setdiff1d(np.arange(len(p0)), cluster.ml)
    assert np.array_equal(p0[mm_atoms], p1[mm_atoms]) and np.array_equal(p0[:, 1:], p1[:, 1:])  # LJ kept
    check_split(mm, cluster.ml, "electrostatic", full_system=cluster.system)
    with pytest.raises(SetupError, match="ML–ML pairs still interact"):
        check_split(cluster.system, cluster.ml, "electrostatic")
    with pytest.raises(SetupError, match="carry charge"):
        check_split(mlmm_mm_system(cluster.system, cluster.ml, "mechanical"), cluster.ml, "electrostatic")
    assert "ML–MM Coulomb" in ownership_table("electrostatic") and len(OWNERSHIP) >= 6


def _direct_ml_mm(system, pos, ml, ml_charges=None):
    """LJ (Lorentz-Berthelot) and Coulomb between ML and MM atoms, summed directly (kJ/mol, no cutoff)."""
    p = _params(system)
    mm = np.setdiff1d(np.arange(len(pos)), ml)
    r = np.linalg.norm(pos[ml][:, None] - pos[mm][None], axis=-1)
    sig = 0.5 * (p[ml, 1][:, None] + p[mm, 1][None])
    eps = np.sqrt(p[ml, 2][:, None] * p[mm, 2][None])
    lj = np.sum(4 * eps * ((sig / r) ** 12 - (sig / r) ** 6))
    q_ml = p[ml, 0] if ml_charges is None else np.asarray(ml_charges)
    return lj, np.sum(ONE_4PI_EPS0 * q_ml[:, None] * p[mm, 0][None] / r)


@pytest.mark.parametrize("mode", ["electrostatic", "mechanical"])
def test_mm_client_keeps_ml_mm_lj_and_owns_coulomb_only_in_mechanical(cluster, mode):
    """E_MM(system) - E_MM(ML zone moved 100 um away) is exactly the ML–MM LJ (+ Coulomb in mechanical mode)."""
    rng = np.random.default_rng(0)
    charges = rng.normal(0, 0.3, len(cluster.ml)) if mode == "mechanical" else None
    mm = mlmm_mm_system(cluster.system, cluster.ml, mode, ml_charges=charges)
    far = cluster.positions.copy()
    far[cluster.ml] += 1e5         # dipole tail of the far zone: ~1e-8 kJ/mol
    e_near, _ = openmm_energy_forces(mm, cluster.positions)
    e_far, _ = openmm_energy_forces(mm, far)
    lj, coul = _direct_ml_mm(cluster.system, cluster.positions, cluster.ml, charges)
    expected = lj + (coul if mode == "mechanical" else 0.0)
    assert abs(lj) > 0.1 and abs(coul) > 10       # (minimised: ML–MM LJ attraction and repulsion nearly cancel)
    assert e_near - e_far == pytest.approx(expected, rel=1e-7, abs=1e-6)   # ONE_4PI_EPS0 digits differ at 1e-8
    check_split(mm, cluster.ml, mode, full_system=cluster.system, ml_charges=charges)


def test_selection_cutting_a_bond_is_refused(dipeptide):
    ff, top, pos = dipeptide
    system = ff.createSystem(top, nonbondedMethod=app.NoCutoff, constraints=None)
    ala = [a.index for a in top.atoms() if a.residue.name == "ALA"]
    cut = boundary_bonds(system, ala)
    assert len(cut) > 0 and all(i in ala and j not in ala for i, j in cut)
    with pytest.raises(SetupError, match="cuts .* covalent .*link atoms"):
        mlmm_mm_system(system, ala)
    with pytest.raises(SetupError, match=r"ALA 2.*ACE 1"):
        check_selection(system, ala, top)
    assert boundary_bonds(system, range(top.getNumAtoms())) == []


def test_bad_input_is_refused(cluster):
    with pytest.raises(SetupError, match="outside the system"):
        mlmm_mm_system(cluster.system, [0, 10**6])
    with pytest.raises(SetupError, match="empty"):
        mlmm_mm_system(cluster.system, [])
    with pytest.raises(SetupError, match="unknown embedding mode"):
        mlmm_mm_system(cluster.system, cluster.ml, "polarizable")
    with pytest.raises(SetupError, match="need 23 finite ML charges"):
        mlmm_mm_system(cluster.system, cluster.ml, "mechanical", ml_charges=[0.0])
    with pytest.raises(SetupError, match="only used in mechanical"):
        mlmm_mm_system(cluster.system, cluster.ml, "electrostatic", ml_charges=np.zeros(len(cluster.ml)))


def _toy_system(n=8):
    s = openmm.System()
    for _ in range(n):
        s.addParticle(12.0)
    nb = openmm.NonbondedForce()
    for i in range(n):
        nb.addParticle(0.1 * (-1) ** i, 0.3, 0.5)
    s.addForce(nb)
    return s


def test_every_bonded_force_type_loses_only_ml_terms():
    """ML = atoms 0-3, MM = 4-7. Each bonded type gets one ML-only term and one MM-only term."""
    s = _toy_system()
    forces = []
    f = openmm.HarmonicBondForce(); forces.append(f)
    f.addBond(0, 1, 0.1, 1.0); f.addBond(4, 5, 0.1, 1.0)
    f = openmm.HarmonicAngleForce(); forces.append(f)
    f.addAngle(0, 1, 2, 1.0, 1.0); f.addAngle(4, 5, 6, 1.0, 1.0)
    f = openmm.PeriodicTorsionForce(); forces.append(f)
    f.addTorsion(0, 1, 2, 3, 1, 0.0, 1.0); f.addTorsion(4, 5, 6, 7, 1, 0.0, 1.0)
    f = openmm.RBTorsionForce(); forces.append(f)
    f.addTorsion(0, 1, 2, 3, *[1.0] * 6); f.addTorsion(4, 5, 6, 7, *[1.0] * 6)
    f = openmm.CMAPTorsionForce(); forces.append(f)
    f.addMap(2, [1.0] * 4)
    f.addTorsion(0, 0, 1, 2, 3, 1, 2, 3, 0); f.addTorsion(0, 4, 5, 6, 7, 5, 6, 7, 4)
    f = openmm.CustomBondForce("k*r"); forces.append(f)
    f.addPerBondParameter("k"); f.addGlobalParameter("scale", 2.0)
    f.addBond(0, 1, [1.0]); f.addBond(4, 5, [1.0]); f.addBond(3, 4, [1.0])   # the last: an ML–MM restraint
    f = openmm.CustomAngleForce("theta"); forces.append(f)
    f.addAngle(0, 1, 2); f.addAngle(4, 5, 6)
    f = openmm.CustomTorsionForce("theta"); forces.append(f)
    f.addTorsion(0, 1, 2, 3); f.addTorsion(4, 5, 6, 7)
    f = openmm.CustomCompoundBondForce(3, "distance(p1,p3)"); forces.append(f)
    f.addBond([0, 1, 2]); f.addBond([4, 5, 6])
    f = openmm.CustomExternalForce("x"); forces.append(f)
    f.addParticle(0); f.addParticle(5)
    f = openmm.CustomNonbondedForce("eps*r"); forces.append(f)
    f.addGlobalParameter("eps", 1.0)
    for _ in range(8):
        f.addParticle([])
    f.addExclusion(0, 1)
    for f in forces:
        s.addForce(f)
    s.addConstraint(0, 2, 0.1)       # ML-only constraint: removed with the ML bonded terms
    s.addConstraint(4, 6, 0.1)
    with pytest.raises(SetupError, match="cuts"):          # the 3-4 restraint is fine, but a constraint is a bond
        s2 = copy.deepcopy(s)
        s2.addConstraint(3, 4, 0.1)
        mlmm_mm_system(s2, range(4))
    mm = mlmm_mm_system(s, range(4))
    counts = {type(f).__name__: f for f in mm.getForces()}
    assert counts["HarmonicBondForce"].getNumBonds() == 1
    assert counts["HarmonicAngleForce"].getNumAngles() == 1
    assert counts["PeriodicTorsionForce"].getNumTorsions() == 1
    assert counts["RBTorsionForce"].getNumTorsions() == 1
    assert counts["CMAPTorsionForce"].getNumTorsions() == 1 and counts["CMAPTorsionForce"].getNumMaps() == 1
    assert counts["CustomBondForce"].getNumBonds() == 2                        # MM bond + ML–MM restraint
    assert counts["CustomBondForce"].getNumGlobalParameters() == 1
    assert counts["CustomAngleForce"].getNumAngles() == 1
    assert counts["CustomTorsionForce"].getNumTorsions() == 1
    assert counts["CustomCompoundBondForce"].getNumBonds() == 1
    assert list(counts["CustomCompoundBondForce"].getBondParameters(0)[0]) == [4, 5, 6]
    assert counts["CustomExternalForce"].getNumParticles() == 2                # restraints stay
    assert counts["CustomNonbondedForce"].getNumExclusions() == 6              # C(4,2), (0,1) not duplicated
    assert mm.getNumConstraints() == 1 and list(mm.getConstraintParameters(0)[:2]) == [4, 6]
    assert len(counts) == mm.getNumForces() == s.getNumForces()
    check_split(mm, range(4), "electrostatic", full_system=s)
    # OpenMM accepts the rebuilt system (exclusions of both nonbonded forces agree)
    pos = np.random.default_rng(0).uniform(0, 1, (8, 3))
    e, _ = openmm_energy_forces(mm, pos)
    assert np.isfinite(e)


def test_unsupported_force_on_ml_atoms_is_refused():
    s = _toy_system()
    gb = openmm.GBSAOBCForce()
    for i in range(8):
        gb.addParticle(0.0, 0.15, 0.8)
    s.addForce(gb)
    with pytest.raises(SetupError, match="GBSAOBCForce.*acts on ML atoms"):
        mlmm_mm_system(s, range(4))
    s = _toy_system()
    cc = openmm.CustomCentroidBondForce(2, "distance(g1,g2)")
    cc.addGroup([4, 5]); cc.addGroup([6, 7]); cc.addBond([0, 1])
    s.addForce(cc)
    mlmm_mm_system(s, range(4))                      # acts on MM atoms only: fine
    cc.addGroup([0, 1]); cc.addBond([0, 2])
    with pytest.raises(SetupError, match="CustomCentroidBondForce"):
        mlmm_mm_system(s, range(4))


def test_virtual_site_in_ml_zone_is_refused():
    s = _toy_system()
    s.setVirtualSite(3, openmm.TwoParticleAverageSite(1, 2, 0.5, 0.5))
    with pytest.raises(SetupError, match="virtual site"):
        mlmm_mm_system(s, range(4))


def test_environment_and_spec_helpers(cluster, dipeptide):
    spec = SystemSpec(structure=StructureSpec(file="x.pdb", periodic=False),
                      ml=MLSpec(indices=cluster.ml.tolist(), charge=1),
                      coupling=CouplingSpec(cutoff_nm=0.9, switch_width_nm=0.3))
    env = mm_environment(cluster.system, cluster.topology, cluster.ml, spec)
    assert env.cutoff == 0.9 and env.switch_width == 0.3
    assert np.allclose(env.charges, mm_charges(cluster.system))
    assert env.charges[cluster.ml].sum() == pytest.approx(1.0)
    waters = env.residue[np.setdiff1d(np.arange(len(env.residue)), cluster.ml)]
    assert np.all(np.bincount(waters)[np.unique(waters)] == 3)            # residues = whole waters
    mm = mm_system_from_spec(spec, cluster.topology, cluster.system)
    check_split(mm, cluster.ml, "electrostatic", full_system=cluster.system)
    spec.coupling.embedding, spec.coupling.mechanical_charges = "mechanical", "mm"
    mm = mm_system_from_spec(spec, cluster.topology, cluster.system)
    check_split(mm, cluster.ml, "mechanical", full_system=cluster.system)
    spec.coupling.mechanical_charges = "model"
    with pytest.raises(SetupError, match="needs the model file"):
        mm_system_from_spec(spec, cluster.topology, cluster.system)

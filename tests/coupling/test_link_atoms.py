"""Link atoms (coupling.link_atoms): an ML zone that cuts the alanine dipeptide at its two terminal methyl carbons
(ALA plus both flanking peptide groups), in a water droplet with a Na+ ion.

The references are independent of the engine: OpenMM's energy of the unsplit system (the MM client plus a
stand-in "model" that is the force field's own ML-zone terms must reproduce it exactly in mechanical
embedding), central finite differences of the ML client's energy, and the strain derivative for the virial.
"""
import numpy as np
import pytest

from coupling.bookkeeping import check_split
from coupling.embedding import MMEnvironment
from coupling.link_atoms import LinkAtoms
from coupling.ml_engine import MLEngine
from coupling.mmsystem import mlmm_mm_system, mm_charges
from coupling.selection import select
from coupling_cases import MMCase, build_dipeptide, openmm_energy_forces
from oracle import ForceFieldOracle
from potentials.core.errors import SetupError
from potentials.openmm_engine import OpenMMEngine

CUT_ZONE = "resname ALA or (resname ACE and name C O) or (resname NME and name N H)"


@pytest.fixture(scope="module")
def linked(cluster):
    """The cluster fixture (dipeptide + Na+ in water) with the ML zone cut at both methyl carbons."""
    ml = select(cluster.topology, CUT_ZONE)
    return MMCase(cluster.topology, cluster.system, cluster.positions, None, ml)


def engine(case, mode, cutoff=1.0, alpha=0.0, cap_charge=0.0):
    zone = LinkAtoms.from_topology(case.topology, case.ml)
    residues = np.array([a.residue.index for a in case.topology.atoms()])
    env = MMEnvironment(mm_charges(case.system), residues, case.ml, cutoff=cutoff, switch_width=0.2)
    oracle = ForceFieldOracle(case.system, case.ml, polarizability=alpha, n_caps=zone.n_extra, cap_charge=cap_charge)
    return MLEngine(oracle, zone.numbers, 0, env, mode=mode, periodic=False, zone=zone), zone


def test_refuses_cuts_link_atoms_cannot_cap():
    _, top, _ = build_dipeptide()
    with pytest.raises(SetupError, match=r"amide \(peptide\).*peptide group.*CA"):
        LinkAtoms.from_topology(top, select(top, "resname ALA"))           # cuts both peptide bonds
    with pytest.raises(SetupError, match="polar C–O bond"):
        LinkAtoms.from_topology(top, select(top, "resname ALA or (resname ACE and name C CH3 H1 H2 H3) or "
                                                 "(resname NME and name N H)"))   # keeps C, leaves O in MM
    with pytest.raises(SetupError, match="bond to hydrogen"):
        LinkAtoms.from_topology(top, select(top, "resname ALA and not name HA or (resname ACE and name C O) "
                                                 "or (resname NME and name N H)"))
    from coupling.zones import WholeMolecules
    with pytest.raises(SetupError, match="link-atoms"):                    # whole molecules point to link atoms
        WholeMolecules.from_topology(top, select(top, CUT_ZONE))


def test_caps_sit_on_the_cut_bonds(linked):
    zone = LinkAtoms.from_topology(linked.topology, linked.ml)
    atoms = list(linked.topology.atoms())
    assert sorted((atoms[l.q1].name, atoms[l.m1].residue.name) for l in zone.links) == [("C", "ACE"), ("N", "NME")]
    assert np.array_equal(zone.numbers[-2:], [1, 1]) and zone.n_model == len(linked.ml) + 2
    ext = zone.extend(linked.positions, None)
    for k, link in enumerate(zone.links):
        q, m, h = linked.positions[link.q1], linked.positions[link.m1], ext[len(atoms) + k]
        assert np.allclose(h, q + link.g * (m - q))
        want = 0.109 if atoms[link.q1].element.symbol == "C" else 0.101          # nm, at the standard length
        assert abs(np.linalg.norm(h - q) - want) < 0.01


def test_mechanical_split_with_the_force_field_as_model_equals_full_mm(linked):
    """MM client + ML client with the force field's own ML-zone terms as the model == OpenMM's unsplit system
    (1e-6 relative): every bonded term across the boundary is kept once, none inside is left, and the caps add
    nothing (the stand-in gives them no energy)."""
    e_full, f_full = openmm_energy_forces(linked.system, linked.positions)
    zone = LinkAtoms.from_topology(linked.topology, linked.ml)
    mm = mlmm_mm_system(linked.system, linked.ml, "mechanical", cut_pairs=zone.cut_pairs())
    eng, _ = engine(linked, "mechanical")
    check_split(mm, linked.ml, "mechanical", full_system=linked.system, engine=eng)
    mm_res, = OpenMMEngine(mm, platform="Reference").compute(linked.positions[None], None)
    res, = eng.compute(linked.positions[None], None)
    e, f = mm_res.energy + res.energy, mm_res.forces + res.forces
    assert abs(e - e_full) < 1e-6 * abs(e_full)
    assert np.abs(f - f_full).max() < 1e-6 * np.abs(f_full).max()


def test_electrostatic_split_keeps_boundary_terms_and_moves_boundary_charges(linked):
    zone = LinkAtoms.from_topology(linked.topology, linked.ml)
    mm = mlmm_mm_system(linked.system, linked.ml, "electrostatic", cut_pairs=zone.cut_pairs())
    eng, _ = engine(linked, "electrostatic")
    check_split(mm, linked.ml, "electrostatic", full_system=linked.system, engine=eng)
    q = mm_charges(linked.system)
    env = eng.env
    n = len(q)
    for link in zone.links:
        assert env.charges[link.m1] == 0.0                        # no point charge next to the cap
    m2 = [a for l in zone.links for a in l.m2]
    mm_atoms = np.setdiff1d(np.arange(n), linked.ml)
    # ML zone (0 e) + every embedded MM charge = the system's total charge
    assert abs(env.charges[mm_atoms].sum() + 0 - q.sum()) < 1e-9
    assert not np.allclose(env.charges[m2], q[m2])


def test_bookkeeping_catches_a_lost_boundary_term(linked):
    zone = LinkAtoms.from_topology(linked.topology, linked.ml)
    mm = mlmm_mm_system(linked.system, linked.ml, "electrostatic", cut_pairs=zone.cut_pairs())
    import xml.etree.ElementTree as ET

    import openmm
    inside = set(linked.ml.tolist())
    k_angles = next(k for k, f in enumerate(mm.getForces()) if isinstance(f, openmm.HarmonicAngleForce))
    root = ET.fromstring(openmm.XmlSerializer.serialize(mm.getForce(k_angles)))
    angles = root.find("Angles")
    mixed = next(t for t in angles if len({int(t.get(p)) in inside for p in ("p1", "p2", "p3")}) == 2)
    angles.remove(mixed)                                           # an angle across a cut bond, lost
    lost = openmm.XmlSerializer.deserialize(openmm.XmlSerializer.serialize(mm))
    lost.removeForce(k_angles)
    lost.addForce(openmm.XmlSerializer.deserialize(ET.tostring(root, encoding="unicode")))
    with pytest.raises(SetupError, match="HarmonicAngleForce.*terms with MM atoms"):
        check_split(lost, linked.ml, "electrostatic", full_system=linked.system)
    nb = next(f for f in mm.getForces() if isinstance(f, openmm.NonbondedForce))
    for e in range(nb.getNumExceptions()):
        a, b, qq, s, eps = nb.getExceptionParameters(e)
        if (a in set(linked.ml)) != (b in set(linked.ml)):
            nb.setExceptionParameters(e, a, b, 0.1, s, eps)        # a 1-4 Coulomb across the cut left in MM
            break
    with pytest.raises(SetupError, match="ML–MM exceptions keep a charge product"):
        check_split(mm, linked.ml, "electrostatic", full_system=linked.system)


def test_forces_on_ml_cut_bond_and_nearby_mm_atoms_match_finite_differences(linked):
    eng, zone = engine(linked, "electrostatic", alpha=0.05, cap_charge=0.1)
    pos = linked.positions
    res, = eng.compute(pos[None], None)
    caps = zone.extend(pos, None)[len(pos):]
    dist = np.linalg.norm(pos[:, None] - caps[None], axis=-1).min(axis=1)
    near_mm = [i for i in np.argsort(dist) if i not in set(linked.ml)][:4]
    atoms = sorted({*linked.ml[:3], *(l.q1 for l in zone.links), *(l.m1 for l in zone.links), *near_mm})
    h = 1e-5
    for i in atoms:
        for k in range(3):
            p = pos.copy()
            p[i, k] += h
            up = eng.compute(p[None], None)[0].energy
            p[i, k] -= 2 * h
            down = eng.compute(p[None], None)[0].energy
            fd = -(up - down) / (2 * h)
            assert abs(fd - res.forces[i, k]) < 1e-4 * max(1.0, abs(fd)), (i, k, fd, res.forces[i, k])
    m1 = [l.m1 for l in zone.links]
    assert np.abs(res.forces[m1]).max() > 1.0                     # the caps push their MM atoms


def test_virial_is_the_strain_derivative(linked):
    """W = -dE/d(strain) under a uniform scaling of every position (the caps scale with their bonds)."""
    eng, _ = engine(linked, "electrostatic", alpha=0.05, cap_charge=0.1)
    pos = linked.positions
    res, = eng.compute(pos[None], None)
    h = 1e-6
    for a in range(3):
        for b in range(3):
            eps = np.zeros((3, 3))
            eps[a, b] = h
            up = eng.compute((pos @ (np.eye(3) + eps).T)[None], None)[0].energy
            down = eng.compute((pos @ (np.eye(3) - eps).T)[None], None)[0].energy
            assert abs(-(up - down) / (2 * h) - res.virial[a, b]) < 1e-4 * max(1.0, abs(res.virial[a, b]))


def test_reference_data_see_the_run_embedding(linked):
    """The QM/MM labeller's point charges for a capped zone (coupling.schemes point_charges with the zone) are the
    ML client's: the same QM atoms (caps last), the same MM positions and boundary-shifted, switched charges."""
    from coupling.schemes import SCHEMES

    eng, zone = engine(linked, "electrostatic")
    residues = np.array([a.residue.index for a in linked.topology.atoms()])
    pc = SCHEMES.get("electrostatic").point_charges(mm_charges(linked.system), residues, linked.ml, 1.0, 0.2,
                                                    zone=zone, ml_charge=0)
    qm, mm_pos, q = pc.frame(linked.positions, None)
    assert len(qm) == zone.n_model and np.allclose(qm, zone.extend(linked.positions, None)[zone.model_indices])
    eng.compute(linked.positions[None], None)
    inputs = eng._sources[0].inputs(zone.extend(linked.positions, None), None, qm, "cpu")
    ref = inputs.field.charges                       # the run's list also holds the skin's residues (scale 0)
    assert np.allclose(np.sort(q[q != 0]), np.sort(ref[ref != 0]), atol=1e-12) and abs(q.sum() - ref.sum()) < 1e-9
    caps = qm[-2:]
    # the nearest charges are the M2 atoms, ~0.13 nm from a cap (M1, 0.04 nm from it, carries none)
    assert np.linalg.norm(mm_pos[np.abs(q) > 0][:, None] - caps[None], axis=-1).min() > 0.12

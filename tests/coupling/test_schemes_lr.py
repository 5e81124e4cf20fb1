"""Long-range ML–MM electrostatics, the ``electrostatic-lr`` scheme (coupling/schemes_lr.py, potentials/ewald.py).

* the zone's Ewald energy (SPME) against OpenMM's own Ewald sum of the same charges (Reference platform,
  double precision), net charges on both sides, triclinic box: energy, forces on both sets, d/dq, virial;
* the ML client with the force-field oracle as potential (its charges are the force field's) + the MM client
  reproduce OpenMM's full PME system in a periodic box (nothing missing, nothing counted twice) and the full
  NoCutoff system for a cluster exactly;
* with the project's network (charges that depend on geometry and field): forces on ML atoms and on MM atoms
  inside, in and beyond the switching shell, and the virial, against finite differences of the energy in a
  periodic box around a charged zone; Verlet lists and wrapping change nothing.
"""
import numpy as np
import openmm
import pytest
from openmm import app, unit

from coupling.bookkeeping import check_split
from coupling.embedding import MMEnvironment
from coupling.ml_engine import MLEngine
from coupling.mmsystem import mlmm_mm_system, mm_charges
from coupling.schemes import SCHEMES
from coupling_cases import _solvated_dipeptide, openmm_energy_forces
from oracle import ForceFieldOracle
from potentials.core.errors import SetupError
from potentials.ewald import EwaldParameters, RealSpacePairs, check_reduced_box, min_image_rows, zone_ewald
from potentials.openmm_engine import OpenMMEngine
from test_ml_engine import check_fd, energy, group_scales, strain_virial, tiny_network  # noqa: F401 (fixture)

LR = "electrostatic-lr"


@pytest.fixture(scope="module")
def charged_box():
    """The dipeptide + a Na+ 0.6 nm away (the ML zone, +1 e) in a periodic 3.4 nm TIP3P box, PME; the MM part is
    neutral, so the system carries a net charge (PME's neutralising background)."""
    from coupling_cases import MMCase

    ff, m = _solvated_dipeptide(3.4, with_ion=True)
    system = ff.createSystem(m.topology, nonbondedMethod=app.PME, nonbondedCutoff=1.0 * unit.nanometer,
                             constraints=None, rigidWater=False, ewaldErrorTolerance=1e-5)
    box = np.array(m.topology.getPeriodicBoxVectors().value_in_unit(unit.nanometer))
    ml = np.array([a.index for a in m.topology.atoms() if a.residue.name != "HOH"])
    return MMCase(m.topology, system, np.array(m.positions.value_in_unit(unit.nanometer)), box, ml)


def lr_engine(case, cutoff=0.9, width=0.3, mode=LR, model=None, **kw):
    residues = np.array([a.residue.index for a in case.topology.atoms()])
    env = MMEnvironment(mm_charges(case.system), residues, case.ml, cutoff=cutoff, switch_width=width)
    model = model if model is not None else ForceFieldOracle(case.system, case.ml)
    return MLEngine(model, case.numbers(), case.charge, env, mode=mode, periodic=case.box is not None, **kw)


# ------------------------------------------------------------------------------------- the Ewald sum itself
def _random_charges(seed=1):
    rng = np.random.default_rng(seed)
    box = np.array([[3.1, 0.0, 0.0], [0.6, 2.9, 0.0], [-0.8, 0.9, 3.3]])          # reduced triclinic
    r = rng.normal(0.0, 0.15, (7, 3)) + [1.4, 1.1, 1.6]
    q = rng.normal(0.0, 0.5, 7)
    q += -1.0 - q.sum()                                                            # zone: -1 e
    x = rng.uniform(0.0, 1.0, (900, 3)) @ box
    d = np.stack([np.linalg.norm(min_image_rows(x - ri, box), axis=1) for ri in r])
    x = x[d.min(axis=0) > 0.25]                                                     # no clashes, images too
    qx = rng.normal(0.0, 0.4, len(x))
    qx += 2.0 - qx.sum()                                                           # the rest: +2 e (net +1)
    return box, q, r, qx, x


def _openmm_ewald(box, q, r, qx, x, tolerance=1e-7):
    """E(zone + fixed) - E(fixed) and the force difference from OpenMM's PME (tight tolerance; its Ewald takes
    rectangular boxes only), the zone's own pairs excluded (OpenMM subtracts their reciprocal part, as the
    long-range term does)."""
    def run(zone_q):
        system = openmm.System()
        system.setDefaultPeriodicBoxVectors(*box)
        nb = openmm.NonbondedForce()
        nb.setNonbondedMethod(openmm.NonbondedForce.PME)
        nb.setCutoffDistance(1.2)
        nb.setEwaldErrorTolerance(tolerance)
        for c in np.concatenate([zone_q, qx]):
            system.addParticle(1.0)
            nb.addParticle(float(c), 1.0, 0.0)
        for i in range(len(r)):
            for j in range(i + 1, len(r)):
                nb.addException(i, j, 0.0, 1.0, 0.0)
        system.addForce(nb)
        return openmm_energy_forces(system, np.concatenate([r, x]), box)
    (e1, f1), (e0, f0) = run(q), run(np.zeros_like(q))
    return e1 - e0, f1 - f0


def _pairs(box, r, x, cutoff):
    return RealSpacePairs(cutoff, 0.0).get(r, x, box)


def test_zone_ewald_equals_openmm_ewald():
    """Net charges on both sides (zone -1, rest +2) in a triclinic box: OpenMM's Ewald sum with its neutralising
    background, to the accuracy asked for; the derivatives are those of the energy."""
    box, q, r, qx, x = _random_charges()
    e_ref, f_ref = _openmm_ewald(box, q, r, qx, x)
    params = EwaldParameters.choose(box, 1.2, tolerance=1e-8, spacing=0.025)
    res = zone_ewald(q, r, qx, x, box, *_pairs(box, r, x, 1.2), params)
    assert abs(res.energy - e_ref) < 5e-3                                           # kJ/mol, of -7871
    f = np.concatenate([-res.dr, -res.dx])
    assert np.linalg.norm(f - f_ref) < 2e-5 * np.linalg.norm(f_ref)
    # derivatives at a coarser, production-like setting: d/dq (the energy is quadratic in q: central
    # differences are exact up to round-off), d/dr, d/dx, virial (strain of positions and box together)
    params = EwaldParameters.choose(box, 1.2)
    e = lambda q_, r_, x_, b_: zone_ewald(q_, r_, qx, x_, b_, *_pairs(b_, r_, x_, 1.2), params).energy  # noqa
    res = zone_ewald(q, r, qx, x, box, *_pairs(box, r, x, 1.2), params)
    h = 1e-4
    for i in (0, 3):
        dq = np.zeros_like(q)
        dq[i] = h
        assert res.dq[i] == pytest.approx((e(q + dq, r, x, box) - e(q - dq, r, x, box)) / (2 * h), rel=1e-7)
        for k in range(3):
            d = np.zeros_like(r)
            d[i, k] = 1e-5
            fd = (e(q, r + d, x, box) - e(q, r - d, x, box)) / 2e-5
            assert res.dr[i, k] == pytest.approx(fd, rel=1e-5, abs=1e-4)
    j = int(np.argmin(np.linalg.norm(x - r[0], axis=1)))
    for k in range(3):
        d = np.zeros_like(x)
        d[j, k] = 1e-5
        assert res.dx[j, k] == pytest.approx((e(q, r, x + d, box) - e(q, r, x - d, box)) / 2e-5, rel=1e-5, abs=1e-4)
    w = np.zeros((3, 3))
    for a in range(3):
        for b in range(3):
            s = np.eye(3)
            s[a, b] += 1e-6
            t = np.eye(3)
            t[a, b] -= 1e-6
            w[a, b] = -(e(q, r @ s.T, x @ s.T, box @ s.T) - e(q, r @ t.T, x @ t.T, box @ t.T)) / 2e-6
    assert np.allclose(res.virial, w, rtol=1e-5, atol=1e-3)


def test_zone_ewald_does_not_depend_on_where_the_zone_sits():
    """Translating everything (each atom wrapped back into the box) leaves the energy of a charged zone
    unchanged to the mesh's accuracy; wrapping alone changes nothing at all."""
    box, q, r, qx, x = _random_charges(2)
    params = EwaldParameters.choose(box, 1.0)
    ref = zone_ewald(q, r, qx, x, box, *_pairs(box, r, x, 1.0), params)
    rng = np.random.default_rng(0)
    wrapped = x + rng.integers(-2, 3, size=x.shape) @ box
    res = zone_ewald(q, r, qx, wrapped, box, *_pairs(box, r, wrapped, 1.0), params)
    assert res.energy == pytest.approx(ref.energy, rel=1e-12)
    for shift in ([0.37, -1.01, 2.03], [1.5, 1.5, 1.5]):
        r2, x2 = r + shift, x + shift
        x2 = x2 - np.floor(x2 @ np.linalg.inv(box)) @ box
        res = zone_ewald(q, r2, qx, x2, box, *_pairs(box, r2, x2, 1.0), params)
        assert abs(res.energy - ref.energy) < 1e-4 * abs(ref.energy)                 # the mesh's accuracy
        assert np.linalg.norm(res.dr - ref.dr) < 1e-3 * np.linalg.norm(ref.dr)


# ------------------------------------------------------------------------------------------ bookkeeping
def _split_sum(case, mode, cutoff, width=0.2):
    mm = mlmm_mm_system(case.system, case.ml, mode)
    engine = lr_engine(case, cutoff=cutoff, width=width, mode=mode)
    check_split(mm, case.ml, mode, full_system=case.system, engine=engine)
    boxes = None if case.box is None else case.box[None]
    mm_res, = OpenMMEngine(mm, platform="Reference").compute(case.positions[None], boxes)
    res, = engine.compute(case.positions[None], boxes)
    return mm_res.energy + res.energy, mm_res.forces + res.forces, res


@pytest.mark.parametrize("case_name", ["water_box", "charged_box"])
def test_periodic_split_equals_full_pme(case_name, request):
    """The oracle's charges are the force field's, so the ML client (electrostatic-lr, 1.2 / 0.9 nm embedding
    cutoff) + the MM client must give OpenMM's PME energy and forces of the unsplit system, to the long-range
    term's accuracy (5e-4), where the cutoff-only scheme misses kJ/mol and tens of kJ/mol/nm. The charged box
    carries a net +1 e: the zone's background terms are the long-range term's."""
    case = request.getfixturevalue(case_name)
    cutoff = 1.2 if case_name == "water_box" else 0.9
    pos, ml = case.positions, case.ml
    assert np.linalg.norm(pos[ml][:, None] - pos[ml][None], axis=-1).max() < 1.0        # ML–ML pairs in the
    e_full, f_full = openmm_energy_forces(case.system, pos, case.box)                  # MM cutoff (oracle LJ)
    e, f, res = _split_sum(case, LR, cutoff)
    e_cut, f_cut, _ = _split_sum(case, "electrostatic", cutoff)
    assert "long_range" in res.extras["ml.energy"]
    assert abs(e - e_full) < 0.3 and abs(e_cut - e_full) > 1.0
    assert np.abs(f - f_full).max() < 2.0 and np.abs(f_cut - f_full).max() > 20.0
    assert np.linalg.norm(f - f_full) < 1e-3 * np.linalg.norm(f - f_cut) + 1e-5 * np.linalg.norm(f_full)
    far = np.linalg.norm(pos[:, None] - pos[None, ml], axis=-1).min(axis=1) > cutoff + 0.3
    assert np.all(res.forces[far] != 0)                                               # every charged MM atom


def test_cluster_split_is_the_full_coulomb_system(cluster):
    """No box: the long-range term is plain Coulomb beyond the (small) cutoff, so ML + MM equals the unsplit
    NoCutoff system exactly."""
    e_full, f_full = openmm_energy_forces(cluster.system, cluster.positions)
    e, f, res = _split_sum(cluster, LR, cutoff=0.6)
    assert res.extras["ml.n_embedded"] < cluster.topology.getNumAtoms() - len(cluster.ml)   # some left out
    assert abs(e - e_full) < 1e-6 * abs(e_full)
    assert np.abs(f - f_full).max() < 1e-6 * np.abs(f_full).max()


def test_registered_with_its_rows_and_the_default_in_a_box():
    """The scheme's rows in the ownership table; a system file without [coupling] embedding gets it in a
    periodic box (what `mlmm prepare` writes there) and the cutoff-only scheme for a cluster; a name given stays."""
    from potentials.core.spec import CouplingSpec, StructureSpec, SystemSpec

    scheme = SCHEMES.get(LR)()
    table = scheme.ownership_table()
    assert "beyond the cutoff" in table and "own periodic images" in table and "long-range term" in table
    assert scheme.field_inputs and np.all(scheme.ml_charges_in_mm(np.ones(3), None) == 0)
    assert SystemSpec(StructureSpec(file="x.pdb")).coupling.embedding == LR
    assert SystemSpec(StructureSpec(file="x.pdb", periodic=False)).coupling.embedding == "electrostatic"
    named = SystemSpec(StructureSpec(file="x.pdb"), coupling=CouplingSpec(embedding="electrostatic"))
    assert named.coupling.embedding == "electrostatic"
    assert SystemSpec.from_dict(named.to_dict()).coupling.embedding == "electrostatic"


# ------------------------------------------------------------------------------ the network: derivatives
def test_network_forces_and_virial_match_finite_differences(charged_box, tiny_network):
    """A charged zone (+1 e) in a periodic box, the project's network (charges respond to geometry and field):
    forces on ML atoms, on MM atoms fully embedded, in the switching shell and beyond the cutoff (there only
    the long-range term acts), and the virial (full strain tensor; its trace = -dE/d(eps) under isotropic
    strain of positions and box), all against central differences of the energy."""
    engine = lr_engine(charged_box, model=tiny_network)
    pos, box, ml = charged_box.positions, charged_box.box, charged_box.ml
    res = engine.compute(pos[None], box[None])[0]
    terms = res.extras["ml.energy"]
    assert terms["total"] == pytest.approx(sum(v for k, v in terms.items() if k != "total"), rel=1e-9)
    atoms, s = group_scales(engine, pos, box)
    shell = atoms[(s > 0.05) & (s < 0.95)]
    inner = atoms[s == 1.0]
    d = np.linalg.norm(pos[:, None] - pos[None, ml], axis=-1).min(axis=1)
    beyond = np.flatnonzero(d > 1.3)
    assert len(shell) > 5 and len(beyond) > 1000
    picks = np.concatenate([ml[[0, 7, -1]], shell[:: max(1, len(shell) // 3)][:3], inner[-2:], beyond[[0, -1]]])
    assert np.abs(res.forces[beyond]).max() > 1e-2                      # the long-range term reaches them
    check_fd(engine, pos, picks, box)
    w = strain_virial(engine, pos, box)
    assert np.allclose(res.virial, w, rtol=1e-5, atol=1e-3)
    eps = 1e-6
    iso = -(energy(engine, pos * (1 + eps), box * (1 + eps))
            - energy(engine, pos * (1 - eps), box * (1 - eps))) / (2 * eps)
    assert np.trace(res.virial) == pytest.approx(iso, rel=1e-6, abs=1e-3)


def test_lists_and_wrapping_change_nothing(charged_box, tiny_network):
    """Verlet lists (embedding and real space) give the energies of a search on every call; every atom wrapped
    on its own gives the same energy, forces and virial."""
    pos, box = charged_box.positions, charged_box.box
    reuse, fresh = lr_engine(charged_box, model=tiny_network, skin=0.1), lr_engine(charged_box, model=tiny_network,
                                                                                 skin=0.0)
    rng = np.random.default_rng(5)
    walk = np.cumsum(rng.normal(0.0, 0.003, (8, *pos.shape)), axis=0)
    for frame in pos + walk:
        a, b = reuse.compute(frame[None], box[None])[0], fresh.compute(frame[None], box[None])[0]
        assert a.energy == pytest.approx(b.energy, rel=1e-12, abs=1e-9)
        assert np.allclose(a.forces, b.forces, rtol=1e-9, atol=1e-8)
        assert np.allclose(a.virial, b.virial, rtol=1e-9, atol=1e-7)
    wrapped = pos + rng.integers(-1, 2, size=pos.shape) @ box
    a, b = fresh.compute(pos[None], box[None])[0], fresh.compute(wrapped[None], box[None])[0]
    assert b.energy == pytest.approx(a.energy, rel=1e-12, abs=1e-8)
    assert np.allclose(a.forces, b.forces, atol=1e-7) and np.allclose(a.virial, b.virial, atol=1e-6)


def test_refusals(charged_box, cluster):
    """A box that is not in reduced form, and a model without charges, are refused in one line."""
    import torch

    skewed = charged_box.box.copy()
    skewed[1, 0] = 0.9 * skewed[0, 0]
    with pytest.raises(SetupError, match="reduced"):
        check_reduced_box(skewed)

    class NoCharges(torch.nn.Module):
        def forward(self, numbers, positions, mol_idx, charge, phi, efield):
            return {"energy": torch.zeros_like(charge).index_add_(0, mol_idx, (positions ** 2).sum(-1))}

    with pytest.raises(SetupError, match="predicts atomic charges"):
        lr_engine(cluster, model=NoCharges()).compute(cluster.positions[None], None)

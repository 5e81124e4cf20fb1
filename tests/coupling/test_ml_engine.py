"""The ML client's engine: forces = -dE/dx on ML and embedded MM atoms, smooth switching, periodic images,
virial, batching, mechanical mode, failure reporting."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from openmm import unit

from coupling.embedding import MMEnvironment, embedded_charges, select_environment
from coupling.ml_engine import MLEngine, check_model, model_dtype, vacuum_charges
from coupling.mmsystem import mm_charges
from potentials.core.errors import CalculationFailed, SetupError
from oracle import ForceFieldOracle

ALPHA = 0.05      # e·Å²/V: the oracle's polarisability, so that the field input matters too


def make_engine(case, cutoff=0.9, width=0.3, mode="electrostatic", alpha=ALPHA, model=None, **kw):
    residues = np.array([a.residue.index for a in case.topology.atoms()])
    env = MMEnvironment(mm_charges(case.system), residues, case.ml, cutoff=cutoff, switch_width=width)
    model = model if model is not None else ForceFieldOracle(case.system, case.ml, polarizability=alpha)
    return MLEngine(model, case.numbers(), case.charge, env, mode=mode, periodic=case.box is not None, **kw)


def energy(engine, pos, box=None):
    return engine.compute(pos[None], None if box is None else box[None])[0].energy


def group_scales(engine, pos, box=None):
    """Embedded MM atoms and the switch scale of each (1 inside, 0 < s < 1 in the switching shell)."""
    sel = select_environment(engine.env, pos, box)
    q, _ = embedded_charges(engine.env, sel, torch.tensor(pos))
    return sel.atoms, q.numpy() / engine.env.charges[sel.atoms]


def check_fd(engine, pos, atoms, box=None, h=5e-5):
    """Forces vs a 4-point central difference of the energy (error O(h^4), float64 round-off ~1e-8)."""
    forces = engine.compute(pos[None], None if box is None else box[None])[0].forces

    def e_at(a, k, step):
        p = pos.copy()
        p[a, k] += step
        return energy(engine, p, box)

    for a in atoms:
        for k in range(3):
            fd = -(8 * (e_at(a, k, h) - e_at(a, k, -h)) - (e_at(a, k, 2 * h) - e_at(a, k, -2 * h))) / (12 * h)
            assert forces[a, k] == pytest.approx(fd, rel=1e-6, abs=1e-5), (a, k)


def strain_virial(engine, pos, box, h=1e-6):
    """W_ab = -dE/d(eps_ab) by central differences, the strain applied to positions and box together."""
    fd = np.zeros((3, 3))
    for a in range(3):
        for b in range(3):
            eps = np.zeros((3, 3))
            eps[a, b] = h
            ep = energy(engine, pos @ (np.eye(3) + eps).T, box @ (np.eye(3) + eps).T)
            em = energy(engine, pos @ (np.eye(3) - eps).T, box @ (np.eye(3) - eps).T)
            fd[a, b] = -(ep - em) / (2 * h)
    return fd


def test_forces_match_finite_differences_in_and_near_the_switch(cluster):
    engine = make_engine(cluster)
    pos = cluster.positions
    atoms, s = group_scales(engine, pos)
    switching = atoms[(s > 0.02) & (s < 0.98)]
    assert len(np.unique(switching // 3)) >= 3                           # several waters in the shell
    inner = atoms[s == 1.0]
    d = np.linalg.norm(pos[inner][:, None] - pos[cluster.ml][None], axis=-1).min(axis=1)
    near_edge = inner[np.argsort(np.abs(d - 0.6))[:3]]                  # fully embedded, next to the inner edge
    picks = np.concatenate([cluster.ml[[0, 8, -1]], switching[::max(1, len(switching) // 6)][:6], near_edge])
    check_fd(engine, pos, picks)


def test_energy_continuous_as_a_water_crosses_the_cutoff(cluster):
    """Move a water radially from 0.2 nm inside the switching shell (0.6-0.9 nm) to well beyond it: energy
    changes must match the work of the forces (trapezoid rule, error O(step^3)) step by step, and the energy
    must stay flat once the water is out. A jump (a charge appearing or vanishing) would be seen at once."""
    engine = make_engine(cluster)
    pos = cluster.positions
    ml_centre = pos[cluster.ml].mean(axis=0)
    waters = np.setdiff1d(np.arange(len(pos)), cluster.ml)[::3]
    dist = np.linalg.norm(pos[waters] - ml_centre, axis=1)
    o = waters[np.argmin(np.abs(dist - 0.8))]
    u = (pos[o] - ml_centre) / np.linalg.norm(pos[o] - ml_centre)
    steps = np.linspace(-0.2, 0.7, 451)                                  # nm along u
    energies, work = [], []
    for t in steps:
        p = pos.copy()
        p[o:o + 3] += t * u
        res = engine.compute(p[None], None)[0]
        energies.append(res.energy)
        work.append(res.forces[o:o + 3].sum(axis=0) @ u)
    energies, work = np.array(energies), np.array(work)
    de = np.diff(energies)
    predicted = -0.5 * (work[1:] + work[:-1]) * np.diff(steps)
    assert np.ptp(energies) > 1.0                                        # the water matters
    assert np.abs(de - predicted).max() < 1e-3 * np.abs(de).max()        # no jump anywhere
    d_min = np.array([np.linalg.norm(pos[cluster.ml] - (pos[o:o + 3] + t * u).mean(0), axis=1).min()
                      for t in steps])
    out = d_min > 0.9 + 0.05
    assert out.sum() > 10 and np.ptp(energies[out]) < 1e-9 and np.all(work[out] == 0)


def test_periodic_images_wrapping_and_virial(water_box):
    engine = make_engine(water_box, cutoff=1.2, width=0.2)
    pos, box = water_box.positions, water_box.box
    ref = engine.compute(pos[None], box[None])[0]
    rng = np.random.default_rng(3)
    # every atom wrapped on its own (molecules broken), the ML zone too
    wrapped = pos + rng.integers(-1, 2, size=(len(pos), 3)) @ box
    res = engine.compute(wrapped[None], box[None])[0]
    assert res.energy == pytest.approx(ref.energy, rel=1e-12, abs=1e-9)
    assert np.allclose(res.forces, ref.forces, atol=1e-8)
    assert np.allclose(res.virial, ref.virial, atol=1e-7)
    # the same frame as a cluster: each embedded residue at the image the periodic engine used, the rest far
    sel = select_environment(engine.env, wrapped, box)
    cluster_pos = wrapped + 1000.0
    cluster_pos[water_box.ml] = wrapped[water_box.ml] + sel.ml_shift
    cluster_pos[sel.atoms] = wrapped[sel.atoms] + sel.shift
    engine.periodic = False
    res2 = engine.compute(cluster_pos[None], None)[0]
    engine.periodic = True
    assert res2.energy == pytest.approx(ref.energy, rel=1e-12)
    assert np.allclose(res2.forces, ref.forces, atol=1e-8)
    assert np.allclose(ref.virial, strain_virial(engine, pos, box), rtol=1e-5, atol=1e-4)
    assert np.allclose(ref.virial, ref.virial.T, atol=1e-6)            # rotation-invariant energy


def test_neighbour_list_reuse_is_exact(water_box):
    """With a skin the embedded residues are searched less often, yet every energy, force and virial equals the
    search-every-call engine's; big moves (a molecule wrapped by a box vector, a water jumping) force a rebuild."""
    pos, box = water_box.positions, water_box.box
    reuse = make_engine(water_box, cutoff=1.2, width=0.2, skin=0.1)
    fresh = make_engine(water_box, cutoff=1.2, width=0.2, skin=0.0)
    rng = np.random.default_rng(7)
    frames = [pos + np.cumsum(rng.normal(0, 0.002, (12, *pos.shape)), axis=0)[i] for i in range(12)]
    far = frames[-1].copy()
    far[-3:] += box[0]                                   # the last water wrapped by a box vector
    frames.append(far)
    jump = frames[-1].copy()
    o = int(np.argmax(np.linalg.norm(pos - pos[water_box.ml].mean(0), axis=1)))   # the water farthest out ...
    w = [a.index for a in list(water_box.topology.atoms())[o].residue.atoms()]
    jump[w] += pos[water_box.ml].mean(0) - jump[w].mean(0) + np.array([0.35, 0, 0])   # ... moved into the zone
    frames.append(jump)
    for f in frames:
        a, b = reuse.compute(f[None], box[None])[0], fresh.compute(f[None], box[None])[0]
        assert a.energy == pytest.approx(b.energy, rel=1e-12, abs=1e-9)
        assert np.allclose(a.forces, b.forces, rtol=1e-10, atol=1e-9)
        assert np.allclose(a.virial, b.virial, rtol=1e-10, atol=1e-8)
    assert fresh.list_builds == len(frames)
    assert 2 < reuse.list_builds < len(frames) - 4       # reused while atoms stay within skin/2, rebuilt after
    with pytest.raises(SetupError, match="skin"):
        make_engine(water_box, skin=-0.1).compute(pos[None], box[None])


def test_batch_equals_single_calls_and_translation_invariance(cluster):
    engine = make_engine(cluster)
    rng = np.random.default_rng(0)
    frames = cluster.positions[None] + rng.normal(0, 0.005, (3, *cluster.positions.shape))
    batch = engine.compute(frames, None)
    for frame, r in zip(frames, batch):
        single = engine.compute(frame[None], None)[0]
        assert r.energy == pytest.approx(single.energy, rel=1e-12)
        assert np.allclose(r.forces, single.forces, atol=1e-9)
        assert r.extras.keys() == single.extras.keys()          # same values up to summation order (the
        for key, value in r.extras.items():                     # neighbour lists of the two calls differ)
            if key == "ml.energy":
                assert value == pytest.approx(single.extras[key], rel=1e-12)
            else:
                assert np.allclose(value, single.extras[key], rtol=1e-12, atol=1e-12)
    moved = engine.compute(frames[:1] + np.array([1.3, -7.0, 2.2]), None)[0]
    assert moved.energy == pytest.approx(batch[0].energy, rel=1e-10)
    assert np.allclose(moved.forces, batch[0].forces, atol=1e-7)


def test_permuting_mm_molecules_changes_nothing(cluster):
    """Reverse the order of the waters in the system: same energy, forces follow their atoms."""
    n_ml = len(cluster.ml)
    assert np.array_equal(cluster.ml, np.arange(n_ml))
    n = len(cluster.positions)
    waters = np.arange(n_ml, n).reshape(-1, 3)[::-1].reshape(-1)
    perm = np.concatenate([cluster.ml, waters])
    engine = make_engine(cluster)
    env = engine.env
    env2 = MMEnvironment(env.charges[perm], env.residue[perm], env.ml_indices, env.cutoff, env.switch_width)
    engine2 = MLEngine(engine.model, cluster.numbers(), cluster.charge, env2, periodic=False)
    r1 = engine.compute(cluster.positions[None], None)[0]
    r2 = engine2.compute(cluster.positions[perm][None], None)[0]
    assert r2.energy == pytest.approx(r1.energy, rel=1e-12)
    assert np.allclose(r2.forces, r1.forces[perm], atol=1e-9)


def test_mechanical_mode_is_the_zone_in_vacuum(cluster):
    engine = make_engine(cluster, mode="mechanical")
    res = engine.compute(cluster.positions[None], None)[0]
    mm = np.setdiff1d(np.arange(len(cluster.positions)), cluster.ml)
    assert np.all(res.forces[mm] == 0) and res.extras["ml.n_embedded"] == 0
    far = cluster.positions.copy()
    far[mm] += 100.0                                                     # environment irrelevant
    assert engine.compute(far[None], None)[0].energy == pytest.approx(res.energy, rel=1e-12)
    q = vacuum_charges(engine.model, cluster.numbers(), cluster.positions[cluster.ml], cluster.charge)
    assert np.allclose(q, engine.env.charges[cluster.ml]) and q.sum() == pytest.approx(1.0)


def test_extras_are_json_and_consistent(cluster):
    engine = make_engine(cluster)
    res = engine.compute(cluster.positions[None], None)[0]
    extras = json.loads(json.dumps(res.extras))
    q = np.array(extras["ml.charges"])
    r = cluster.positions[cluster.ml] * 10.0
    # ml.dipole is -dE/dE0 of a uniform probe field: for the oracle (fixed charges, energy
    # sum q phi - alpha/2 |E|^2) that is sum q (r - centroid) + alpha sum_i E_i, with E_i (V/Å) of the embedded,
    # switched MM charges computed here by plain Coulomb
    atoms, scale = group_scales(engine, cluster.positions)
    x = cluster.positions[atoms] * 10.0
    qm = engine.env.charges[atoms] * scale
    d = r[:, None, :] - x[None]
    e_field = 14.399645 * (qm[None, :, None] * d / np.linalg.norm(d, axis=-1)[..., None] ** 3).sum(1)
    induced = ALPHA * e_field.sum(0)
    assert np.linalg.norm(induced) > 1e-3                               # the field matters here
    assert np.allclose(extras["ml.dipole"], q @ (r - r.mean(axis=0)) + induced, atol=1e-6)
    assert extras["ml.energy"]["total"] == pytest.approx(res.energy)
    assert 0 < extras["ml.n_embedded"] < len(cluster.positions) - len(cluster.ml)


def test_dipole_in_vacuum_is_the_networks_field_derivative(cluster):
    """Far from every MM charge the engine's ml.dipole is the network's own uniform-field response
    (potentials.network.field_dipole: the same derivative by another code path)."""
    from potentials.network import EmbeddedAIMNet2, ModelConfig, field_dipole

    torch.manual_seed(0)
    net = EmbeddedAIMNet2(ModelConfig(elements=sorted(set(cluster.numbers().tolist())), nfeature=4, nshifts=4, ncomb_v=2, aim_size=8,
                                      hidden=[[16], [16]], out_hidden=[8])).double().eval()
    pos = cluster.positions.copy()
    mm = np.setdiff1d(np.arange(len(pos)), cluster.ml)
    pos[mm] += 100.0
    res = make_engine(cluster, model=net).compute(pos[None], None)[0]
    assert res.extras["ml.n_embedded"] == 0
    r = torch.tensor(pos[cluster.ml] * 10.0)
    ref = field_dipole(net, torch.as_tensor(cluster.numbers()), r, torch.zeros(len(r), dtype=torch.long),
                       torch.tensor([float(cluster.charge)], dtype=torch.float64))[0].detach().numpy()
    ref = ref - cluster.charge * r.mean(0).numpy()          # field_dipole is about the origin, ml.dipole the centroid
    assert np.allclose(res.extras["ml.dipole"], ref, atol=1e-8)


class _Broken(torch.nn.Module):
    def forward(self, numbers, positions, mol_idx, charge, phi, efield):
        e = torch.zeros_like(charge).index_add_(0, mol_idx, (positions ** 2).sum(-1))
        return {"energy": e * float("nan"), "charges": torch.zeros_like(phi)}


def test_failures_are_reported(cluster):
    engine = make_engine(cluster, model=_Broken())
    with pytest.raises(CalculationFailed, match="call 1, structure 0: non-finite energy"):
        engine.compute(cluster.positions[None], None)
    good = make_engine(cluster)
    bad = cluster.positions.copy()
    bad[5, 1] = np.nan
    with pytest.raises(CalculationFailed, match=r"non-finite positions on atoms \[5\]"):
        good.compute(bad[None], None)
    with pytest.raises(CalculationFailed, match="shape"):
        good.compute(cluster.positions[None, :10], None)
    with pytest.raises(SetupError, match="unknown embedding mode"):
        make_engine(cluster, mode="both")
    with pytest.raises(SetupError, match="atomic numbers"):
        MLEngine(good.model, [1, 6], 0, good.env)
    with pytest.raises(SetupError, match="cannot describe"):
        check_model(good.model, [1, 6], 0)
    good.model.supports_charge = False
    with pytest.raises(SetupError, match="neutral molecules only"):
        check_model(good.model, cluster.numbers(), 1)
    if not torch.cuda.is_available():
        with pytest.raises(SetupError, match="not usable"):
            make_engine(cluster, device="cuda:0")
    assert model_dtype(good.model) == torch.float64 and model_dtype(_Broken()) == torch.float64


# ---------------------------------------------------------------------------------------------- the network
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_network():
    """The project's network with random weights (tiny preset, + Na), float64 for finite differences."""
    from potentials.network import EmbeddedAIMNet2, ModelConfig

    cfg = ModelConfig.from_toml(ROOT / "inputs/models/configs/tiny.toml", elements=[1, 6, 7, 8, 11])
    return EmbeddedAIMNet2(cfg, seed=1).double().eval()


def test_network_forces_match_finite_differences(cluster, tiny_network):
    engine = make_engine(cluster, model=tiny_network)
    pos = cluster.positions
    res = engine.compute(pos[None], None)[0]
    terms = res.extras["ml.energy"]
    assert {"local", "coulomb", "external", "polarisation"} <= set(terms)
    assert terms["total"] == pytest.approx(sum(v for k, v in terms.items() if k != "total"), rel=1e-9)
    assert sum(res.extras["ml.charges"]) == pytest.approx(1.0, abs=1e-9)      # NQE keeps the zone's charge
    atoms, s = group_scales(engine, pos)
    switching = atoms[(s > 0.02) & (s < 0.98)]
    inner = atoms[s == 1.0]
    d = np.linalg.norm(pos[inner][:, None] - pos[cluster.ml][None], axis=-1).min(axis=1)
    picks = np.concatenate([cluster.ml[[0, 6, 15, -1]], switching[::max(1, len(switching) // 4)][:4],
                            inner[np.argsort(d)[:2]], inner[np.argsort(np.abs(d - 0.6))[:2]]])
    assert np.abs(res.forces[picks[4:]]).max() > 1e-3                   # the MM atoms do feel the network
    check_fd(engine, pos, picks)


def test_damped_field_excess_is_thole_smearing():
    """One charge: E - excess = k q / r^2 (1 - exp(-(r/a)^3)) along the pair, finite and -> 0 as r -> 0."""
    from potentials.electrostatics import damped_field_excess, potential_and_field

    q, a = torch.tensor([0.8], dtype=torch.float64), 0.12
    for r in (0.02, 0.1, 0.2, 0.5):
        site = torch.tensor([[r, 0.0, 0.0]], dtype=torch.float64)
        src = torch.zeros(1, 3, dtype=torch.float64)
        _, e = potential_and_field(site, src, q)
        damped = (e - damped_field_excess(site, src, q, a))[0].numpy()
        want = 138.935456 * 0.8 / r ** 2 * (1.0 - np.exp(-(r / a) ** 3))
        assert damped[0] == pytest.approx(want, rel=1e-10) and abs(damped[1]) < 1e-12
    far = torch.tensor([[10 * a, 0.0, 0.0]], dtype=torch.float64)
    assert damped_field_excess(far, src, q, a).abs().max() == 0.0          # beyond DAMPING_RANGE widths


def test_damped_polarisation_forces_match_finite_differences(cluster):
    """A network whose polarisation term reads the short-range-damped MM field (pol_damping): forces on the ML
    atoms and on the close MM atoms whose field is damped match the energy, and the damping changes it."""
    from potentials.network import EmbeddedAIMNet2, ModelConfig

    cfg = ModelConfig.from_toml(ROOT / "inputs/models/configs/tiny.toml", elements=[1, 6, 7, 8, 11],
                                alpha_scale=2.0)
    bare = EmbeddedAIMNet2(cfg, seed=1).double().eval()
    damped = EmbeddedAIMNet2(ModelConfig.from_dict({**cfg.to_dict(), "pol_damping": 2.0}), seed=1).double().eval()
    pos = cluster.positions
    e_bare = make_engine(cluster, model=bare).compute(pos[None], None)[0].extras["ml.energy"]["polarisation"]
    engine = make_engine(cluster, model=damped)
    e_damped = engine.compute(pos[None], None)[0].extras["ml.energy"]["polarisation"]
    assert e_damped > e_bare + 1e-3                   # less negative: the close charges' field is screened
    mm = np.setdiff1d(np.arange(len(pos)), cluster.ml)
    d = np.linalg.norm(pos[mm][:, None] - pos[cluster.ml][None], axis=-1).min(axis=1)
    check_fd(engine, pos, np.concatenate([cluster.ml[[0, 6, -1]], mm[np.argsort(d)[:3]]]))


def test_network_float32_weights_agree_with_float64(cluster, tiny_network):
    import copy

    e64 = make_engine(cluster, model=tiny_network).compute(cluster.positions[None], None)[0]
    e32 = make_engine(cluster, model=copy.deepcopy(tiny_network).float(), dtype=torch.float64).compute(
        cluster.positions[None], None)[0]
    assert e32.energy == pytest.approx(e64.energy, rel=1e-5, abs=1e-3)
    assert np.abs(e32.forces - e64.forces).max() < 1e-3 * np.abs(e64.forces).max()


def test_from_spec_builds_a_consistent_pair(tmp_path, tiny_network):
    """system.toml + model file -> MLEngine; the MM client's system from the same spec passes check_split."""
    from potentials.model_io import save_model
    from potentials.openmm_system import load_system

    from coupling.bookkeeping import check_split
    from coupling.engines import mm_system_from_spec
    from potentials.core.spec import SystemSpec

    model_path = tmp_path / "tiny.pt"
    save_model(model_path, tiny_network)
    spec = SystemSpec.load(ROOT / "inputs/examples/methanol/prepared/system.toml")
    engine = MLEngine.from_spec(spec, model_path, "cpu")
    topology, system, pos = load_system(spec)
    assert engine.periodic and engine.dtype == torch.float64 and engine.natoms == len(pos)
    box = np.asarray(spec.structure.box_nm)
    res = engine.compute(pos[None], box[None])[0]
    assert np.isfinite(res.energy) and res.extras["ml.n_embedded"] > 100
    # the network in a periodic box: forces on ML and embedded MM atoms, and the virial, are derivatives
    atoms, s = group_scales(engine, pos, box)
    check_fd(engine, pos, [0, 3, atoms[np.argmin(s)], atoms[np.argmax(s)]], box)
    assert np.allclose(res.virial, strain_virial(engine, pos, box), rtol=1e-5, atol=1e-4)
    mm = mm_system_from_spec(spec, topology, system, pos, model_path=model_path)
    check_split(mm, spec.ml.indices, spec.coupling.embedding, full_system=system, engine=engine)
    # mechanical embedding with the network's vacuum charges in the MM system
    spec.coupling.embedding = "mechanical"
    mm = mm_system_from_spec(spec, topology, system, pos, model_path=model_path)
    q = vacuum_charges(tiny_network, engine.numbers.numpy(), pos[spec.ml.indices], 0)
    check_split(mm, spec.ml.indices, "mechanical", full_system=system, ml_charges=q)
    with pytest.raises(SetupError, match="does not know element"):
        check_model(tiny_network, [1, 6, 8, 17], 0)                    # Cl is not in the tiny model


def test_compiled_network_gives_the_same_forces(cluster, tiny_network):
    """torch.compile (--compile) changes speed, not physics: the shipped model on the example gives the eager
    energy and forces (ML and MM atoms; float32 weights, inductor may reorder float32 sums), also on a second
    call; a graph inductor cannot build (float64 scatter in torch 2.13) falls back to eager, results unchanged."""
    from potentials.core.spec import SystemSpec
    from potentials.openmm_system import load_system

    spec = SystemSpec.load(ROOT / "inputs/examples/methanol/prepared/system.toml")
    _, system, pos = load_system(spec)
    box = np.array([v.value_in_unit(unit.nanometer) for v in system.getDefaultPeriodicBoxVectors()])
    model = ROOT / "inputs/models/small_b3lyp_svp.pt"
    eager, compiled = MLEngine.from_spec(spec, model), MLEngine.from_spec(spec, model, compile=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)            # torch 2.13's inductor fails on multi-threaded float64 scatters
    try:
        _compare_compiled(eager, compiled, np.asarray(pos), box)
    finally:
        torch.set_num_threads(threads)
    fallback = make_engine(cluster, model=tiny_network, compile=True)
    res, ref = fallback.compute(cluster.positions[None])[0], make_engine(cluster, model=tiny_network).compute(
        cluster.positions[None])[0]
    # whether inductor builds this float64 graph depends on the thread count (it fails multi-threaded in torch
    # 2.13): compiled or fallen back, the results are the eager ones
    assert res.energy == pytest.approx(ref.energy, rel=1e-10) and np.allclose(res.forces, ref.forces, atol=1e-8)


def _compare_compiled(eager, compiled, pos, box):
    for shift in (0.0, 0.002):
        x = pos[None] + shift * np.sin(np.arange(3 * len(pos))).reshape(1, -1, 3)
        ref, res = eager.compute(x, box[None])[0], compiled.compute(x, box[None])[0]
        assert compiled.compiled
        assert res.energy == pytest.approx(ref.energy, abs=1e-3)
        assert np.abs(res.forces - ref.forces).max() < 1e-4 * np.abs(ref.forces).max()
        assert np.count_nonzero(np.abs(ref.forces).sum(1)) > 100              # MM atoms have forces too


def test_zones_of_several_molecules_are_flagged(tmp_path, tiny_network, caplog):
    """A model whose training zones held one molecule warns at start-up when the ML zone holds two (here:
    methanol + a water); a model that declares zones of two (metadata ml_molecules) does not."""
    from potentials.model_io import save_model
    from potentials.openmm_system import load_system

    from potentials.core.spec import SystemSpec

    spec = SystemSpec.load(ROOT / "inputs/examples/methanol/prepared/system.toml")
    topology, _, _ = load_system(spec)
    water = next(r for r in topology.residues() if r.name == "HOH")
    spec.ml.indices = sorted(list(spec.ml.indices) + [a.index for a in water.atoms()])
    spec.ml.selection = f"resname MOL or resid {water.id}"
    for declared, warned in ((None, True), (2, False)):
        path = tmp_path / f"tiny_{declared}.pt"
        save_model(path, tiny_network, None if declared is None else {"ml_molecules": declared})
        caplog.clear()
        with caplog.at_level("WARNING", logger="coupling.ml_engine"):
            engine = MLEngine.from_spec(spec, path, "cpu")
        assert len(engine.env.ml_indices) == 9
        assert ("holds 2 molecules" in caplog.text) == warned, caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="coupling.ml_engine"):
        MLEngine.from_spec(SystemSpec.load(ROOT / "inputs/examples/methanol/prepared/system.toml"),
                           tmp_path / "tiny_None.pt", "cpu")
    assert "molecules" not in caplog.text

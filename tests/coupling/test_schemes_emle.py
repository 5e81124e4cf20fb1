"""The ``emle`` scheme (coupling/schemes_emle.py): the model's charges q(R) of every step in a Slater-damped Coulomb
interaction with the embedded MM charges, plus direct induction of fixed atomic polarisabilities in their damped
field. Checked: the damping functions against quadrature of the Slater density and in both limits; a lone atom in
the field of one charge against -1/2 alpha k Q^2 / r^4 and against model-charges + induction; forces on ML and MM
atoms (close to the zone, where the damping acts, and in the switching shell) and the virial against finite
differences in a periodic box with the zone across the boundary; the training energy's units; the refusals; the
registry and the ownership table; a fresh AIMNet2 model in the ML client and in `mlmm evaluate`."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.integrate import quad

from coupling.bookkeeping import check_split
from coupling.embedding import MMEnvironment
from coupling.ml_engine import MLEngine
from coupling.mmsystem import mlmm_mm_system, mm_charges
from coupling.schemes import SCHEMES
from coupling.schemes_emle import (EmleEmbedding, damped_energies, element_parameters, induced, slater_field,
                                   slater_potential)
from potentials.adapter_base import ModelUnitsModule
from potentials.core.errors import SetupError
from potentials.core.units import ANGSTROM_PER_NM, COULOMB_EV_ANGSTROM, COULOMB_KJMOL_NM, KJMOL_PER_EV
from test_ml_engine import check_fd, strain_virial
from test_schemes_charges import ToyCharges

ROOT = Path(__file__).resolve().parents[2]
F64 = torch.float64
K = COULOMB_KJMOL_NM


def _env(case, cutoff: float, switch: float) -> MMEnvironment:
    residues = np.array([a.residue.index for a in case.topology.atoms()])
    return MMEnvironment(mm_charges(case.system), residues, case.ml, cutoff=cutoff, switch_width=switch)


def _emle(numbers) -> EmleEmbedding:
    """The scheme by its registered name, bound to the zone's atomic numbers."""
    return SCHEMES.get("emle")().for_zone(numbers)


def _pair(r_nm: float, q_mm: float = 1.0, cutoff: float = 2.0):
    """A lone O atom (the ML zone) at the origin and one MM charge on the x axis: (env, positions)."""
    env = MMEnvironment(np.array([0.0, q_mm]), np.array([0, 1]), np.array([0]), cutoff=cutoff, switch_width=0.2)
    return env, np.array([[0.0, 0.0, 0.0], [r_nm, 0.0, 0.0]])


def _pair_engine(env, charge: int, mode="emle", model=None) -> MLEngine:
    mode = _emle([8]) if mode == "emle" else mode
    return MLEngine(model or ToyCharges(), [8], charge, env, mode=mode, periodic=False, skin=0.0)


# ------------------------------------------------------------------------------------------------ damping
def test_damping_is_the_slater_density_and_has_both_limits():
    """V and L/r^3 against quadrature of the unit Slater density exp(-r/s)/(8 pi s^3); 1/r and 1/r^3 far away,
    finite (1/(2s), 1/(6s^3)) at r = 0, continuous where the series takes over, with finite gradients."""
    s = 0.045
    rho = lambda t: np.exp(-t / s) / (8 * np.pi * s ** 3)                                  # noqa: E731
    for r in (0.002, 0.03, 0.1, 0.3):
        inside = quad(lambda t: 4 * np.pi * t * t * rho(t), 0, r, epsabs=0, epsrel=1e-13)[0]
        outside = quad(lambda t: 4 * np.pi * t * rho(t), r, np.inf, epsabs=0, epsrel=1e-13)[0]
        rt, st = torch.tensor([r], dtype=F64), torch.tensor([s], dtype=F64)
        assert float(slater_potential(rt, st)) == pytest.approx(inside / r + outside, rel=1e-10)
        assert float(slater_field(rt, st)) == pytest.approx(inside / r ** 3, rel=1e-10)
    far = torch.tensor([60 * s], dtype=F64)
    st = torch.tensor([s], dtype=F64)
    assert float(slater_potential(far, st) * far) == pytest.approx(1.0, abs=1e-14)
    assert float(slater_field(far, st) * far ** 3) == pytest.approx(1.0, abs=1e-14)
    r0 = torch.zeros(1, dtype=F64, requires_grad=True)
    v0, l0 = slater_potential(r0, st), slater_field(r0, st)
    assert float(v0.detach()) == pytest.approx(1 / (2 * s), rel=1e-15)
    assert float(l0.detach()) == pytest.approx(1 / (6 * s ** 3), rel=1e-15)
    (g,) = torch.autograd.grad(v0 + l0 * s ** 2, r0)
    assert torch.isfinite(g).all()
    edge = 5e-3 * s                                                     # the series / closed form switch point
    for fn in (slater_potential, slater_field):
        below, above = (float(fn(torch.tensor([edge * f], dtype=F64), st)) for f in (1 - 1e-9, 1 + 1e-9))
        assert below == pytest.approx(above, rel=1e-8)


def test_parameters_are_van_duijnen_swart_with_thole_widths():
    alpha, width = element_parameters([1, 6, 7, 8])
    np.testing.assert_allclose(alpha * ANGSTROM_PER_NM ** 3, [0.4138, 1.2886, 0.9716, 0.8520], atol=1e-4)  # Å^3
    np.testing.assert_allclose(width, np.cbrt(alpha) / 2.1304, rtol=1e-12)
    with pytest.raises(SetupError, match="Z=15"):
        element_parameters([6, 15])


def test_thole_molecular_polarisabilities_match_experiment():
    """The induced dipoles are self-consistent (Thole's model, van Duijnen & Swart's parameters): the molecular
    polarisabilities of water and methane come out within 2 % of experiment (1.47 and 2.59 Å^3), where direct
    induction (the sum of the atomic ones) is 13 % too high."""
    th, r_oh, r_ch = np.radians(104.52), 0.09572, 0.1087 / np.sqrt(3)
    water = ([8, 1, 1], [[0, 0, 0], [r_oh, 0, 0], [r_oh * np.cos(th), r_oh * np.sin(th), 0]], 1.47)
    methane = ([6, 1, 1, 1, 1], np.array([[0, 0, 0], [1, 1, 1], [-1, -1, 1], [-1, 1, -1], [1, -1, -1]]) * r_ch, 2.59)
    for numbers, xyz, experiment in (water, methane):
        alpha = torch.tensor(element_parameters(numbers)[0])
        r = torch.tensor(np.asarray(xyz, dtype=np.float64))
        mol = torch.stack([induced(torch.eye(3, dtype=F64)[b].expand(len(r), 3), r, alpha).sum(0)
                           for b in range(3)])
        mean = float(torch.trace(mol)) / 3 * ANGSTROM_PER_NM ** 3
        assert mean == pytest.approx(experiment, rel=0.02)
        assert float(alpha.sum()) * ANGSTROM_PER_NM ** 3 > 1.1 * experiment
        np.testing.assert_allclose(mol.numpy(), mol.numpy().T, atol=1e-15)


# ------------------------------------------------------------------------------------------------ one pair
def test_induction_of_a_lone_atom_is_minus_half_alpha_k_q2_over_r4():
    """A neutral O atom (its toy charge is 0) 1.5 nm from a +1 e charge: the term is the induction alone, the
    independent -1/2 alpha k Q^2 / r^4, and the forces are its derivative -2 alpha k Q^2 / r^5 (attractive)."""
    r, q_mm = 1.5, 1.0
    env, pos = _pair(r, q_mm)
    res = _pair_engine(env, 0).compute(pos[None])[0]
    alpha = element_parameters([8])[0][0]
    want = -0.5 * alpha * K * q_mm ** 2 / r ** 4
    assert res.extras["ml.energy"]["emle_induction"] == pytest.approx(want, rel=1e-9)
    assert res.extras["ml.energy"]["emle"] == pytest.approx(want, rel=1e-9)
    assert res.energy == pytest.approx(want, rel=1e-9)
    f = 2 * alpha * K * q_mm ** 2 / r ** 5
    np.testing.assert_allclose(res.forces, [[f, 0, 0], [-f, 0, 0]], rtol=1e-8, atol=1e-15)


def test_far_away_it_is_model_charges_plus_induction_and_close_in_it_stays_finite():
    """A charged atom (q = -1 e): at 1.5 nm the damped Coulomb is q Q k / r, so emle = model-charges + induction; at
    1e-6 nm it is finite, k q Q / (2 s_O), with no induction (the damped field vanishes at r = 0)."""
    env, pos = _pair(1.5, 1.0)
    emle = _pair_engine(env, -1).compute(pos[None])[0]
    plain = _pair_engine(env, -1, mode="model-charges").compute(pos[None])[0]
    induction = emle.extras["ml.energy"]["emle_induction"]
    assert plain.extras["ml.energy"]["ml_mm_coulomb"] == pytest.approx(-K / 1.5, rel=1e-12)
    assert emle.energy == pytest.approx(plain.energy + induction, rel=1e-9)
    assert emle.extras["ml.energy"]["emle"] - induction == pytest.approx(-K / 1.5, rel=1e-9)
    env, pos = _pair(1e-6, 1.0)
    close = _pair_engine(env, -1).compute(pos[None])[0]
    s_o = element_parameters([8])[1][0]
    assert close.energy == pytest.approx(-K / (2 * s_o), rel=1e-6)
    assert abs(close.extras["ml.energy"]["emle_induction"]) < 1e-6 and np.all(np.isfinite(close.forces))


def test_training_energy_is_the_run_energy_in_model_units():
    """network_energy (Å, e, V, V/Å -> eV; undamped) of the charged pair at 1 nm equals the ML client's energy."""
    env, pos = _pair(1.0, 1.0)
    run = _pair_engine(env, -1).compute(pos[None])[0].energy
    x = torch.tensor(pos * ANGSTROM_PER_NM)
    d = x[0] - x[1]
    phi = COULOMB_EV_ANGSTROM * 1.0 / d.norm()
    field = COULOMB_EV_ANGSTROM * 1.0 * d / d.norm() ** 3
    energy, out = EmleEmbedding().network_energy(ModelUnitsModule(ToyCharges()), torch.tensor([8]), x[:1],
                                                 torch.zeros(1, dtype=torch.long), torch.tensor([-1.0]),
                                                 phi.reshape(1), field.reshape(1, 3))
    assert float(energy[0]) * KJMOL_PER_EV == pytest.approx(run, rel=1e-6)


# ------------------------------------------------------------------------------------------------ water box
def _straddling_box_case(case):
    """Positions of ``case`` with the ML zone across the periodic boundary (every atom wrapped into the box) and
    the water nearest the zone moved in so that an MM atom sits 0.1 nm from an ML atom (damping acts)."""
    pos, box, ml = case.positions.copy(), case.box, case.ml
    mm = np.setdiff1d(np.arange(len(pos)), ml)
    dist = np.linalg.norm(pos[mm][:, None] - pos[ml][None], axis=-1)
    j, i = np.unravel_index(np.argmin(dist), dist.shape)
    water = np.flatnonzero(np.array([a.residue.index for a in case.topology.atoms()])
                           == list(case.topology.atoms())[mm[j]].residue.index)
    d = pos[mm[j]] - pos[ml[i]]
    pos[water] -= d * (1 - 0.1 / np.linalg.norm(d))
    whole = pos - pos[ml].mean(0) + 0.02                        # the zone's centre at a box corner
    frac = whole @ np.linalg.inv(box)
    return (frac - np.floor(frac)) @ box, whole, int(ml[i]), water


def test_forces_and_virial_match_finite_differences_in_a_box(water_box):
    """Toy float64 charges q(R), the zone across the boundary, one water 0.1 nm from it: forces on ML atoms, on
    the close water (where the damping acts) and on atoms in the switching shell, and the full virial."""
    case = water_box
    pos, whole, close_ml, water = _straddling_box_case(case)
    env = _env(case, cutoff=1.0, switch=0.3)
    engine = MLEngine(ToyCharges(), case.numbers(), 0, env, mode=_emle(case.numbers()), skin=0.0)
    res = engine.compute(pos[None], case.box[None])[0]
    assert np.abs(res.forces[water]).max() > 10.0 and res.extras["ml.energy"]["emle_induction"] < -1.0
    ml = case.ml
    mm = np.setdiff1d(np.arange(len(pos)), ml)
    frac = (pos[mm][:, None] - pos[ml][None]) @ np.linalg.inv(case.box)
    dist = np.linalg.norm((frac - np.round(frac)) @ case.box, axis=-1).min(1)
    shell = mm[(dist > 0.75) & (dist < 0.95)]
    assert np.ptp(pos[ml] @ np.linalg.inv(case.box), axis=0).max() > 0.5          # the zone is split by the box
    atoms = [int(ml[0]), close_ml, int(ml[-1]), *water.tolist(), int(shell[0]), int(shell[len(shell) // 2])]
    check_fd(engine, pos, atoms, box=case.box)
    w = strain_virial(engine, pos, case.box)
    assert np.allclose(res.virial, w, rtol=1e-5, atol=1e-3)
    # the damping matters for the close water: the undamped (s -> 0) energy of the same charges differs
    with torch.no_grad():
        r = torch.tensor(whole[ml])
        q = ToyCharges().forward(torch.as_tensor(case.numbers()), r, torch.zeros(len(ml), dtype=torch.long),
                                 torch.tensor([0.0]), None, None)["charges"]
        alpha, width = (torch.tensor(a) for a in element_parameters(case.numbers()))
        xw, qw = torch.tensor(whole[water]), torch.tensor(mm_charges(case.system)[water])
        damped = damped_energies(q, r, width, alpha, qw, xw, K)
        bare = damped_energies(q, r, width * 1e-6, alpha, qw, xw, K)
    assert abs(float(damped[0] - bare[0])) > 0.1 and abs(float(damped[1] - bare[1])) > 0.1


# ------------------------------------------------------------------------------------------------ bookkeeping
def test_registry_ownership_and_mm_side(cluster):
    assert "emle" in SCHEMES.names()
    scheme = SCHEMES.get("emle")()
    assert isinstance(scheme, EmleEmbedding) and scheme.name == "emle"
    owners = dict((t.term, t.owner) for t in scheme.terms())
    assert owners["ML–MM Coulomb"].startswith("ML") and "damped" in owners["ML–MM Coulomb"]
    induction = [t for t in scheme.terms() if "induction" in t.term]
    assert len(induction) == 1 and induction[0].owner.startswith("ML")
    assert "induction" in scheme.ownership_table()
    mm = mlmm_mm_system(cluster.system, cluster.ml, scheme, None)
    check_split(mm, cluster.ml, scheme, full_system=cluster.system)
    assert not np.any(mm_charges(mm)[cluster.ml])


def test_refusals_are_one_line(cluster):
    """A model without charges (MACE, ANI), in the ML client and in training; an element without a published
    polarisability (Na+ of the cluster's zone, P); an unbound scheme; our field-aware network."""
    env, pos = _pair(1.0)
    with pytest.raises(SetupError, match="predicts atomic charges.*MACE, ANI"):
        _pair_engine(env, 0, model=ToyCharges(with_charges=False)).compute(pos[None])
    toy = ToyCharges()
    toy.predicts_charges = False
    with pytest.raises(SetupError, match="predicts atomic charges"):
        EmleEmbedding().network_energy(ModelUnitsModule(toy), torch.tensor([8]), torch.zeros(1, 3),
                                       torch.zeros(1, dtype=torch.long), torch.zeros(1), torch.zeros(1),
                                       torch.zeros(1, 3))
    with pytest.raises(SetupError, match="Z=15"):
        _emle([6, 15, 8])
    with pytest.raises(SetupError, match="Z=11"):
        _emle(cluster.numbers())
    with pytest.raises(SetupError, match="atomic numbers"):            # unbound: the engine binds it
        EmleEmbedding().field_source(env, 0.0, "cpu")
    from potentials.network import EmbeddedAIMNet2, ModelConfig

    net = EmbeddedAIMNet2(ModelConfig.from_toml(ROOT / "inputs/models/configs/tiny.toml", elements=[1, 6, 7, 8]),
                          seed=0).double()
    with pytest.raises(SetupError, match="electrostatic"):
        _pair_engine(env, 0, model=net).compute(pos[None])


def test_selectable_by_name_in_the_ml_engine():
    """``[coupling] embedding = "emle"``: the ML engine gets the scheme by name and binds its zone's numbers."""
    env, pos = _pair(1.5)
    by_name = MLEngine(ToyCharges(), [8], 0, env, mode="emle", periodic=False, skin=0.0).compute(pos[None])[0]
    assert by_name.energy == pytest.approx(_pair_engine(env, 0).compute(pos[None])[0].energy, rel=1e-12)


# ------------------------------------------------------------------------------------------------ AIMNet2
@pytest.fixture(scope="module")
def aimnet2_adapter(tmp_path_factory):
    if importlib.util.find_spec("aimnet") is None:
        pytest.skip("aimnet is not installed")
    from model_builders import build_aimnet2
    from potentials.adapters import load_adapter

    return load_adapter(build_aimnet2(tmp_path_factory.mktemp("aimnet2")))


def test_aimnet2_in_the_emle_scheme(water_box, aimnet2_adapter):
    """A fresh AIMNet2 model (float32, the aimnet package): the energy is the vacuum energy plus the term it
    reports, the term's forces (emle - vacuum) match finite differences of the term on ML and MM atoms."""
    case, adapter = water_box, aimnet2_adapter
    env = _env(case, 1.0, 0.2)
    pos, box = case.positions, case.box

    def run(p, mode):
        return MLEngine(adapter, case.numbers(), 0, env, mode=mode, skin=0.0).compute(p[None], box[None])[0]

    coupled, vacuum = run(pos, _emle(case.numbers())), run(pos, "mechanical")
    term = coupled.extras["ml.energy"]["emle"]
    assert abs(term) > 1.0 and coupled.energy == pytest.approx(vacuum.energy + term, abs=1e-6)
    assert coupled.extras["ml.energy"]["emle_induction"] < 0.0
    f_term = coupled.forces - vacuum.forces
    mm = np.setdiff1d(np.arange(len(pos)), case.ml)
    near = mm[np.argsort(np.linalg.norm(pos[mm][:, None] - pos[case.ml][None], axis=-1).min(1))[:2]]
    h = 2e-4
    for a in [int(case.ml[0]), int(case.ml[7]), *near.tolist()]:
        for k in range(3):
            e = []
            for sgn in (1, -1):
                p = pos.copy()
                p[a, k] += sgn * h
                e.append(run(p, _emle(case.numbers())).extras["ml.energy"]["emle"])
            tol = dict(rel=1e-4, abs=1e-3) if a in near else dict(rel=5e-3, abs=0.05)      # float32 charges
            assert -(e[0] - e[1]) / (2 * h) == pytest.approx(f_term[a, k], **tol), (a, k)
    assert np.abs(f_term[near]).max() > 1.0


def test_aimnet2_evaluates_in_the_emle_scheme(aimnet2_adapter):
    """`mlmm evaluate`'s code path (potentials.evaluate) with the scheme's network_energy on QM/MM frames."""
    from potentials.evaluate import evaluate, format_table, load_frames

    frames = load_frames(ROOT / "tests" / "data" / "tiny_qmmm.nc", "test")[:4]
    res = evaluate(ModelUnitsModule(aimnet2_adapter), frames, "cpu", schemes={"emle": SCHEMES.get("emle")()})
    assert all(np.isfinite(v["energy"]) for v in res["emle"].values())
    assert "emle" in format_table(res)

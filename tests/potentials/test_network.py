"""Physics of the embedding-aware network: forces, invariances, charge conservation, field response, batching.

Tiny model (inputs/models/configs/tiny.toml) in float64 with random weights; the MM environment is a set of
point charges whose potential and field come from coupling.embedding.potential_and_field (nm, kJ/mol),
converted to the network's V and V/Å, so MM forces go through the real chain of the coupling layer.
"""
import math
from pathlib import Path

import pytest
import torch
from scipy.spatial.distance import pdist, squareform

import potentials.neighbors as nbmod
import potentials.network as net
from potentials.electrostatics import potential_and_field
from potentials.core.errors import CalculationFailed, SetupError
from potentials.core.units import ANGSTROM_PER_NM, COULOMB_EV_ANGSTROM, EV_PER_KJMOL, NM_PER_ANGSTROM
from potentials.network import EmbeddedAIMNet2, ModelConfig, count_parameters, field_dipole

CONFIGS = Path(__file__).resolve().parents[2] / "inputs" / "models" / "configs"
F64 = torch.float64


def tiny(**over) -> EmbeddedAIMNet2:
    return EmbeddedAIMNet2(ModelConfig.from_toml(CONFIGS / "tiny.toml", **over), seed=7).double()


def molecule(n: int, seed: int, elements=(1, 1, 6, 7, 8)):
    """A random compact 'molecule' (Å): atoms ~1.1-1.6 Å from an earlier atom, none closer than 0.9 Å."""
    g = torch.Generator().manual_seed(seed)
    pos = [torch.zeros(3, dtype=F64)]
    while len(pos) < n:
        base = pos[int(torch.randint(len(pos), (1,), generator=g))]
        v = torch.randn(3, generator=g, dtype=F64)
        cand = base + v / v.norm() * (1.1 + 0.5 * torch.rand(1, generator=g, dtype=F64))
        if min(float((cand - p).norm()) for p in pos) > 0.9:
            pos.append(cand)
    z = torch.tensor(elements)[torch.randint(len(elements), (n,), generator=g)]
    return z, torch.stack(pos)


def mm_charges(n: int, center, seed: int):
    """MM point charges (Å, e) 4-8 Å around ``center``, net charge 0."""
    g = torch.Generator().manual_seed(seed)
    d = torch.randn(n, 3, generator=g, dtype=F64)
    pos = center + d / d.norm(dim=1, keepdim=True) * (4.0 + 4.0 * torch.rand(n, 1, generator=g, dtype=F64))
    q = 0.8 * torch.randn(n, generator=g, dtype=F64)
    return pos, q - q.mean()


def phi_efield(ml_pos, mm_pos, mm_q):
    """MM potential (V) and field (V/Å) at the ML atoms, through the coupling layer (nm, kJ/mol/e)."""
    phi, ef = potential_and_field(ml_pos * NM_PER_ANGSTROM, mm_pos * NM_PER_ANGSTROM, mm_q)
    return phi * EV_PER_KJMOL, ef * (EV_PER_KJMOL / ANGSTROM_PER_NM)


@pytest.fixture(params=["train", "eval-fast", "eval-allpairs"])
def mode(request, monkeypatch):
    """train: twice-differentiable reference path. eval-fast: every fast path forced on at tiny sizes
    (fused neighbour kernel, cell list, distance-tested neighbour list, chunked analytic Coulomb).
    eval-allpairs: fused kernel on the all-pairs list that small structures use."""
    if request.param == "eval-allpairs":
        monkeypatch.setattr(net, "FAST_MIN_PAIRS", 0)
    if request.param == "eval-fast":
        monkeypatch.setattr(net, "FAST_MIN_PAIRS", 0)
        monkeypatch.setattr(net, "ALL_PAIRS_MAX", 0)
        monkeypatch.setattr(net, "COULOMB_DENSE_MAX", 0)
        monkeypatch.setattr(net, "COULOMB_PAIR_BUDGET", 37)
        monkeypatch.setattr(nbmod, "DENSE_MAX", 4)
    return request.param


def system(charges=(0.0, 1.0), sizes=(9, 7), seed=0):
    """Flat batch of molecules far apart plus MM charges around the first."""
    zs, ps, mol = [], [], []
    for b, n in enumerate(sizes):
        z, p = molecule(n, seed + b)
        zs.append(z)
        ps.append(p + 30.0 * b)
        mol.append(torch.full((n,), b))
    z, pos, mol = torch.cat(zs), torch.cat(ps), torch.cat(mol)
    mm_pos, mm_q = mm_charges(12, pos[: sizes[0]].mean(0), seed + 100)
    return z, pos, mol, torch.tensor(charges, dtype=F64), mm_pos, mm_q


def energy_of(model, z, pos, mol, charge, mm_pos, mm_q):
    phi, ef = phi_efield(pos, mm_pos, mm_q)
    return model(z, pos, mol, charge, phi, ef)


# ----------------------------------------------------------------------------------------------- forces
@pytest.mark.parametrize("charges", [(0.0, 0.0), (1.0, -2.0)])
def test_forces_finite_difference_ml_and_mm(mode, charges):
    model = tiny().train(mode == "train")
    z, pos, mol, q, mm_pos, mm_q = system(charges)

    def total(p, m):
        return energy_of(model, z, p, mol, q, m, mm_q)["energy"].sum()
    assert torch.autograd.gradcheck(total, (pos.clone().requires_grad_(), mm_pos.clone().requires_grad_()),
                                    eps=1e-5, atol=1e-6, rtol=1e-4)


def test_twice_differentiable_in_train_mode():
    """A force loss has the right gradient w.r.t. the weights (training needs create_graph)."""
    model = tiny().train()
    z, pos, mol, q, mm_pos, mm_q = system()
    weight = model.passes[1][0].weight
    direction = torch.randn_like(weight)

    def loss(w):
        with torch.no_grad():
            weight.copy_(w)
        p = pos.clone().requires_grad_()
        f = torch.autograd.grad(energy_of(model, z, p, mol, q, mm_pos, mm_q)["energy"].sum(), p,
                                create_graph=True)[0]
        return f.square().sum()
    w0 = weight.detach().clone()
    analytic = (torch.autograd.grad(loss(w0), weight)[0] * direction).sum()
    h = 1e-5
    numeric = (loss(w0 + h * direction) - loss(w0 - h * direction)) / (2 * h)
    assert float(analytic.detach()) == pytest.approx(float(numeric.detach()), rel=1e-5)


def test_fast_kernels_match_reference_at_scale(monkeypatch):
    """~600 atoms (cell list, fused kernel, chunked Coulomb) in eval mode == the train-mode reference."""
    monkeypatch.setattr(nbmod, "DENSE_MAX", 100)
    model = EmbeddedAIMNet2(ModelConfig.from_toml(CONFIGS / "tiny.toml"), seed=3).double()
    zs, ps = zip(*[molecule(60, s) for s in range(10)])
    pos = torch.cat([p + torch.tensor([4.0 * (s % 3), 4.0 * (s // 3 % 3), 4.0 * (s // 9)], dtype=F64)
                     for s, p in enumerate(ps)])
    z, mol = torch.cat(zs), torch.zeros(len(pos), dtype=torch.long)
    charge = torch.tensor([2.0], dtype=F64)
    phi = torch.linspace(-1, 1, len(pos), dtype=F64)
    ef = torch.sin(torch.arange(3 * len(pos), dtype=F64)).reshape(-1, 3)
    outs = []
    for train in (True, False):
        model.train(train)
        p, f, e = pos.clone().requires_grad_(), phi.clone().requires_grad_(), ef.clone().requires_grad_()
        out = model(z, p, mol, charge, f, e)
        outs.append([out["energy"], out["charges"], *torch.autograd.grad(out["energy"].sum(), [p, f, e])])
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------------------------------ invariances
def _random_rotation(seed):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=F64))
    return q * torch.sign(torch.det(q))


def _forces(model, z, pos, mol, q, mm_pos, mm_q):
    p, m = pos.clone().requires_grad_(), mm_pos.clone().requires_grad_()
    out = energy_of(model, z, p, mol, q, m, mm_q)
    gp, gm = torch.autograd.grad(out["energy"].sum(), [p, m])
    return out["energy"].detach(), out["charges"].detach(), -gp, -gm


def test_rotation_translation_invariance(mode):
    model = tiny().train(mode == "train")
    z, pos, mol, q, mm_pos, mm_q = system((0.0, -1.0))
    e0, c0, f0, fm0 = _forces(model, z, pos, mol, q, mm_pos, mm_q)
    rot, shift = _random_rotation(1), torch.tensor([3.0, -7.0, 11.0], dtype=F64)
    e1, c1, f1, fm1 = _forces(model, z, pos @ rot.T + shift, mol, q, mm_pos @ rot.T + shift, mm_q)
    torch.testing.assert_close(e1, e0, rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(c1, c0, rtol=1e-10, atol=1e-11)
    torch.testing.assert_close(f1, f0 @ rot.T, rtol=1e-9, atol=1e-10)      # forces rotate with the system
    torch.testing.assert_close(fm1, fm0 @ rot.T, rtol=1e-9, atol=1e-10)


def test_permutation_invariance(mode):
    model = tiny().train(mode == "train")
    z, pos, mol, q, mm_pos, mm_q = system()
    e0, c0, f0, fm0 = _forces(model, z, pos, mol, q, mm_pos, mm_q)
    g = torch.Generator().manual_seed(5)
    perm = torch.cat([torch.randperm(9, generator=g), 9 + torch.randperm(7, generator=g)])   # within structures
    mm_perm = torch.randperm(len(mm_q), generator=g)
    e1, c1, f1, fm1 = _forces(model, z[perm], pos[perm], mol, q, mm_pos[mm_perm], mm_q[mm_perm])
    torch.testing.assert_close(e1, e0, rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(c1, c0[perm], rtol=1e-10, atol=1e-11)
    torch.testing.assert_close(f1, f0[perm], rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(fm1, fm0[mm_perm], rtol=1e-9, atol=1e-10)


# -------------------------------------------------------------------------------- charges and the field
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_charges_sum_to_total_charge(mode, dtype):
    model = tiny().to(dtype).train(mode == "train")
    z, pos, mol, _, mm_pos, mm_q = system()
    charge = torch.tensor([-1.0, 2.0], dtype=dtype)
    out = energy_of(model, z, pos.to(dtype), mol, charge, mm_pos, mm_q)
    sums = torch.zeros(2, dtype=F64).index_add_(0, mol, out["charges"].double())
    assert torch.allclose(sums, charge.double(), atol=1e-6, rtol=0)
    assert out["energy"].dtype == F64 and out["charges"].dtype == F64


def test_mm_environment_polarises_charges():
    model = tiny()
    z, pos, mol, q, mm_pos, mm_q = system()
    vac = model(z, pos, mol, q)["charges"]
    emb = energy_of(model, z, pos, mol, q, mm_pos, mm_q)["charges"]
    assert (emb - vac)[:9].abs().max() > 1e-4                    # first molecule sits in the MM charges


def test_gauge_constant_potential_shifts_energy_by_q_times_c(mode):
    model = tiny().train(mode == "train")
    z, pos, mol, q, mm_pos, mm_q = system((1.0, -2.0))
    phi, ef = phi_efield(pos, mm_pos, mm_q)
    c = torch.tensor([0.37, -1.3], dtype=F64)
    e0 = model(z, pos, mol, q, phi, ef)["energy"]
    e1 = model(z, pos, mol, q, phi + c[mol], ef)["energy"]
    torch.testing.assert_close(e1 - e0, q * c, rtol=0, atol=1e-11)


@pytest.mark.parametrize("charges", [(0.0,), (1.0,)])
def test_uniform_field_response_is_minus_mu_dot_e(mode, charges):
    """E(E0) − E(−E0) = −2 μ·E0 + O(E0³), μ = −∂E/∂E0 by autograd; E(E0) + E(−E0) − 2E(0) ∝ E0²."""
    model = tiny().train(mode == "train")
    z, pos = molecule(11, 4)
    mol, q = torch.zeros(11, dtype=torch.long), torch.tensor(charges, dtype=F64)
    mu = field_dipole(model, z, pos, mol, q)[0]
    assert mu.norm() > 1e-3
    direction = torch.tensor([0.3, -0.8, 0.52], dtype=F64)

    @torch.no_grad()
    def energy(h):
        e0 = (h * direction).expand(len(pos), 3)
        return float(model(z, pos, mol, q, -(e0 * pos).sum(-1), e0)["energy"][0])
    odd, even = [], []
    for h in (0.02, 0.01):
        odd.append(energy(h) - energy(-h) + 2 * h * float(mu @ direction))
        even.append(energy(h) + energy(-h) - 2 * energy(0.0))
    assert abs(odd[0]) < 1e-2 * 2 * 0.02 * float(mu.norm())        # the linear term is −μ·E0 ...
    assert odd[0] / odd[1] == pytest.approx(8.0, rel=0.05)          # ... with an O(E0³) remainder
    assert even[0] / even[1] == pytest.approx(4.0, rel=0.02)        # polarisation: second order
    assert abs(even[0]) > 1e-9


def test_polarisation_term_is_minus_half_alpha_e2():
    model = tiny()
    z, pos, mol, q, mm_pos, mm_q = system()
    phi, ef = phi_efield(pos, mm_pos, mm_q)
    out = model(z, pos, mol, q, phi, ef)
    alpha = out["polarisability"]
    assert (alpha > 0).all()
    expect = torch.zeros(2, dtype=F64).index_add_(0, mol, -0.5 * alpha * ef.square().sum(-1))
    torch.testing.assert_close(out["polarisation"], expect)
    parts = out["local"] + out["coulomb"] + out["external"] + out["polarisation"]
    torch.testing.assert_close(out["energy"], parts)
    torch.testing.assert_close(out["external"], torch.zeros(2, dtype=F64).index_add_(0, mol, out["charges"] * phi))


def test_coulomb_against_independent_pair_sum(mode):
    """ML–ML Coulomb = ½ k Σ q_i q_j (1 − f_exp(r))/r with AIMNet2's envelope, checked against scipy pdist."""
    z, pos = molecule(40, 9)
    mol = torch.cat([torch.zeros(25, dtype=torch.long), torch.ones(15, dtype=torch.long)])
    q = torch.randn(40, dtype=F64, generator=torch.Generator().manual_seed(2))
    nb = nbmod.neighbor_matrix(pos, mol, 5.0)
    got = net.coulomb_energy(q, pos, nb, mol, 2, 4.6, first_order=mode != "train")
    expect = []
    for idx in (slice(0, 25), slice(25, 40)):
        r = squareform(pdist(pos[idx].numpy()))
        x2 = (r / 4.6) ** 2
        with torch.no_grad():
            f = torch.where(torch.tensor(x2 < 1), torch.exp(1 - 1 / (1 - torch.tensor(x2).clamp(max=0.999))), 0.0)
        qq = q[idx].numpy()
        m = (1 - f.numpy()) / (r + torch.eye(len(r)).numpy()) * (1 - torch.eye(len(r)).numpy())
        expect.append(0.5 * COULOMB_EV_ANGSTROM * qq @ m @ qq)
    torch.testing.assert_close(got, torch.tensor(expect, dtype=F64), rtol=1e-12, atol=1e-12)
    # the envelope removes the short range: f(0) = 1, f(4.6) = 0, 1 − f(1 Å) ≈ 0.048 (aimnet2.md §1.7)
    f = net._sr_envelope(torch.tensor([0.0, 1.0, 4.6], dtype=F64), 4.6)
    assert float(f[0]) == 1.0 and float(f[2]) == 0.0 and 1 - float(f[1]) == pytest.approx(0.048, abs=1e-3)


# ------------------------------------------------------------------------------------------------ batching
def test_batched_equals_one_by_one(mode):
    model = tiny().train(mode == "train")
    sizes, charges = (9, 1, 14, 5), (0.0, 1.0, -1.0, 2.0)
    z, pos, mol, q, mm_pos, mm_q = system(charges, sizes, seed=11)
    phi, ef = phi_efield(pos, mm_pos, mm_q)

    def run(zz, pp, mm, qq, ff, ee):
        p, f, e = pp.clone().requires_grad_(), ff.clone().requires_grad_(), ee.clone().requires_grad_()
        out = model(zz, p, mm, qq, f, e)
        return [out["energy"], out["charges"], *torch.autograd.grad(out["energy"].sum(), [p, f, e])]
    batched = run(z, pos, mol, q, phi, ef)
    single = [run(z[mol == b], pos[mol == b], torch.zeros(int((mol == b).sum()), dtype=torch.long), q[b:b + 1],
                  phi[mol == b], ef[mol == b]) for b in range(len(sizes))]
    for k, got in enumerate(batched):
        torch.testing.assert_close(got, torch.cat([s[k] for s in single]), rtol=1e-9, atol=1e-10)


# -------------------------------------------------------------------------------- config, dtype, errors
def test_presets_and_config_errors():
    sizes = {name: count_parameters(EmbeddedAIMNet2(ModelConfig.from_toml(CONFIGS / f"{name}.toml")))
             for name in ("tiny", "small", "aimnet2")}
    assert sizes["tiny"] < 2e4 < sizes["small"] < 5e5 and 2.1e6 < sizes["aimnet2"] < 2.3e6
    cfg = ModelConfig.from_toml(CONFIGS / "aimnet2.toml")
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(SetupError, match="unknown key.*'nfeatures'"):
        ModelConfig.from_dict({**cfg.to_dict(), "nfeatures": 3})
    with pytest.raises(SetupError, match="coulomb_cutoff"):
        ModelConfig(elements=[1], coulomb_cutoff=6.0)
    with pytest.raises(SetupError, match="not found"):
        ModelConfig.from_toml(CONFIGS / "nope.toml")


def test_unknown_element_is_a_clear_error():
    model = tiny()
    with pytest.raises(SetupError, match=r"Cl \(Z=17\).*knows H C N O S"):
        model(torch.tensor([1, 17]), torch.tensor([[0.0, 0, 0], [1.3, 0, 0]], dtype=F64),
              torch.zeros(2, dtype=torch.long), torch.zeros(1, dtype=F64))
    with pytest.raises(SetupError, match="mol_idx must be sorted"):
        model(torch.tensor([1, 1]), torch.zeros(2, 3, dtype=F64), torch.tensor([1, 0]), torch.zeros(2, dtype=F64))
    with pytest.raises(SetupError, match=r"positions \[N,3\]"):
        model(torch.tensor([1, 1]), torch.zeros(2, 2, dtype=F64), torch.zeros(2, dtype=torch.long),
              torch.zeros(1, dtype=F64))
    with pytest.raises(CalculationFailed, match="NaN"):
        model(torch.tensor([1, 1]), torch.tensor([[0.0, 0, 0], [float("nan"), 0, 0]], dtype=F64),
              torch.zeros(2, dtype=torch.long), torch.zeros(1, dtype=F64))


def test_dtype_casts_keep_float64_shifts():
    model = tiny()
    with torch.no_grad():
        model.shift.weight.copy_(torch.tensor([-13.6, -1029.7, -1484.1, -2041.8, -10829.2], dtype=F64)
                                 + 1e-9 * torch.arange(5))
    ref = model.shift.weight.detach().clone()
    model.float()
    assert model.embedding.dtype == torch.float32 and model.shift.weight.dtype == F64
    assert torch.equal(model.shift.weight.detach(), ref)
    z, pos, mol, q, _, _ = system()
    out = model(z, pos, mol, q)                                       # float64 inputs into a float32 model
    assert out["energy"].dtype == F64 and math.isfinite(float(out["energy"].detach().sum()))


def test_vacuum_model_ignores_the_environment():
    model = tiny(embedding=False)
    z, pos, mol, q, mm_pos, mm_q = system()
    e_vac = model(z, pos, mol, q)["energy"]
    e_env = energy_of(model, z, pos, mol, q, mm_pos, mm_q)["energy"]
    torch.testing.assert_close(e_vac, e_env, rtol=0, atol=0)


def test_d3_dispersion_term():
    tad_dftd3 = pytest.importorskip("tad_dftd3")
    from potentials.core.units import BOHR_PER_ANGSTROM, EV_PER_HARTREE
    model = tiny(d3=True)
    z, pos, mol, q, mm_pos, mm_q = system()
    out = energy_of(model, z, pos, mol, q, mm_pos, mm_q)
    for b in range(2):
        m = mol == b
        ref = tad_dftd3.dftd3(z[m], pos[m] * BOHR_PER_ANGSTROM,
                              {k: torch.tensor(v, dtype=F64) for k, v in model.config.d3_params.items()})
        assert float(out["dispersion"][b]) == pytest.approx(float(ref.sum()) * EV_PER_HARTREE, rel=1e-10)
        assert float(out["dispersion"][b]) < 0
    p = pos.clone().requires_grad_()
    torch.autograd.gradcheck(lambda x: energy_of(model, z, x, mol, q, mm_pos, mm_q)["energy"].sum(), (p,),
                             eps=1e-5, atol=1e-6, rtol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu():
    model = tiny().eval()
    z, pos, mol, q, mm_pos, mm_q = system()
    phi, ef = phi_efield(pos, mm_pos, mm_q)
    ref = model(z, pos, mol, q, phi, ef)["energy"]
    gpu = model.to("cuda")(z.cuda(), pos.cuda(), mol.cuda(), q.cuda(), phi.cuda(), ef.cuda())["energy"]
    torch.testing.assert_close(gpu.cpu(), ref, rtol=1e-10, atol=1e-10)

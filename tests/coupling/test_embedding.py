"""The embedding definition: whole residues, smooth switch, periodic images, exact gradients."""
import numpy as np
import pytest
import torch

from coupling.embedding import (MMEnvironment, embedded_charges, potential_and_field, select_environment,
                                switch)
from potentials.core.errors import SetupError


def water_box(n_side=6, spacing=0.31, seed=0):
    """A 3-atom 'solute' at the centre of a cubic lattice of rigid-geometry waters (nm)."""
    rng = np.random.default_rng(seed)
    L = n_side * spacing
    grid = (np.stack(np.meshgrid(*[np.arange(n_side)] * 3, indexing="ij"), -1).reshape(-1, 3) + 0.5) * spacing
    grid = grid[np.linalg.norm(grid - L / 2, axis=1) > 0.3]                 # room for the solute
    oh = np.array([[0, 0, 0], [0.0957, 0, 0], [-0.024, 0.0927, 0]])
    waters = []
    for o in grid:
        rot, _ = np.linalg.qr(rng.normal(size=(3, 3)))
        waters.append(o + (oh + rng.normal(0, 0.003, oh.shape)) @ rot.T)
    solute = L / 2 + np.array([[0, 0, 0], [0.11, 0, 0], [-0.03, 0.1, 0.02]])
    pos = np.concatenate([solute] + waters)
    nw = len(waters)
    q = np.concatenate([[0.0, 0.0, 0.0], np.tile([-0.834, 0.417, 0.417], nw)])
    res = np.concatenate([[0, 0, 0], np.repeat(np.arange(1, nw + 1), 3)])
    return pos, q, res, np.eye(3) * L


def ml_energy(env, pos, box, weights):
    sel = select_environment(env, pos, box)
    p = torch.tensor(pos, requires_grad=True)
    q, mm = embedded_charges(env, sel, p)
    phi, field = potential_and_field(p[env.ml_indices], mm, q)
    w = torch.as_tensor(weights)
    e = (w * phi).sum() + 0.01 * (field * field).sum()       # linear in phi + quadratic in E
    grad, = torch.autograd.grad(e, p)
    return float(e.detach()), grad.numpy(), sel, q.detach().numpy()


@pytest.fixture
def system():
    pos, q, res, box = water_box()
    env = MMEnvironment(q, res, np.arange(3), cutoff=0.8, switch_width=0.2)
    return env, pos, box


def test_switch_shape():
    r = torch.linspace(0.0, 1.5, 301, dtype=torch.float64)
    s = switch(r, 1.2, 0.2)
    assert torch.all(s[r < 0.999] == 1) and torch.all(s[r > 1.2] == 0)
    assert torch.all(s[1:] <= s[:-1] + 1e-15)                                 # monotone
    assert float(switch(torch.tensor(1.1, dtype=torch.float64), 1.2, 0.2)) == pytest.approx(0.5)


def test_whole_residues_and_neutral_groups(system):
    env, pos, box = system
    e, g, sel, q = ml_energy(env, pos, box, [0.3, -0.2, -0.1])
    # every embedded water appears with all 3 atoms and one common scale -> each group neutral
    counts = np.bincount(sel.group)
    assert np.all(counts == 3)
    qsum = np.zeros(sel.n_groups)
    np.add.at(qsum, sel.group, q)
    assert np.allclose(qsum, 0, atol=1e-12)
    scales = q[sel.group * 0 + np.arange(len(q))] / env.charges[sel.atoms]
    for gi in range(sel.n_groups):
        s = scales[sel.group == gi]
        assert np.allclose(s, s[0]) and 0 < s[0] <= 1
    assert np.any(scales < 1) and np.any(scales == 1)                  # switch region is populated


def test_gradient_matches_finite_differences(system):
    env, pos, box = system
    w = [0.3, -0.2, -0.1]
    e0, g, sel, q = ml_energy(env, pos, box, w)
    scales = q / env.charges[sel.atoms]
    partial = sel.atoms[(scales > 0.05) & (scales < 0.95)][:6]          # atoms inside the switching shell
    targets = [(0, 0), (1, 2)] + [(int(a), k) for a in partial for k in range(3)]
    assert len(targets) > 5
    h = 1e-6
    for atom, k in targets:
        pp, pm = pos.copy(), pos.copy()
        pp[atom, k] += h
        pm[atom, k] -= h
        fd = (ml_energy(env, pp, box, w)[0] - ml_energy(env, pm, box, w)[0]) / (2 * h)
        assert fd == pytest.approx(g[atom, k], rel=1e-5, abs=1e-6)


def test_periodic_images_and_wrapping_do_not_matter(system):
    env, pos, box = system
    w = [0.3, -0.2, -0.1]
    e0, g0, _, _ = ml_energy(env, pos, box, w)
    rng = np.random.default_rng(1)
    # MM atoms wrapped independently (residues broken across the boundary); the ML zone stays whole
    kicks = rng.integers(-2, 3, size=(len(pos), 1)) * box[0] + rng.integers(-1, 2, size=(len(pos), 1)) * box[2]
    kicks[env.ml_indices] = box[1]
    shifted = pos + kicks
    e1, g1, _, _ = ml_energy(env, shifted, box, w)
    assert e1 == pytest.approx(e0, rel=1e-12)
    assert np.allclose(g1, g0, atol=1e-9)
    e2, _, _, _ = ml_energy(env, pos + np.array([0.37, -1.1, 2.3]), box, w)     # rigid translation
    assert e2 == pytest.approx(e0, rel=1e-10)


def test_energy_continuous_when_water_leaves(system):
    env, pos, box = system
    w = [0.3, -0.2, -0.1]
    centre = pos[:3].mean(0)
    # move one water radially from 0.55 nm to 0.85 nm (through the 0.6-0.8 nm switch) in small steps
    water = 3 + 3 * int(np.argmin(np.abs(np.linalg.norm(pos[3::3] - centre, axis=1) - 0.7)))
    direction = pos[water] - centre
    direction /= np.linalg.norm(direction)
    energies, grads = [], []
    steps = np.linspace(0.55, 0.85, 61)
    for r in steps:
        p = pos.copy()
        p[water:water + 3] += (r - np.linalg.norm(pos[water] - centre)) * direction
        e, g, _, _ = ml_energy(env, p, box, w)
        energies.append(e)
        grads.append(g[water:water + 3].sum(0) @ direction)
    de = np.diff(energies)
    predicted = 0.5 * (np.array(grads[1:]) + np.array(grads[:-1])) * np.diff(steps)
    assert np.allclose(de, predicted, atol=2e-3 * np.max(np.abs(energies)) + 1e-6)   # no jumps


def test_box_too_small_is_refused():
    pos, q, res, box = water_box(n_side=4)
    env = MMEnvironment(q, res, np.arange(3), cutoff=1.2, switch_width=0.2)
    with pytest.raises(SetupError, match="box too small"):
        select_environment(env, pos, box)


def test_nonperiodic_and_empty_zone():
    pos, q, res, _ = water_box()
    env = MMEnvironment(q, res, np.arange(3), cutoff=0.8, switch_width=0.2)
    sel = select_environment(env, pos, None)
    assert sel.n_groups > 0
    with pytest.raises(SetupError, match="empty"):
        MMEnvironment(q, res, np.array([], dtype=int))


def test_fast_potential_and_field_has_the_same_values_and_gradients():
    """The ML client's hand-written backward (chunked: 3 blocks here) against autograd through the plain sums."""
    import coupling.embedding as emb

    rng = np.random.default_rng(5)
    r = torch.tensor(rng.normal(0, 0.4, (9, 3)))
    x = torch.tensor(rng.normal(0, 1.2, (300, 3)) + 0.05)
    q = torch.tensor(rng.normal(0, 0.5, 300))
    gp, ge = torch.tensor(rng.normal(size=9)), torch.tensor(rng.normal(size=(9, 3)))
    out = {}
    for name, fn, pairs in (("plain", potential_and_field, emb.PAIRS_PER_CHUNK),
                            ("fast", emb.potential_and_field_fast, 1000),               # 3 ML atoms per block
                            ("one block", emb.potential_and_field_fast, emb.PAIRS_PER_CHUNK)):
        leaves = [t.clone().requires_grad_(True) for t in (r, x, q)]
        old, emb.PAIRS_PER_CHUNK = emb.PAIRS_PER_CHUNK, pairs
        try:
            phi, field = fn(*leaves)
        finally:
            emb.PAIRS_PER_CHUNK = old
        loss = (phi * gp).sum() + (field * ge).sum()
        out[name] = [phi.detach(), field.detach(), *torch.autograd.grad(loss, leaves, create_graph=name == "plain")]
    for a, b, c in zip(out["plain"], out["fast"], out["one block"]):
        assert torch.allclose(a.detach(), b, rtol=1e-12, atol=1e-12 * float(a.abs().max()))
        assert torch.allclose(a.detach(), c, rtol=1e-12, atol=1e-12 * float(a.abs().max()))
    leaves = [t.clone().requires_grad_(True) for t in (r, x, q)]
    g = torch.autograd.grad(emb.potential_and_field_fast(*leaves)[0].sum(), leaves[0], create_graph=True)[0]
    with pytest.raises(RuntimeError):                   # forces of forces (training) must use the plain sums
        torch.autograd.grad(g.sum(), leaves[1])


def test_fused_cpu_kernels_match_the_torch_embedding(system):
    """The ML client's EmbeddingField (compiled: scales + phi/E forward, and the chain rule back to positions,
    each one pass; or the torch operations it runs on CUDA) against autograd through the plain torch sums, on
    a frame with residues broken across the box and several of them in the switching shell."""
    from coupling.embedding import EmbeddingField, embedded_charges_at

    env, pos, box = system
    rng = np.random.default_rng(2)
    wrapped = pos + rng.integers(-1, 2, size=(len(pos), 3)) @ box
    sel = select_environment(env, wrapped, box, skin=0.05)
    ml = torch.tensor(wrapped[env.ml_indices], requires_grad=True)
    mm = torch.tensor(wrapped[sel.atoms], requires_grad=True)
    q, x = embedded_charges_at(env, sel, ml, mm)
    scales = q.detach() / torch.tensor(env.charges[sel.atoms])
    assert ((scales > 0.05) & (scales < 0.95)).sum() >= 6 and (scales == 0).any()   # shell and skin populated
    phi, field = potential_and_field(ml + torch.tensor(sel.ml_shift), x, q)
    gp, ge = torch.tensor(rng.normal(size=3)), torch.tensor(rng.normal(size=(3, 3)))
    ref = [phi.detach(), field.detach(), *torch.autograd.grad((phi * gp).sum() + (field * ge).sum(), (ml, mm))]
    for kernels in (None, False):                           # numba on CPU; the torch operations (as on CUDA)
        emb = EmbeddingField(env, sel, wrapped[env.ml_indices], wrapped[sel.atoms], kernels=kernels)
        got = [emb.phi, emb.field, *map(torch.from_numpy, emb.backward(gp, ge))]
        for a, b in zip(got, ref):
            assert torch.allclose(a, b, rtol=1e-11, atol=1e-11 * float(b.abs().max()))


def test_selection_matches_a_brute_force_search(system):
    """Every residue whose centre (whole, nearest image) lies within cutoff + skin of an ML atom is selected,
    whole and at that image; nothing else is."""
    env, pos, box = system
    rng = np.random.default_rng(4)
    wrapped = pos + rng.integers(-1, 2, size=(len(pos), 3)) @ box
    sel = select_environment(env, wrapped, box, skin=0.1)
    skin = sel.skin                                          # cut to what this small box allows
    assert 0.03 < skin < 0.1
    ml = wrapped[env.ml_indices] + sel.ml_shift
    expected = {}
    for res in np.unique(env.residue[3:]):
        atoms = np.flatnonzero(env.residue == res)
        x = wrapped[atoms]
        x = x - box[0, 0] * np.round((x - x[0]) / box[0, 0])                    # cubic box: whole
        c = x.mean(0)
        d = ml - c
        d_img = d - box[0, 0] * np.round(d / box[0, 0])
        if np.linalg.norm(d_img, axis=1).min() < env.cutoff + skin:
            expected[int(res)] = x + (d - d_img)[0]           # the image next to the zone
    got = {int(env.residue[a]) for a in sel.atoms}
    assert got == set(expected) and len(got) > 20
    placed = wrapped[sel.atoms] + sel.shift
    for res, x in expected.items():
        assert np.allclose(placed[env.residue[sel.atoms] == res], x, atol=1e-12)


def test_displacement_check_is_exact_and_sees_nan():
    from coupling.embedding_kernels import max_sq_displacement

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(1001, 3)), rng.normal(size=(1001, 3))
    assert max_sq_displacement(a, b) == pytest.approx(((a - b) ** 2).sum(1).max(), rel=1e-14)
    a[517, 1] = np.nan
    assert np.isnan(max_sq_displacement(a, b))
    a[517, 1] = np.inf
    assert np.isnan(max_sq_displacement(a, b))


@pytest.mark.parametrize("box", [np.eye(3) * 6.2, np.array([[6.2, 0, 0], [2.0, 5.8, 0], [-1.5, 1.8, 5.5]])])
@pytest.mark.parametrize("n, radius", [(30, 0.5), (501, 2.0)])
def test_zone_is_made_whole_even_when_wider_than_half_the_box(box, n, radius):
    """ML atoms wrapped independently into other cells come back as one piece: small zones by the nearest
    image of the first atom, a 4 nm wide zone in a 6 nm box (wider than half of it) along its spanning tree."""
    from coupling.embedding import zone_shift

    rng = np.random.default_rng(n)
    ball = rng.uniform(-1, 1, size=(20 * n, 3))
    x = ball[np.linalg.norm(ball, axis=1) < 1][:n] * radius + np.array([5.5, 0.3, 3.0])
    x = x[np.argsort(-x[:, 0])]                                  # the first atom on the zone's edge
    wrapped = x + rng.integers(-2, 3, size=(n, 3)) @ box
    whole = wrapped + zone_shift(wrapped, box)
    assert np.allclose(whole - whole[0], x - x[0], atol=1e-10)
    assert np.allclose(zone_shift(x, None), 0)


def test_kernels_compile_without_a_cache_location(caplog):
    """A function numba cannot cache (here: no source file, as for a read-only install without a home) is
    compiled per process instead of failing at import."""
    from coupling.embedding_kernels import _compiled

    namespace = {}
    exec("def twice(x):\n    return 2.0 * x\n", namespace)
    fn = _compiled()(namespace["twice"])
    assert fn(1.5) == 3.0 and "cannot cache" in caplog.text

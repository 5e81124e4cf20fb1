"""The electrostatic embedding of the ML zone: which MM charges it sees, where, and with which scale.

This module is the single definition of the environment. The ML client and the QM/MM reference-data
generator both call :func:`select_environment` + :func:`embedded_charges`, so training data and simulation
see exactly the same point charges.

Scheme (standard residue-based QM/MM cutoff, made smooth):

* MM atoms are grouped by residue (water molecule, amino acid, ion); a residue is embedded whole or not at
  all, so every embedded group carries its (near-)integer charge.
* A residue's distance to ML atom ``i`` is measured from the residue's geometric centre, ``r_im``.
* ``S(r)`` is a quintic switch, 1 below ``cutoff - width``, 0 above ``cutoff`` (C2-continuous).
* The residue's scale is ``s_m = 1 - prod_i (1 - S(r_im))``: 1 as soon as any ML atom is inside the inner
  radius, 0 when all are beyond the cutoff, smooth in between. All its charges are multiplied by ``s_m``.
* Periodic boxes: each residue is made whole and placed at its minimum image relative to the ML-zone
  centroid. This image is the right one for every ML atom as long as ``cutoff + zone radius`` is below half
  the shortest box width, which is checked.

Units are internal (nm, e, kJ/mol). Selection (discrete) is numpy without gradients; the scales and the
imaged positions are torch and differentiable, so forces on MM atoms come out of autograd (training, tests).
The ML client instead uses :class:`EmbeddingField`: the same sums with the chain rule written out, run by the
compiled kernels of :mod:`coupling.embedding_kernels` on CPU.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.spatial import cKDTree

from coupling import embedding_kernels
from coupling.environment import MMEnvironment  # noqa: F401  (re-exported: its home before it moved)
from potentials.core.errors import SetupError
from potentials.core.spec import CouplingSpec
from potentials.core.units import COULOMB_KJMOL_NM
from potentials.electrostatics import potential_and_field  # noqa: F401  (the one definition, re-exported)


@dataclass
class Selection:
    """The discrete part of one frame's embedding (no gradients; valid for that frame's geometry).

    atoms: (M,) indices of embedded MM atoms; group: (M,) local group id (0..G-1) of each;
    shift: (M,3) nm, constant offset (whole-residue + periodic image) added to those atoms' positions;
    pair_ml, pair_group: ML-atom (0..n_ml-1) / local group pairs whose centre distance is below the cutoff
    (+ skin), except those of ``inner`` groups.
    ml_shift: (n_ml,3) nm, constant offset that makes the ML zone whole in a periodic box (zeros otherwise);
    the network, the embedding and the virial all use ``positions[ml_indices] + ml_shift``.
    skin: nm beyond the cutoff that the pair search covered (pairs out there have switch 0).
    inner: (G,) bool, groups closer than ``cutoff - switch_width - skin`` to an ML atom: scale 1 for the whole
    life of the selection; their pairs are left out of ``pair_ml``/``pair_group``.
    """

    atoms: np.ndarray
    group: np.ndarray
    shift: np.ndarray
    pair_ml: np.ndarray
    pair_group: np.ndarray
    n_groups: int
    ml_shift: np.ndarray | None = None
    skin: float = 0.0
    inner: np.ndarray | None = None
    kernel_arrays: tuple | None = field(default=None, repr=False, compare=False)   # built on first fused use


def _min_image(d: np.ndarray, box: np.ndarray) -> np.ndarray:
    """Minimum-image displacement for (triclinic) box vectors as rows."""
    frac = d @ np.linalg.inv(box)
    return (frac - np.round(frac)) @ box


def _half_min_width(box: np.ndarray) -> float:
    vol = abs(np.linalg.det(box))
    a, b, c = box
    return 0.5 * min(vol / np.linalg.norm(np.cross(b, c)), vol / np.linalg.norm(np.cross(c, a)),
                     vol / np.linalg.norm(np.cross(a, b)))


def zone_shift(ml_positions: np.ndarray, box: np.ndarray | None) -> np.ndarray:
    """Offsets (n_ml,3) nm that make the ML zone whole (zeros without a box), for any zone that is one cluster
    without gaps of half the shortest box width ``2h``.

    Each ML atom goes to the image nearest the first ML atom. If they all end up within ``h/2`` of it, that
    is right: a zone reaching farther would, being connected, have atoms between ``h/2`` and ``h``, whose
    nearest image is their true place. Otherwise (a 500-atom active site in a 6 nm box) the zone is made
    whole along the minimum spanning tree of its periodic nearest-neighbour graph.
    """
    ml_positions = np.asarray(ml_positions, dtype=np.float64)
    if box is None:
        return np.zeros_like(ml_positions)
    box = np.asarray(box, dtype=np.float64)
    d = ml_positions - ml_positions[0]
    near = _min_image(d, box)
    if np.einsum("ij,ij->i", near, near).max() < (0.5 * _half_min_width(box)) ** 2:
        return near - d
    return _tree_unwrap(ml_positions, box) - ml_positions


def _tree_unwrap(x: np.ndarray, box: np.ndarray) -> np.ndarray:
    """x (n,3) made whole: each atom at the image nearest its parent in the minimum spanning tree of the
    periodic 8-nearest-neighbour graph (all pairs if that graph falls apart), rooted at atom 0."""
    from itertools import product

    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import breadth_first_order, minimum_spanning_tree

    n = len(x)
    images = (x[None] + (np.array(list(product((-1, 0, 1), repeat=3))) @ box)[:, None]).reshape(-1, 3)
    for k in (min(n - 1, 8), n - 1):
        dist, j = cKDTree(images).query(x, k=k + 1)         # the first hit is the atom itself
        rows = np.repeat(np.arange(n), k)
        graph = coo_matrix((dist[:, 1:].ravel() + 1e-12, (rows, j[:, 1:].ravel() % n)), shape=(n, n))
        tree = minimum_spanning_tree(graph.tocsr())
        if tree.nnz == n - 1:
            break
    order, parent = breadth_first_order(tree, 0, directed=False)
    # displacement from each atom's parent, then summed up the tree by pointer jumping (log2(depth) passes)
    acc = np.zeros_like(x)
    anc = parent.copy()
    anc[0] = 0
    acc[order[1:]] = _min_image(x[order[1:]] - x[parent[order[1:]]], box)
    while np.any(anc != 0):
        acc += acc[anc]
        anc = anc[anc]
    return x[0] + acc


def select_environment(env: MMEnvironment, positions: np.ndarray, box: np.ndarray | None,
                       skin: float = 0.0) -> Selection:
    """Choose the embedded MM residues for one frame. positions (n_atoms,3) nm; box rows nm or None.

    ``skin`` (nm) widens the search to ``cutoff + skin``: the extra residues get scale 0 from the switch (so the
    energy is unchanged) and the selection stays complete while no atom moves more than ``skin / 2`` (a Verlet
    list, see :class:`NeighbourList`). In a box the skin is cut to what the minimum-image check allows
    (``Selection.skin`` says what was used).
    """
    positions = np.asarray(positions, dtype=np.float64)
    if not np.all(np.isfinite(positions)):
        raise SetupError("positions contain NaN or inf")
    ml_shift = zone_shift(positions[env.ml_indices], box)
    ml = positions[env.ml_indices] + ml_shift
    centroid = ml.mean(axis=0)
    radius = float(np.max(np.linalg.norm(ml - centroid, axis=1)))
    periodic = box is not None
    box = np.eye(3) if box is None else np.asarray(box, dtype=np.float64)
    inv_box, half = np.linalg.inv(box), _half_min_width(box) if periodic else np.inf
    if periodic:
        # the image chosen now must stay the nearest one for every residue the list may hold
        skin = min(skin, max(0.0, 0.999 * (half - env.cutoff - radius)))
        if env.cutoff + radius >= half:
            raise SetupError(
                f"box too small for the embedding: cutoff {env.cutoff:.3f} nm + ML-zone radius {radius:.3f} nm "
                f">= half the shortest box width {half:.3f} nm; enlarge the box (more solvent padding in "
                "`mlmm prepare --solvate`): the cutoff is part of how the model was trained")
    # every residue made whole and put at its image nearest the zone's centroid (one compiled pass over the
    # atoms); only residues whose centre is within cutoff + skin of the zone go on to the pair search
    start = env._group_start
    centres, image, dist2 = embedding_kernels.residue_centres(positions, env._mm_atoms, start, box, inv_box,
                                                              half, centroid, periodic)
    near = np.flatnonzero(dist2 < (env.cutoff + skin + radius) ** 2)
    pairs = cKDTree(ml).sparse_distance_matrix(cKDTree(centres[near]), env.cutoff + skin,
                                               output_type="coo_matrix")
    used = np.unique(pairs.col)                            # indices into near, sorted like the global groups
    groups = near[used]
    col = np.searchsorted(used, pairs.col)                 # local group of each pair
    counts = np.diff(start)[groups]
    first = np.repeat(start[groups], counts)
    atoms = env._mm_atoms[first + np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)]
    group = np.repeat(np.arange(len(groups)), counts)
    shift = image[groups][group]
    if periodic:
        shift = shift + embedding_kernels.whole_shifts(positions, atoms, env._mm_atoms[first], box, inv_box, half)
    # residues this deep inside stay at switch 1 while nothing moves more than skin/2: scale 1, no pairs needed
    # (for big ML zones most pairs are of such residues)
    inner = np.zeros(len(groups), bool)
    inner[col[pairs.data < env.cutoff - env.switch_width - skin]] = True
    shell = ~inner[col]
    return Selection(atoms=atoms, group=group, shift=shift, pair_ml=pairs.row[shell].astype(np.int64),
                     pair_group=col[shell].astype(np.int64), n_groups=len(groups), ml_shift=ml_shift,
                     skin=float(skin), inner=inner)


class NeighbourList:
    """A :class:`Selection` reused while it stays complete (Verlet list): rebuilt with :func:`select_environment`
    only when an atom has moved more than half the skin since the last build, or the box changed.

    The check is one vectorised pass over the positions; the KD-tree search, residue imaging and grouping are
    paid only on rebuilds (every few tens of MD steps with the default 0.1 nm skin).
    """

    def __init__(self, env: MMEnvironment, skin: float = 0.1):
        if skin < 0:
            raise SetupError(f"neighbour-list skin {skin} nm must be >= 0")
        self.env, self.skin = env, float(skin)
        self.sel: Selection | None = None
        self.builds = 0
        self._ref = self._box = None

    def get(self, positions: np.ndarray, box: np.ndarray | None) -> Selection:
        """The selection for ``positions`` (n_atoms,3) nm and ``box`` (rows, nm, or None)."""
        if self.sel is None or not self._valid(positions, box):
            self.sel = select_environment(self.env, positions, box, self.skin)
            self._ref = np.array(positions, dtype=np.float64)
            self._box = None if box is None else np.array(box, dtype=np.float64)
            self.builds += 1
        return self.sel

    def _valid(self, positions: np.ndarray, box: np.ndarray | None) -> bool:
        if self.sel.skin <= 0 or (box is None) != (self._box is None) or positions.shape != self._ref.shape:
            return False
        if box is not None and not np.array_equal(box, self._box):
            return False
        moved = embedding_kernels.max_sq_displacement(np.asarray(positions, dtype=np.float64), self._ref)
        return moved < (0.5 * self.sel.skin) ** 2                                 # False for NaN: rebuild


def switch(r: torch.Tensor, cutoff: float, width: float) -> torch.Tensor:
    """Quintic switch: 1 for r <= cutoff-width, 0 for r >= cutoff, C2 in between."""
    if width <= 0:
        return (r < cutoff).to(r.dtype)
    t = ((r - (cutoff - width)) / width).clamp(0.0, 1.0)
    u = 1.0 - t                       # (1-t)^3 (1+3t+6t^2) == 1 - 10t^3 + 15t^4 - 6t^5, exact at both ends
    return u * u * u * (1.0 + 3.0 * t + 6.0 * t * t)


def embedded_charges(env: MMEnvironment, sel: Selection, positions: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled charges (M,) in e and imaged positions (M,3) in nm of the embedded MM atoms.

    ``positions`` is the full-system (n_atoms,3) nm tensor; gradients flow to it through both outputs.
    """
    dev = positions.device
    return embedded_charges_at(env, sel, positions[torch.as_tensor(env.ml_indices, device=dev)],
                               positions[torch.as_tensor(sel.atoms, device=dev)])


def embedded_charges_at(env: MMEnvironment, sel: Selection, ml_positions: torch.Tensor,
                        mm_positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`embedded_charges` from the raw positions (nm) of the ML atoms (n_ml,3) and of the selected MM
    atoms ``sel.atoms`` (M,3) only: callers that differentiate w.r.t. these small tensors avoid dense
    (n_atoms,3) gradients (the ML engine does, for 1e5-atom systems)."""
    dev, dt = mm_positions.device, mm_positions.dtype
    group = torch.as_tensor(sel.group, device=dev)
    mm_pos = mm_positions + torch.as_tensor(sel.shift, device=dev, dtype=dt)
    counts = torch.bincount(group, minlength=sel.n_groups).to(dt)
    centers = torch.zeros(sel.n_groups, 3, device=dev, dtype=dt).index_add_(0, group, mm_pos) / counts[:, None]
    ml_pos = ml_positions
    if sel.ml_shift is not None:
        ml_pos = ml_pos + torch.as_tensor(sel.ml_shift, device=dev, dtype=dt)
    pml = torch.as_tensor(sel.pair_ml, device=dev)
    pgr = torch.as_tensor(sel.pair_group, device=dev)
    # index_select, not [idx]: its backward is a fast index_add (advanced indexing's is a slow index_put)
    r = (ml_pos.index_select(0, pml) - centers.index_select(0, pgr)).norm(dim=-1)
    s_pair = switch(r, env.cutoff, env.switch_width)
    inside = torch.zeros(sel.n_groups, dtype=torch.bool, device=dev) if sel.inner is None else \
        torch.as_tensor(sel.inner, device=dev).clone()
    inside.index_fill_(0, pgr[s_pair >= 1.0], True)
    # log prod (1 - S) over pairs; pairs with S == 1 would give log(0): their group is fully inside anyway
    log_out = torch.log1p(-torch.where(s_pair < 1.0, s_pair, torch.zeros_like(s_pair)))
    log_prod = torch.zeros(sel.n_groups, device=dev, dtype=dt).index_add_(0, pgr, log_out)
    scale = torch.where(inside, torch.ones_like(log_prod), -torch.expm1(log_prod))
    q = torch.as_tensor(env.charges[sel.atoms], device=dev, dtype=dt) * scale.index_select(0, group)
    return q, mm_pos


# (ML atom, MM atom) pairs per block of the fast kernel: its arrays stay in cache (2x faster than 1 << 20 at
# 1000 x 6400 pairs on the build machine)
PAIRS_PER_CHUNK = 1 << 16


class _PotentialField(torch.autograd.Function):
    """phi and E with a hand-written, chunked backward: nothing of size (n_ml, M) is kept between the passes,
    the pair arrays are 2-D per Cartesian component (contiguous, sums as matrix-vector products), and the
    backward is a handful of dense products instead of autograd's replay of every elementwise op.
    First derivatives only (forces); training, which needs forces of forces, uses :func:`potential_and_field`."""

    @staticmethod
    def _pairs(r, x):
        d = [r[:, k, None] - x[None, :, k] for k in range(3)]                     # 3 x [n, M]
        inv_r = torch.rsqrt(d[0] * d[0] + d[1] * d[1] + d[2] * d[2])
        return d, inv_r, inv_r * inv_r * inv_r

    @staticmethod
    def forward(ctx, ml_pos, mm_pos, mm_q, chunk):
        ctx.save_for_backward(ml_pos, mm_pos, mm_q)
        ctx.chunk, ctx.pairs = chunk, None
        phi, field = torch.empty_like(ml_pos[:, 0]), torch.empty_like(ml_pos)
        for s in range(0, len(ml_pos), chunk):
            d, inv_r, inv_r3 = _PotentialField._pairs(ml_pos[s:s + chunk], mm_pos)
            if chunk >= len(ml_pos):                 # one block: keep it for the backward (small zones)
                ctx.pairs = (d, inv_r, inv_r3)
            phi[s:s + chunk] = inv_r @ mm_q
            for k in range(3):
                field[s:s + chunk, k] = (inv_r3 * d[k]) @ mm_q
        return COULOMB_KJMOL_NM * phi, COULOMB_KJMOL_NM * field

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_phi, g_field):
        r, x, q = ctx.saved_tensors
        g_phi = torch.zeros_like(r[:, 0]) if g_phi is None else g_phi
        g_field = torch.zeros_like(r) if g_field is None else g_field
        g_r, g_x, g_q = torch.zeros_like(r), torch.zeros_like(x), torch.zeros_like(q)
        for s in range(0, len(r), ctx.chunk):
            d, inv_r, inv_r3 = ctx.pairs or _PotentialField._pairs(r[s:s + ctx.chunk], x)
            ge, gp = g_field[s:s + ctx.chunk], g_phi[s:s + ctx.chunk]
            dg = d[0] * ge[:, 0, None] + d[1] * ge[:, 1, None] + d[2] * ge[:, 2, None]     # d_ij . gE_i
            # per pair, d(gp phi + gE.E)/dr_i = k q_j [a_ij gE_i + b_ij d_ij]  (and minus that for x_j)
            a = q[None, :] * inv_r3
            b = a * (-3.0 * dg * inv_r * inv_r - gp[:, None])
            a_sum = a.sum(1)
            for k in range(3):
                bd = b * d[k]
                g_r[s:s + ctx.chunk, k] = a_sum * ge[:, k] + bd.sum(1)
                g_x[:, k] -= ge[:, k] @ a + bd.sum(0)
            g_q += gp @ inv_r + (dg * inv_r3).sum(0)
        return COULOMB_KJMOL_NM * g_r, COULOMB_KJMOL_NM * g_x, COULOMB_KJMOL_NM * g_q, None


def potential_and_field_fast(ml_pos: torch.Tensor, mm_pos: torch.Tensor, mm_q: torch.Tensor
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`potential_and_field` for force evaluation (the ML client): same values, first derivatives by a
    hand-written backward (about 5x faster at 500 x 6000 pairs, O(chunk) memory); not twice differentiable."""
    chunk = max(1, PAIRS_PER_CHUNK // max(len(mm_pos), 1))
    return _PotentialField.apply(ml_pos, mm_pos, mm_q, chunk)


class EmbeddingField:
    """phi (n_ml,) and E (n_ml,3) of the embedded MM charges at the ML atoms for one frame, and the way back from
    d(energy)/d(phi, E) to forces: :func:`embedded_charges_at` + :func:`potential_and_field` with the chain rule
    applied here rather than by autograd (the ML client's force path; first derivatives only).

    ml_positions (n_ml,3), mm_positions (M,3): raw positions (nm) of the ML atoms and of ``sel.atoms``.
    phi is in kJ/mol/e and E in kJ/mol/e/nm (internal units; the model adapter converts them).
    kernels: None (default) runs the fused numba kernels (:mod:`coupling.embedding_kernels`) for both passes on
    CPU and the torch operations (with the hand-written phi/E backward) on other devices; False forces the
    torch operations (tests compare the two).
    """

    def __init__(self, env: MMEnvironment, sel: Selection, ml_positions: np.ndarray, mm_positions: np.ndarray,
                 device: str | torch.device = "cpu",
                 kernels: bool | None = None):
        self.device = torch.device(device)
        self._kernels = self.device.type == "cpu" if kernels is None else bool(kernels)
        if self._kernels and self.device.type != "cpu":
            raise SetupError(f"the compiled embedding kernels run on CPU only, not on {self.device}")
        self._k = (COULOMB_KJMOL_NM, COULOMB_KJMOL_NM)
        ml_positions = np.ascontiguousarray(ml_positions, dtype=np.float64)
        mm_positions = np.ascontiguousarray(mm_positions, dtype=np.float64)
        self._n_mm = len(mm_positions)
        if self._kernels:
            self._arrays = sel.kernel_arrays or _kernel_arrays(env, sel)
            sel.kernel_arrays = self._arrays
            phi, field, *self._stash = embedding_kernels.forward(ml_positions, mm_positions, *self._arrays,
                                                                 *self._k)
            self.phi, self.field = torch.from_numpy(phi), torch.from_numpy(field)
            return
        with torch.enable_grad():
            ml = torch.tensor(ml_positions, device=self.device, requires_grad=True)
            mm = torch.tensor(mm_positions, device=self.device, requires_grad=True)
            q, x = embedded_charges_at(env, sel, ml, mm)
            r = ml if sel.ml_shift is None else ml + torch.as_tensor(sel.ml_shift, device=self.device)
            phi, field = potential_and_field_fast(r, x, q)
        self._charges = q.detach().to(torch.float64).cpu().numpy()
        self._graph = (ml, mm, phi, field)
        self.phi, self.field = self._graph[2].detach(), self._graph[3].detach()

    @property
    def charges(self) -> np.ndarray:
        """The embedded (switch-scaled) charge (e) of each MM atom of the selection, in its order."""
        if self._kernels:
            q = np.zeros(self._n_mm)
            q[self._stash[3]] = self._stash[2]
            return q
        return self._charges

    def backward(self, g_phi: torch.Tensor, g_field: torch.Tensor, retain: bool = False
                 ) -> tuple[np.ndarray, np.ndarray]:
        """Gradients (numpy, float64) of ``sum(g_phi * phi) + sum(g_field * E)`` w.r.t. the ML positions (n_ml,3)
        and the MM positions (M,3), through the charges' smooth scales as well. ``retain``: keep the torch
        path's graph for another call (a committee's per-member forces)."""
        if self._kernels:
            r, xt, q, keep, c, prod = self._stash
            _, shift, q0, group, counts, pair_ml, pair_group, inner, cutoff, width = self._arrays
            g_phi = self._k[0] * g_phi.detach().to(torch.float64).numpy()
            g_field = self._k[1] * g_field.detach().to(torch.float64).numpy()
            return embedding_kernels.backward(r, xt, q, keep, len(shift), q0, group, counts, c, prod, pair_ml,
                                              pair_group, inner, cutoff, width, g_phi, g_field)
        ml, mm, phi, field = self._graph
        g_ml, g_mm = torch.autograd.grad([phi, field], [ml, mm], [g_phi.to(phi.dtype), g_field.to(field.dtype)],
                                         retain_graph=retain)
        return g_ml.cpu().numpy(), g_mm.cpu().numpy()


def _kernel_arrays(env: MMEnvironment, sel: Selection) -> tuple:
    """The selection as the compiled kernels take it (built once per neighbour-list build)."""
    ml_shift = np.zeros((len(env.ml_indices), 3)) if sel.ml_shift is None else sel.ml_shift
    inner = np.zeros(sel.n_groups, bool) if sel.inner is None else sel.inner
    f64 = lambda a: np.ascontiguousarray(a, dtype=np.float64)              # noqa: E731
    i64 = lambda a: np.ascontiguousarray(a, dtype=np.int64)                # noqa: E731
    return (f64(ml_shift), f64(sel.shift), f64(env.charges[sel.atoms]), i64(sel.group),
            f64(np.bincount(sel.group, minlength=sel.n_groups)), i64(sel.pair_ml), i64(sel.pair_group),
            np.ascontiguousarray(inner, dtype=np.bool_), float(env.cutoff), float(env.switch_width))

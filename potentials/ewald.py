"""Coulomb energy of a small zone of variable point charges (an ML zone's predicted charges) with a large set of
fixed ones (the MM atoms) and with the zone's own periodic images: smooth particle-mesh Ewald (SPME, Essmann et
al., J. Chem. Phys. 103, 8577 (1995)), or plain Coulomb for a cluster.

For zone charges q_i at r_i and fixed charges Q_j at x_j in a periodic box with a neutralising background,
:func:`zone_ewald` returns (k = Coulomb constant, psi = the Ewald kernel of 1/r with the background)

    E = k [ sum_ij q_i Q_j psi(r_i - x_j) + 1/2 sum_{i != i'} q_i q_i' (psi(r_ii') - 1/r_ii')
          + 1/2 sum_i q_i^2 psi_self ]

that is E_Ewald(zone + fixed) - E_Ewald(fixed) - (the zone's own in-box pairs, 1/r): what the zone adds to the
Ewald energy of the fixed charges, less the pairs inside the zone. Both Ewald energies include the neutralising
background of their net charge (-k pi Q^2 / (2 V alpha^2), as OpenMM's PME does), so the result does not
depend on alpha or on where anything sits in the box. It comes with exact first derivatives w.r.t. q, r and x
and the virial -dE/d(strain) at fixed charges.

Split: real space (``erfc(alpha d)/d`` over the zone's pairs with the fixed charges within the cutoff, switched
to zero over its last ``REAL_SPACE_SWITCH`` so that forces stay continuous; ``-erf(alpha d)/d`` over the zone's
own pairs), reciprocal space (B-splines of order p on a mesh; one pass over the fixed charges both spreads them
and interpolates the zone's mesh potential for their forces), self and background terms. The kernels are
compiled numba loops (:mod:`potentials.ewald_kernels`), the FFTs scipy's. Units: nm and e in, kJ/mol out.

Why not torch-pme: its mesh operations (``index_put_`` scatter, per-call influence function) took 0.16 s to
spread 23.5 k charges on this project's 2-core CPU, 10-50x what a step can afford; the sums here only involve
the zone's pairs and one compiled pass over the fixed charges.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import scipy.fft
import torch
from scipy.spatial import cKDTree

from potentials import ewald_kernels as kern
from potentials.core.errors import SetupError
from potentials.core.units import COULOMB_KJMOL_NM

DEFAULT_TOLERANCE = 5e-4       # erfc(alpha r) ~ 2 tolerance where the switch starts (OpenMM's convention at its cutoff)
REAL_SPACE_SWITCH = 0.1        # nm: the real-space sum is switched off over the cutoff's last 0.1 nm (C2)
ORDER = 4                      # cubic B-splines: C2 charge assignment, forces continuous
# relative force error of the mesh ~ C_p (alpha h)^p for B-splines of order p (measured against a converged sum):
# the mesh spacing h is chosen to make it the tolerance
MESH_ERROR = {4: 0.07, 6: 0.02, 8: 0.01}


def fft_size(n: int) -> int:
    """The smallest integer >= n whose only prime factors are 2, 3 and 5 (fast FFT sizes)."""
    m = max(int(n), 1)
    while True:
        k = m
        for p in (2, 3, 5):
            while k % p == 0:
                k //= p
        if k == 1:
            return m
        m += 1


def check_reduced_box(box: np.ndarray) -> np.ndarray:
    """``box`` (rows a, b, c; nm) as float64, refused unless in OpenMM's reduced form (a along x, b in the xy
    plane, each vector's off-diagonal components at most half the diagonal one before it)."""
    box = np.asarray(box, dtype=np.float64)
    a, b, c = box
    ok = (box.shape == (3, 3) and abs(a[1]) + abs(a[2]) + abs(b[2]) <= 1e-9 * a[0] and min(a[0], b[1], c[2]) > 0
          and abs(b[0]) <= 0.5 * a[0] + 1e-9 and abs(c[0]) <= 0.5 * a[0] + 1e-9 and abs(c[1]) <= 0.5 * b[1] + 1e-9)
    if not ok:
        raise SetupError(f"periodic box {box.tolist()} is not in reduced triclinic form (a along x, b in the xy "
                         "plane, off-diagonals at most half the diagonal); i-PI and OpenMM boxes are")
    return box


def lower_triangular_rotation(box: np.ndarray) -> np.ndarray | None:
    """None if ``box`` (rows) already has a along x and b in the xy plane; else the orthogonal matrix R with
    ``box @ R.T`` of that form (positive diagonal): positions go r @ R.T, gradients back as g @ R."""
    if box[0, 1] == 0.0 and box[0, 2] == 0.0 and box[1, 2] == 0.0:
        return None
    qm, rm = np.linalg.qr(box.T)                               # box = rm.T @ qm.T, rm.T lower triangular
    sign = np.where(np.diag(rm) < 0, -1.0, 1.0)
    return sign[:, None] * qm.T


def min_image_rows(d: np.ndarray, box: np.ndarray) -> np.ndarray:
    """Minimum images of displacements d (n,3) in a reduced box (exact below half the shortest width)."""
    d = d - np.round(d[:, 2:3] / box[2, 2]) * box[2]
    d = d - np.round(d[:, 1:2] / box[1, 1]) * box[1]
    return d - np.round(d[:, 0:1] / box[0, 0]) * box[0]


def half_width(box: np.ndarray) -> float:
    vol = abs(np.linalg.det(box))
    return 0.5 * min(vol / np.linalg.norm(np.cross(box[1], box[2])), vol / np.linalg.norm(np.cross(box[2], box[0])),
                     vol / np.linalg.norm(np.cross(box[0], box[1])))


@dataclass(frozen=True)
class EwaldParameters:
    """alpha (1/nm), real-space cutoff (nm), mesh points per box vector, B-spline order (even)."""

    alpha: float
    cutoff: float
    mesh: tuple[int, int, int]
    order: int = ORDER

    @classmethod
    def choose(cls, box: np.ndarray, cutoff: float, tolerance: float = DEFAULT_TOLERANCE, order: int = ORDER,
               spacing: float | None = None) -> "EwaldParameters":
        """alpha from the real-space cutoff (erfc(alpha r) ~ 2 tolerance where the switch starts, as OpenMM
        at its cutoff), mesh spacing with a mesh error ~ tolerance (``MESH_ERROR``) unless given."""
        if not 0 < tolerance < 0.5 or cutoff <= 2 * REAL_SPACE_SWITCH:
            raise SetupError(f"Ewald tolerance {tolerance} must lie in (0, 0.5) and the cutoff {cutoff} nm exceed "
                             f"{2 * REAL_SPACE_SWITCH} nm")
        if order % 2 or not 4 <= order <= 8:
            raise SetupError(f"B-spline order {order}: use 4, 6 or 8 (odd orders have zeros in their moduli)")
        alpha = math.sqrt(-math.log(2.0 * tolerance)) / (cutoff - REAL_SPACE_SWITCH)
        h = (tolerance / MESH_ERROR[order]) ** (1.0 / order) / alpha if spacing is None else spacing
        mesh = tuple(fft_size(max(order + 1, math.ceil(float(np.linalg.norm(v)) / h))) for v in np.asarray(box))
        return cls(alpha, float(cutoff), mesh, order)


def _bspline_moduli(size: int, order: int) -> np.ndarray:
    """|b(m)|^2 of the Euler exponential spline, m = 0..size-1 (Essmann eq. 4.4)."""
    th, dth = np.empty((3, order)), np.empty((3, order))
    kern._bspline(0.0, order, th, dth, 0)                   # th[0, j] = M_p(j)
    k = np.arange(order - 1)
    m = np.arange(size)
    den = (th[0, 1:order][None, :] * np.exp(2j * np.pi * np.outer(m, k) / size)).sum(1)
    return 1.0 / np.abs(den) ** 2


class Influence:
    """The reciprocal-space kernel of one box and parameter set on the rfft half spectrum: ``g`` such that the
    mesh potential of spread charges Q is irfftn(g * rfftn(Q)), and the reciprocal box vectors (virial)."""

    def __init__(self, box: np.ndarray, params: EwaldParameters):
        k1, k2, k3 = params.mesh
        self.box, self.params = np.array(box, dtype=np.float64), params
        vol = abs(np.linalg.det(self.box))
        recip = np.linalg.inv(self.box).T                       # rows a*, b*, c*
        m1 = np.fft.fftfreq(k1, 1.0 / k1)
        m2 = np.fft.fftfreq(k2, 1.0 / k2)
        m3 = np.arange(k3 // 2 + 1, dtype=np.float64)
        mvec = (m1[:, None, None, None] * recip[0] + m2[None, :, None, None] * recip[1]
                + m3[None, None, :, None] * recip[2])
        msq = np.einsum("abcx,abcx->abc", mvec, mvec)
        msq[0, 0, 0] = 1.0
        a2 = params.alpha ** 2
        c = np.exp(-np.pi ** 2 * msq / a2) / (np.pi * vol * msq)
        c[0, 0, 0] = 0.0
        b = (_bspline_moduli(k1, params.order)[:, None, None] * _bspline_moduli(k2, params.order)[None, :, None]
             * _bspline_moduli(k3, params.order)[None, None, : k3 // 2 + 1])
        self.g = np.ascontiguousarray(k1 * k2 * k3 * b * c)
        self.recip, self.volume = np.ascontiguousarray(recip), vol

    def matches(self, box: np.ndarray, params: EwaldParameters) -> bool:
        return params == self.params and np.array_equal(box, self.box)


class ZoneEwald(NamedTuple):
    """Energy (kJ/mol) and its derivatives: d/dq (n,), d/dr (n,3), d/dx (M,3); virial (3,3) = -dE/d(strain) at
    fixed charges."""

    energy: float
    dq: np.ndarray
    dr: np.ndarray
    dx: np.ndarray
    virial: np.ndarray


def zone_ewald(q, r, qx, x, box, pair_i, pair_j, params: EwaldParameters, influence: Influence | None = None,
               k: float = COULOMB_KJMOL_NM) -> ZoneEwald:
    """The zone's Ewald energy (module docstring). q (n,) e, r (n,3) nm: the zone (made whole: its own pairs are
    taken as given); qx (M,) e, x (M,3) nm: the fixed charges (any image); box rows nm (reduced form);
    pair_i/pair_j: candidate (zone, fixed) pairs holding every pair within the real-space cutoff."""
    box = np.asarray(box, dtype=np.float64)
    if influence is None or not influence.matches(box, params):
        influence = Influence(box, params)
    q, r, qx, x = (np.ascontiguousarray(a, dtype=np.float64) for a in (q, r, qx, x))
    rec, dq, du_r, du_x, w_rec = _reciprocal(q, r, qx, x, box, params, influence)
    alpha = params.alpha
    e_real, dq_real, dr_real, dx_real, w_real = kern.real_space(r, x, q, qx, pair_i, pair_j, box, alpha,
                                                                params.cutoff, REAL_SPACE_SWITCH)
    e_zone, dq_zone, dr_zone, w_zone = kern.zone_pairs(r, q, alpha)
    q_zone, q_fixed = float(q.sum()), float(qx.sum())
    bg = -math.pi / (2.0 * influence.volume * alpha ** 2)
    e_bg = bg * (q_zone ** 2 + 2.0 * q_zone * q_fixed)
    e_self = -alpha / math.sqrt(math.pi) * float(q @ q)
    energy = rec + e_real + e_zone + e_bg + e_self
    dq = dq + dq_real + dq_zone + 2.0 * bg * (q_zone + q_fixed) - 2.0 * alpha / math.sqrt(math.pi) * q
    scale = np.asarray(params.mesh, dtype=np.float64) * np.linalg.inv(box)     # du/dr (c, a) = K_a inv[c, a]
    dr = du_r @ scale.T + dr_real + dr_zone
    dx = du_x @ scale.T + dx_real
    virial = w_rec + w_real + w_zone + e_bg * np.eye(3)
    return ZoneEwald(k * energy, k * dq, k * dr, k * dx, k * virial)


def _reciprocal(q, r, qx, x, box, params: EwaldParameters, influence: Influence):
    """Reciprocal-space part (unit Coulomb constant): energy, d/dq, d/du of the zone and of the fixed charges
    (u = scaled fractional coordinates), virial."""
    shape, p = params.mesh, params.order
    inv = np.linalg.inv(box)
    kvec = np.asarray(shape, dtype=np.float64)
    u_r, u_x = (r @ inv) * kvec, (x @ inv) * kvec
    mesh_r = np.zeros(shape)
    kern.spread(u_r, q, p, mesh_r)
    a = scipy.fft.rfftn(mesh_r, workers=1)
    phi_r = scipy.fft.irfftn(influence.g * a, s=shape, workers=1, overwrite_x=True)
    mesh_x = np.zeros(shape)
    _, du_x = kern.spread_gather(u_x, qx, p, mesh_x, phi_r)    # spreads the fixed charges, forces on them
    b = scipy.fft.rfftn(mesh_x, workers=1)
    phi_x = scipy.fft.irfftn(influence.g * b, s=shape, workers=1, overwrite_x=True)
    none = np.zeros((0, 0, 0))
    pot_x, du_rx = kern.spread_gather(u_r, q, p, none, phi_x)
    pot_r, du_rr = kern.spread_gather(u_r, q, p, none, phi_r)
    energy = float(q @ (pot_x + 0.5 * pot_r))
    virial = kern.reciprocal_virial(a, b, influence.g, influence.recip, params.alpha, shape[2])
    return energy, pot_x + pot_r, du_rx + du_rr, du_x, virial


def zone_coulomb(q, r, qx, x, k: float = COULOMB_KJMOL_NM) -> ZoneEwald:
    """Plain Coulomb of the zone with every fixed charge, no box (clusters): k sum_ij q_i Q_j / |r_i - x_j|."""
    q, r, qx, x = (np.ascontiguousarray(a, dtype=np.float64) for a in (q, r, qx, x))
    e, dq, dr, dx, vir = kern.coulomb_all(r, x, q, qx)
    return ZoneEwald(k * e, k * dq, k * dr, k * dx, k * vir)


class RealSpacePairs:
    """Candidate (zone atom, fixed atom) pairs within ``cutoff + skin`` (a Verlet list): reused until an atom
    has moved ``skin / 2`` or the box changed. The kernels recompute each pair's minimum image and drop pairs
    beyond the cutoff, so a list of any age gives the same energy."""

    def __init__(self, cutoff: float, skin: float = 0.1):
        self.cutoff, self.skin = float(cutoff), max(0.0, float(skin))
        self.builds = 0
        self.pairs = self._ref = self._box = None

    def get(self, r: np.ndarray, x: np.ndarray, box: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        both = np.concatenate([r, x])
        if self.pairs is None or not self._valid(both, box):
            self.pairs = self._build(r, x, box)
            self._ref, self._box = both, np.array(box)
            self.builds += 1
        return self.pairs

    def _valid(self, both: np.ndarray, box: np.ndarray) -> bool:
        if both.shape != self._ref.shape or not np.array_equal(box, self._box):
            return False
        moved = np.einsum("ij,ij->i", both - self._ref, both - self._ref).max(initial=0.0)
        return bool(moved < (0.5 * self._skin_used) ** 2)           # False for NaN: rebuild (and fail there)

    def _build(self, r: np.ndarray, x: np.ndarray, box: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if not (np.all(np.isfinite(r)) and np.all(np.isfinite(x))):
            raise SetupError("positions contain NaN or inf")
        centre = r.mean(axis=0)
        radius = float(np.sqrt(((r - centre) ** 2).sum(1).max()))
        half = half_width(box)
        # each fixed atom at its image nearest the zone's centre: the right image for every zone atom as long as
        # cutoff + skin + zone radius stays below half the box width
        self._skin_used = min(self.skin, max(0.0, 0.999 * (half - self.cutoff - radius)))
        if self.cutoff + radius >= half:
            raise SetupError(f"box too small for the long-range term: cutoff {self.cutoff:.3f} nm + zone radius "
                             f"{radius:.3f} nm >= half the shortest box width {half:.3f} nm")
        reach = self.cutoff + self._skin_used
        d = min_image_rows(x - centre, box)
        near = np.flatnonzero(np.einsum("ij,ij->i", d, d) < (reach + radius) ** 2)
        pairs = cKDTree(r).sparse_distance_matrix(cKDTree(centre + d[near]), reach, output_type="coo_matrix")
        return pairs.row.astype(np.int64), near[pairs.col].astype(np.int64)


class _ZoneEnergy(torch.autograd.Function):
    """E(q, r) of a :class:`ZoneCoulomb` with the derivatives its forward computed (first order only)."""

    @staticmethod
    def forward(ctx, q, r, zone):
        res = zone.evaluate(q.detach().to(torch.float64).cpu().numpy(), r.detach().to(torch.float64).cpu().numpy())
        ctx.save_for_backward(torch.as_tensor(res.dq, device=q.device), torch.as_tensor(res.dr, device=r.device))
        return torch.tensor(res.energy, dtype=torch.float64, device=q.device)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        dq, dr = ctx.saved_tensors
        return grad * dq, grad * dr, None


class ZoneCoulomb:
    """The Coulomb energy of zone charges (torch, differentiable) with fixed charges ``qx`` (e): Ewald in a box,
    plain Coulomb without one. ``energy(q, r, x, box)`` returns a 0-d tensor whose backward gives d/dq and d/dr;
    the derivatives w.r.t. the fixed charges' positions and the virial of the last call are in ``last``."""

    def __init__(self, qx: np.ndarray, cutoff: float, skin: float = 0.1, tolerance: float = DEFAULT_TOLERANCE,
                 order: int = ORDER, spacing: float | None = None):
        self.qx = np.ascontiguousarray(qx, dtype=np.float64)
        self.cutoff, self.tolerance, self.order, self.spacing = float(cutoff), tolerance, order, spacing
        self.pairs = RealSpacePairs(cutoff, skin)
        self.params: EwaldParameters | None = None
        self.influence: Influence | None = None
        self.last: ZoneEwald | None = None
        self._x = self._box = None

    def energy(self, q: torch.Tensor, r: torch.Tensor, x: np.ndarray, box: np.ndarray | None) -> torch.Tensor:
        self._x, self._box = np.ascontiguousarray(x, dtype=np.float64), box
        return _ZoneEnergy.apply(q, r, self)

    def evaluate(self, q: np.ndarray, r: np.ndarray) -> ZoneEwald:
        x, box = self._x, self._box
        if box is None:
            self.last = zone_coulomb(q, r, self.qx, x)
            return self.last
        box = np.asarray(box, dtype=np.float64)
        rot = lower_triangular_rotation(box)
        if rot is None:
            self.last = self._periodic(q, r, x, box)
        else:                 # a rotated box (a strained one, say): computed in the frame where it is reduced
            res = self._periodic(q, r @ rot.T, x @ rot.T, box @ rot.T)
            self.last = ZoneEwald(res.energy, res.dq, res.dr @ rot, res.dx @ rot, rot.T @ res.virial @ rot)
        return self.last

    def _periodic(self, q, r, x, box) -> ZoneEwald:
        box = check_reduced_box(box)
        if self.influence is None or not np.array_equal(box, self.influence.box):
            # the mesh is chosen once (an energy continuous in the box, e.g. for the virial) and only re-chosen
            # when the box has changed by over 10%
            want = EwaldParameters.choose(box, self.cutoff, self.tolerance, self.order, self.spacing)
            if self.params is None or np.any(np.abs(np.divide(want.mesh, self.params.mesh) - 1.0) > 0.1):
                self.params = want
            self.influence = Influence(box, self.params)
        pair_i, pair_j = self.pairs.get(r, x, box)
        return zone_ewald(q, r, self.qx, x, box, pair_i, pair_j, self.params, self.influence)

"""Compiled CPU kernels (numba) of :mod:`potentials.ewald`: B-spline charge spreading and interpolation on the
particle mesh, and the real-space pair sums. Units are whatever the caller passes (the caller multiplies by the
Coulomb constant); every kernel returns exact first derivatives of what it sums.

Conventions (Essmann et al., J. Chem. Phys. 103, 8577 (1995)): an atom at scaled fractional coordinate ``u``
(``K * fractional``, wrapped into [0, K)) spreads onto grid points ``g - j`` (``g = floor(u)``, ``j = 0..p-1``)
with weights ``M_p(u - g + j)``, the cardinal B-spline of order ``p`` (C^(p-2): forces are continuous).
"""
from __future__ import annotations

import logging
import math

import numpy as np
from numba import njit

log = logging.getLogger(__name__)


def _compiled(fn):
    """numba.njit with an on-disk cache (compiled once per machine); where no cache location is writable each
    process compiles its own copy instead of failing."""
    try:
        return njit(cache=True, nogil=True, error_model="numpy")(fn)
    except RuntimeError as exc:                     # numba: "cannot cache function ...: no locator"
        log.warning("numba cannot cache %s (%s); it is compiled anew in each process", fn.__name__, exc)
        return njit(cache=False, nogil=True, error_model="numpy")(fn)


def _inline(fn):
    """A helper inlined into the kernels that call it (no call overhead, no array views)."""
    return njit(inline="always", error_model="numpy")(fn)


@_inline
def _bspline(w, order, th, dth, d):
    """th[d, j] = M_p(w + j), dth[d, j] = M_p'(w + j) for j = 0..p-1 and w in [0, 1) (recursion on the order:
    M_n(x) = [x M_{n-1}(x) + (n - x) M_{n-1}(x - 1)] / (n - 1), M_p'(x) = M_{p-1}(x) - M_{p-1}(x - 1))."""
    for j in range(order):
        th[d, j] = 0.0
    th[d, 0] = 1.0
    for n in range(2, order + 1):
        if n == order:
            dth[d, 0] = th[d, 0]
            for j in range(1, order):
                dth[d, j] = th[d, j] - th[d, j - 1]
        for j in range(n - 1, 0, -1):                   # descending: th[d, j - 1] is still M_{n-1}
            x = w + j
            th[d, j] = (x * th[d, j] + (n - x) * th[d, j - 1]) / (n - 1)
        th[d, 0] = w * th[d, 0] / (n - 1)


@_inline
def _stencil(u, d, size, order, th, dth, idx):
    """Weights, derivatives and grid indices of coordinate d of one atom."""
    v = u - math.floor(u / size) * size                  # wrap into [0, size)
    g = int(math.floor(v))
    if g >= size:                                        # v == size after rounding
        g -= size
        v -= size
    _bspline(v - g, order, th, dth, d)
    for j in range(order):
        k = g - j
        idx[d, j] = k + size if k < 0 else k


@_compiled
def spread_gather(u, q, order, spread_into, gather_from):
    """One pass over atoms at scaled fractional coordinates ``u`` (N,3) with charges ``q`` (N,): adds their
    B-spline charges to the mesh ``spread_into`` (K1,K2,K3) (skipped if it has size 0) and interpolates the
    mesh ``gather_from``: returns the interpolated values (N,) and their gradients w.r.t. ``u`` (N,3), the
    latter multiplied by ``q`` (d(sum_i q_i value_i)/du_i)."""
    k1, k2, k3 = gather_from.shape
    spread = spread_into.size > 0
    n = len(u)
    val = np.zeros(n)
    grad = np.zeros((n, 3))
    th = np.empty((3, order))
    dth = np.empty((3, order))
    idx = np.empty((3, order), np.int64)
    for i in range(n):
        _stencil(u[i, 0], 0, k1, order, th, dth, idx)
        _stencil(u[i, 1], 1, k2, order, th, dth, idx)
        _stencil(u[i, 2], 2, k3, order, th, dth, idx)
        qi = q[i]
        v = g0 = g1 = g2 = 0.0
        for a in range(order):
            ia = idx[0, a]
            for b in range(order):
                ib = idx[1, b]
                tab, dab, adb = th[0, a] * th[1, b], dth[0, a] * th[1, b], th[0, a] * dth[1, b]
                for c in range(order):
                    ic = idx[2, c]
                    if spread:
                        spread_into[ia, ib, ic] += qi * tab * th[2, c]
                    phi = gather_from[ia, ib, ic]
                    v += tab * th[2, c] * phi
                    g0 += dab * th[2, c] * phi
                    g1 += adb * th[2, c] * phi
                    g2 += tab * dth[2, c] * phi
        val[i] = v
        grad[i, 0], grad[i, 1], grad[i, 2] = qi * g0, qi * g1, qi * g2
    return val, grad


@_compiled
def spread(u, q, order, mesh):
    """Add the B-spline charges of atoms at ``u`` (N,3) with charges ``q`` to ``mesh`` (K1,K2,K3)."""
    k1, k2, k3 = mesh.shape
    th = np.empty((3, order))
    dth = np.empty((3, order))
    idx = np.empty((3, order), np.int64)
    for i in range(len(u)):
        _stencil(u[i, 0], 0, k1, order, th, dth, idx)
        _stencil(u[i, 1], 1, k2, order, th, dth, idx)
        _stencil(u[i, 2], 2, k3, order, th, dth, idx)
        for a in range(order):
            for b in range(order):
                w = q[i] * th[0, a] * th[1, b]
                for c in range(order):
                    mesh[idx[0, a], idx[1, b], idx[2, c]] += w * th[2, c]


@_compiled
def reciprocal_virial(a, b, g, recip, alpha, k3):
    """-dE/d(strain) of the reciprocal energy sum_m g_m [Re(conj(a_m) b_m) + |a_m|^2 / 2] / K (zone transform a,
    fixed-charge transform b, kernel g, all on the rfft half spectrum of a (K1, K2, K3) mesh): per mode
    E_m [delta - 2 (1 + pi^2 m^2 / alpha^2) m m^T / m^2] (Essmann eq. 2.6), m the reciprocal vector."""
    n1, n2, n3 = a.shape
    norm = 1.0 / (n1 * n2 * k3)
    c = math.pi * math.pi / (alpha * alpha)
    vir = np.zeros((3, 3))
    total = 0.0
    for i1 in range(n1):
        m1 = i1 if 2 * i1 < n1 else i1 - n1
        for i2 in range(n2):
            m2 = i2 if 2 * i2 < n2 else i2 - n2
            for i3 in range(n3):
                gm = g[i1, i2, i3]
                if gm == 0.0:
                    continue
                w = 1.0 if i3 == 0 or 2 * i3 == k3 else 2.0          # modes m and -m of the half spectrum
                x, y = a[i1, i2, i3], b[i1, i2, i3]
                e = w * gm * norm * (x.real * y.real + x.imag * y.imag + 0.5 * (x.real * x.real + x.imag * x.imag))
                v0 = m1 * recip[0, 0] + m2 * recip[1, 0] + i3 * recip[2, 0]
                v1 = m1 * recip[0, 1] + m2 * recip[1, 1] + i3 * recip[2, 1]
                v2 = m1 * recip[0, 2] + m2 * recip[1, 2] + i3 * recip[2, 2]
                msq = v0 * v0 + v1 * v1 + v2 * v2
                t = e * 2.0 * (1.0 + c * msq) / msq
                total += e
                vir[0, 0] -= t * v0 * v0
                vir[0, 1] -= t * v0 * v1
                vir[0, 2] -= t * v0 * v2
                vir[1, 1] -= t * v1 * v1
                vir[1, 2] -= t * v1 * v2
                vir[2, 2] -= t * v2 * v2
    vir[1, 0], vir[2, 0], vir[2, 1] = vir[0, 1], vir[0, 2], vir[1, 2]
    for k in range(3):
        vir[k, k] += total
    return vir


@_compiled
def _min_image(d, box):
    """Minimum image of d (3,) in a reduced box (rows a, b, c with a = (ax,0,0), b = (bx,by,0)), in place:
    exact for |d| below half the shortest box width, as in OpenMM."""
    s = round(d[2] / box[2, 2])
    for k in range(3):
        d[k] -= s * box[2, k]
    s = round(d[1] / box[1, 1])
    for k in range(3):
        d[k] -= s * box[1, k]
    s = round(d[0] / box[0, 0])
    for k in range(3):
        d[k] -= s * box[0, k]


@_compiled
def real_space(r, x, q, qx, pair_i, pair_j, box, alpha, cutoff, width):
    """Ewald real-space sum over candidate pairs (ML atom i, MM atom j) at their minimum image, within
    ``cutoff``: sum q_i qx_j S(d) erfc(alpha d)/d, S the quintic switch from 1 at ``cutoff - width`` to 0 at the
    cutoff (C2: forces continuous as pairs leave).

    Returns the energy, its derivatives w.r.t. q (n,), r (n,3), x (M,3) and the pair virial (3,3)
    (-dE/d strain)."""
    c = 2.0 * alpha / math.sqrt(math.pi)
    inner = cutoff - width
    energy = 0.0
    dq = np.zeros(len(r))
    dr = np.zeros((len(r), 3))
    dx = np.zeros((len(x), 3))
    vir = np.zeros((3, 3))
    d = np.empty(3)
    for p in range(len(pair_i)):
        i, j = pair_i[p], pair_j[p]
        for k in range(3):
            d[k] = r[i, k] - x[j, k]
        _min_image(d, box)
        r2 = d[0] * d[0] + d[1] * d[1] + d[2] * d[2]
        if r2 >= cutoff * cutoff:
            continue
        dist = math.sqrt(r2)
        e = math.erfc(alpha * dist) / dist
        de = -(e + c * math.exp(-alpha * alpha * r2)) / dist           # d/dr of erfc(a r)/r
        if dist > inner:
            t = (dist - inner) / width
            u = 1.0 - t
            sw = u * u * u * (1.0 + 3.0 * t + 6.0 * t * t)
            de = de * sw - e * 30.0 * t * t * u * u / width
            e = e * sw
        energy += q[i] * qx[j] * e
        dq[i] += qx[j] * e
        f = q[i] * qx[j] * de / dist                                    # dE/dd = f d
        for k in range(3):
            dr[i, k] += f * d[k]
            dx[j, k] -= f * d[k]
            for m in range(3):
                vir[k, m] -= f * d[k] * d[m]
    return energy, dq, dr, dx, vir


@_compiled
def zone_pairs(r, q, alpha):
    """-sum_{i<j} q_i q_j erf(alpha d_ij)/d_ij over every pair of the zone as given (no images): the part of
    the Ewald sum of the zone's own pairs that is not 1/r. Energy, d/dq, d/dr, pair virial."""
    n = len(r)
    c = 2.0 * alpha / math.sqrt(math.pi)
    energy = 0.0
    dq = np.zeros(n)
    dr = np.zeros((n, 3))
    vir = np.zeros((3, 3))
    d = np.empty(3)
    for i in range(n):
        for j in range(i + 1, n):
            for k in range(3):
                d[k] = r[i, k] - r[j, k]
            r2 = d[0] * d[0] + d[1] * d[1] + d[2] * d[2]
            dist = math.sqrt(r2)
            e = -math.erf(alpha * dist) / dist
            de = -(e + c * math.exp(-alpha * alpha * r2)) / dist         # d/dr of -erf(a r)/r
            energy += q[i] * q[j] * e
            dq[i] += q[j] * e
            dq[j] += q[i] * e
            f = q[i] * q[j] * de / dist
            for k in range(3):
                dr[i, k] += f * d[k]
                dr[j, k] -= f * d[k]
                for m in range(3):
                    vir[k, m] -= f * d[k] * d[m]
    return energy, dq, dr, vir


@_compiled
def coulomb_all(r, x, q, qx):
    """Plain Coulomb sum_ij q_i qx_j / |r_i - x_j| of every pair (clusters): energy, d/dq, d/dr, d/dx, virial."""
    energy = 0.0
    dq = np.zeros(len(r))
    dr = np.zeros((len(r), 3))
    dx = np.zeros((len(x), 3))
    vir = np.zeros((3, 3))
    for i in range(len(r)):
        pot = g0 = g1 = g2 = 0.0
        for j in range(len(x)):
            d0, d1, d2 = r[i, 0] - x[j, 0], r[i, 1] - x[j, 1], r[i, 2] - x[j, 2]
            inv = 1.0 / math.sqrt(d0 * d0 + d1 * d1 + d2 * d2)
            e = qx[j] * inv
            pot += e
            f = -q[i] * e * inv * inv                                   # dE/dd = f d
            g0 += f * d0
            g1 += f * d1
            g2 += f * d2
            dx[j, 0] -= f * d0
            dx[j, 1] -= f * d1
            dx[j, 2] -= f * d2
            vir[0, 0] -= f * d0 * d0
            vir[0, 1] -= f * d0 * d1
            vir[0, 2] -= f * d0 * d2
            vir[1, 1] -= f * d1 * d1
            vir[1, 2] -= f * d1 * d2
            vir[2, 2] -= f * d2 * d2
        energy += q[i] * pot
        dq[i] = pot
        dr[i, 0], dr[i, 1], dr[i, 2] = g0, g1, g2
    vir[1, 0], vir[2, 0], vir[2, 1] = vir[0, 1], vir[0, 2], vir[1, 2]
    return energy, dq, dr, dx, vir

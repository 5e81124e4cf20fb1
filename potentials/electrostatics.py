"""Point-charge electrostatics in torch: the potential and field of a set of charges at given sites.

One definition for the whole project: the ML client's embedding (:mod:`coupling.embedding`), training and
evaluation (:mod:`potentials.train`) all call :func:`potential_and_field`. The Coulomb constant ``k`` fixes
the units: :data:`~potentials.core.units.COULOMB_KJMOL_NM` (default) for nm and kJ/mol/e,
:data:`~potentials.core.units.COULOMB_EV_ANGSTROM` for Å and V.
"""
from __future__ import annotations

import torch

from potentials.core.units import COULOMB_KJMOL_NM

DAMPING_RANGE = 3.5       # pairs beyond this many damping widths: exp(-(r/a)^3) < 1e-18, left out


def potential_and_field(sites: torch.Tensor, positions: torch.Tensor, charges: torch.Tensor,
                        chunk: int = 4096, k: float = COULOMB_KJMOL_NM) -> tuple[torch.Tensor, torch.Tensor]:
    """Electrostatic potential and field of point charges at each site.

    phi_i = k sum_j q_j / r_ij;  E_i = k sum_j q_j (r_i - r_j) / r_ij^3.
    Differentiable (to any order) w.r.t. all three inputs. Chunked over sites to bound memory.
    """
    phis, fields = [], []
    for start in range(0, max(len(sites), 1), chunk):
        d = sites[start:start + chunk, None, :] - positions[None, :, :]        # [n, M, 3]
        inv_r = torch.rsqrt((d * d).sum(-1))                                  # [n, M]
        qr = charges[None, :] * inv_r
        phis.append(qr.sum(-1))
        fields.append(((qr * inv_r * inv_r)[..., None] * d).sum(1))
    return k * torch.cat(phis), k * torch.cat(fields)


def damped_field_excess(sites: torch.Tensor, positions: torch.Tensor, charges: torch.Tensor, width: float,
                        k: float = COULOMB_KJMOL_NM) -> torch.Tensor:
    """The part of the point charges' field at each site that short-range damping removes (n, 3):

        excess_i = k sum_j q_j (r_i - r_j) / r_ij^3 * exp(-(r_ij / a)^3),   a = ``width``,

    so that E_i - excess_i is the field of charges smeared as in Thole's exponential model (A. Thole, Chem. Phys.
    59, 341 (1981); the damping factor 1 - exp(-(r/a)^3) of the charge-dipole field), finite as r -> 0 and equal to
    the bare field beyond a few widths. Only pairs closer than DAMPING_RANGE * a enter (found without gradient,
    then recomputed with it), so the cost is that of the few close contacts; differentiable to any order in all
    three inputs. Units as ``k`` and the positions give them."""
    out = sites.new_zeros(sites.shape[0], 3)
    if width <= 0 or not len(positions) or not len(sites):
        return out
    with torch.no_grad():
        near = torch.cdist(sites.detach(), positions.detach().to(sites.dtype)) < DAMPING_RANGE * width
        i, j = near.nonzero(as_tuple=True)
    if not len(i):
        return out
    d = sites.index_select(0, i) - positions.index_select(0, j).to(sites.dtype)
    r2 = (d * d).sum(-1)
    inv_r3 = r2.rsqrt() / r2
    w = charges.index_select(0, j).to(sites.dtype) * inv_r3 * torch.exp(-(r2.sqrt() / width) ** 3)
    return out.index_add(0, i, k * w[:, None] * d)

"""Point-charge electrostatics in torch: the potential and field of a set of charges at given sites.

One definition for the whole project: the ML client's embedding (:mod:`coupling.embedding`), training and
evaluation (:mod:`potentials.train`) all call :func:`potential_and_field`. The Coulomb constant ``k`` fixes
the units: :data:`~potentials.core.units.COULOMB_KJMOL_NM` (default) for nm and kJ/mol/e,
:data:`~potentials.core.units.COULOMB_EV_ANGSTROM` for Å and V.
"""
from __future__ import annotations

import torch

from potentials.core.units import COULOMB_KJMOL_NM


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

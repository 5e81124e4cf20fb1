"""Building blocks of :class:`potentials.network.EmbeddedAIMNet2` that depend on no size threshold.

Initialisers (``_mlp``, ``_smooth_mixing``), the layers ``ConvSV`` and ``AtomicShift``, the per-structure
helpers (``_gather_rows``, ``_per_structure``), neural charge equilibration (``nqe``), AIMNet2's short-range
Coulomb envelope (``_sr_envelope``) and the optional D3(BJ) dispersion term (``d3_energy``, in tad-dftd3's
units Bohr/Hartree at its interface). Units are the network's: Å, eV, e. All names are re-exported by
:mod:`potentials.network`; the size-dependent kernels (neighbour sums, Coulomb sums) stay there.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from potentials.core.errors import SetupError
from potentials.core.units import BOHR_PER_ANGSTROM, EV_PER_HARTREE
from potentials.neighbors import structure_layout

D3_WB97M = {"s6": 1.0, "s8": 0.3908, "a1": 0.5660, "a2": 3.1280}    # ωB97M-D3(BJ), a2 in Bohr
# B3LYP-D3(BJ): Grimme, Ehrlich, Goerigk, J. Comput. Chem. 32, 1456 (2011), Table 2 (a2 in Bohr); the
# shipped model's reference is B3LYP/def2-SVP, which has no dispersion of its own
D3_B3LYP = {"s6": 1.0, "s8": 1.9889, "a1": 0.3981, "a2": 4.4211}
_NQE_EPS = 1e-6                    # keeps NQE weights defined when all f_i vanish


def _mlp(n_in: int, hidden: list[int], n_out: int, last_activation: bool, gen: torch.Generator) -> nn.Sequential:
    """GELU MLP with Xavier-normal weights and zero biases (AIMNet2's choice)."""
    sizes = [n_in, *hidden, n_out]
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        lin = nn.Linear(a, b)
        nn.init.xavier_normal_(lin.weight, generator=gen)
        nn.init.zeros_(lin.bias)
        layers.append(lin)
        if i < len(sizes) - 2 or last_activation:
            layers.append(nn.GELU())
    return nn.Sequential(*layers)


def _smooth_mixing(nchannel: int, nshifts: int, ncomb: int, gen: torch.Generator) -> Tensor:
    """Initial shell mixing [C, S, H]: per channel, H smooth, well-separated random curves over the shells.

    Random sine/cosine curves are drawn (8H per channel), standardised, and H of them chosen greedily so
    each is as far as possible from those already chosen; scaled by 1/sqrt(S).
    """
    x = torch.arange(nshifts, dtype=torch.float64) / nshifts
    out = torch.empty(nchannel, nshifts, ncomb, dtype=torch.float64)
    for c in range(nchannel):
        p = torch.rand(4, 8 * ncomb, 1, generator=gen, dtype=torch.float64) * torch.tensor(
            [2.0, 1.0, 2.0, 1.0], dtype=torch.float64)[:, None, None] - torch.tensor(
            [1.0, 0.0, 1.0, 0.0], dtype=torch.float64)[:, None, None]
        curves = p[0] * torch.sin(p[1] * 2 * math.pi * x) + p[2] * torch.cos(p[3] * 2 * math.pi * x)
        curves = (curves - curves.mean(1, keepdim=True)) / (curves.std(1, keepdim=True) + 1e-8)
        chosen = [0]
        dist = (curves - curves[0]).norm(dim=1)
        for _ in range(ncomb - 1):
            k = int(dist.argmax())
            chosen.append(k)
            dist = torch.minimum(dist, (curves - curves[k]).norm(dim=1))
        out[c] = curves[chosen].T
    return (out / math.sqrt(nshifts)).float()


class ConvSV(nn.Module):
    """Finish of AIMNet2's ConvSV: scalar part and squared norms of shell-mixed vector channels.

    Input avf [N, 4, C, S]; returns scalars [N, C*S], vector invariants [N, C*H] and the mixed vectors
    themselves [N, 3, C*H] (used for the field contractions).
    """

    def __init__(self, nchannel: int, nshifts: int, ncomb: int, gen: torch.Generator):
        super().__init__()
        self.agh = nn.Parameter(_smooth_mixing(nchannel, nshifts, ncomb, gen))        # [C, S, H]

    def forward(self, avf: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        n, _, n_c, n_s = avf.shape
        scal, v = avf.split([1, 3], dim=1)              # split, not slicing: its backward allocates no zeros
        x = v.reshape(n * 3, n_c, n_s).transpose(0, 1)                                   # [C, 3N, S]
        vec = torch.bmm(x, self.agh).view(n_c, n, 3, -1).permute(1, 2, 0, 3).reshape(n, 3, -1)
        return scal.reshape(n, -1), vec.square().sum(1), vec


class AtomicShift(nn.Module):
    """Per-element energy shift, kept in float64 whatever dtype the rest of the model is cast to."""

    def __init__(self, n_elements: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(n_elements, dtype=torch.float64))

    def _apply(self, fn, recurse=True):
        keep = self.weight.data
        super()._apply(fn, recurse)
        if self.weight.dtype != torch.float64:        # a dtype cast must not round the shifts (~1e3 eV)
            self.weight.data = keep.to(self.weight.device)
        return self

    def forward(self, species: Tensor) -> Tensor:
        return self.weight[species]


def _gather_rows(x: Tensor, nb: Tensor) -> Tensor:
    """``x[nb]`` for a neighbour matrix with fill N (a zero row is appended): [N, ...] -> [N, M, ...]."""
    pad = torch.cat([x, x.new_zeros(1, *x.shape[1:])])
    return pad.index_select(0, nb.reshape(-1)).view(*nb.shape, *x.shape[1:])


def _per_structure(x: Tensor, mol_idx: Tensor, n_structures: int) -> Tensor:
    return x.new_zeros(n_structures).index_add(0, mol_idx, x)


def nqe(q: Tensor, f: Tensor, mol_idx: Tensor, charge: Tensor) -> Tensor:
    """Neural charge equilibration: shift q by shares w_i ∝ f_i² of the deficit so Σq = Q per structure.

    Inputs float64; shares are normalised exactly (Σ w = 1), so Σq equals Q to float64 rounding.
    """
    w = f * f + _NQE_EPS
    b = charge.shape[0]
    deficit = charge.to(q.dtype) - _per_structure(q, mol_idx, b)
    # index_select, not [mol_idx]: its backward is an index_add, not the much slower index_put
    return q + w / _per_structure(w, mol_idx, b).index_select(0, mol_idx) * deficit.index_select(0, mol_idx)


def _sr_envelope(r: Tensor, rc: float) -> Tensor:
    """AIMNet2's exp envelope f(r) = exp(1 − 1/(1 − (r/rc)²)) for r < rc, 0 beyond (f(0) = 1, C∞ at rc)."""
    x2 = (r / rc).square()
    inside = x2 < 1.0
    t = torch.where(inside, 1.0 - x2, torch.ones_like(x2))     # safe branch: no inf in gradients
    return torch.where(inside, torch.exp(1.0 - 1.0 / t), torch.zeros_like(x2))


def _import_tad_dftd3():
    try:
        import tad_dftd3
    except ImportError:
        raise SetupError("model config has d3 = true but tad-dftd3 is not installed; "
                         "run `pip install tad-dftd3` or set d3 = false") from None
    return tad_dftd3


def d3_energy(numbers: Tensor, pos: Tensor, mol_idx: Tensor, n_structures: int, params: dict) -> Tensor:
    """D3(BJ) energy per structure (eV) from tad-dftd3 (no three-body term); positions Å; float64.

    Dense per structure (memory O(n_max²)): meant for ML zones up to a few thousand atoms.
    """
    tad_dftd3 = _import_tad_dftd3()
    start, count = structure_layout(mol_idx, n_structures)
    slot = torch.arange(len(mol_idx), device=mol_idx.device) - start[mol_idx]
    n_max = int(count.max())
    z = numbers.new_zeros(n_structures, n_max).index_put((mol_idx, slot), numbers)
    xyz = pos.new_zeros(n_structures, n_max, 3, dtype=torch.float64).index_put(
        (mol_idx, slot), pos.to(torch.float64) * BOHR_PER_ANGSTROM)
    p = {k: torch.tensor(v, dtype=torch.float64, device=pos.device) for k, v in params.items()}
    ref, vdw = _d3_tables(pos.device)
    rvdw = vdw[z.unsqueeze(-1), z.unsqueeze(-2)]
    return tad_dftd3.dftd3(z, xyz, p, ref=ref, rvdw=rvdw).sum(-1) * EV_PER_HARTREE


_D3_TABLES: dict = {}


def _d3_tables(device) -> tuple:
    """tad-dftd3's reference C6 table and pairwise van der Waals radii, loaded once per device (tad-dftd3 reads
    both from disk on every call unless given them: two thirds of a small zone's D3 time)."""
    key = str(device)
    if key not in _D3_TABLES:
        from tad_mctc.data import radii

        _D3_TABLES[key] = (_import_tad_dftd3().reference.Reference(dtype=torch.float64, device=device),
                           radii.VDW_PAIRWISE(dtype=torch.float64, device=device))
    return _D3_TABLES[key]

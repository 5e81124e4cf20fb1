"""Embedding-aware AIMNet2-style network: energy and charges of an ML zone polarised by MM point charges.

Units (the network's own, converted by the caller): positions Å, energies eV, charges e, MM potential
φ in V (= eV/e), MM field E in V/Å, polarisabilities e·Å²/V.

Architecture (AIMNet2 core, see shared/reference/aimnet2.md §1, plus electrostatic embedding):

* geometry: ``nshifts`` Gaussians between ``rmin`` and ``cutoff`` times a cosine cutoff, ``gs[s,i,m]``,
  and the angular factors ``ang[i,d,m]`` = (1, u_ij) over each atom's neighbour slots m;
* per-element (F×S) embeddings ``a``; each pass contracts neighbour features with the geometry
  (``avf[i,d,f,s] = Σ_m a_j[f,s] gs[s,i,m] ang[i,d,m]``), keeps the scalar part and the squared norms of
  shell-mixed vector channels (``agh``); passes ≥ 1 do the same on the charges (``conv_q``);
* embedding: ``φ_i − φ̄`` (gauge-free), ``|E_i|²`` and ``field_channels`` learned mixtures of the
  rotation-invariant contractions ``v·E_i`` of every vector channel (FieldSchNet-style) enter EVERY pass,
  so the MM environment polarises charges and features;
* passes before the last predict charges and weights, equilibrated (NQE) so Σq = Q per structure exactly
  (float64), and update ``a``; the last pass gives the AIM vector, read out per atom to an energy and a
  polarisability α_i ≥ 0;
* E = Σ_i (e_i + shift_Z) + Coulomb(q, short range removed with AIMNet2's exp envelope) + Σ_i q_i φ_i
  − ½ Σ_i α_i |E_i|² (+ optional D3(BJ)); all sums float64.

Forces are not computed here: callers differentiate ``energy`` w.r.t. positions and w.r.t. whatever φ/E
were computed from. In ``train()`` mode the forward is twice differentiable (force losses); in ``eval()``
mode the neighbour contraction (``embedding_bag``) and, for structures above COULOMB_DENSE_MAX atoms, the
Coulomb sum use faster first-order-only kernels, which is what MD needs (a second derivative through them
raises). ``model.double()`` works (shifts stay float64 in every dtype). Cost and memory are O(N) except
the all-pairs ML–ML Coulomb sum (O(N²) time, O(N) memory).
"""
from __future__ import annotations

import math
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from potentials.core.config import build, read_toml
from potentials.core.errors import CalculationFailed, SetupError
from potentials.core.units import COULOMB_EV_ANGSTROM
from potentials.neighbors import neighbor_matrix, structure_layout, structure_pairs
from potentials.network_parts import (D3_WB97M, AtomicShift, ConvSV, _gather_rows,  # noqa: F401 (re-exported)
                                      _import_tad_dftd3, _mlp, _per_structure, _smooth_mixing, _sr_envelope,
                                      d3_energy, nqe)

# Size thresholds of the code paths (measured on CPU; results do not depend on them, only speed).
ALL_PAIRS_MAX = 48                 # structures up to this size: every pair is a neighbour slot
FAST_MIN_PAIRS = 2048              # eval mode: fused neighbour kernel from N*M slots on (else gather + einsum)
_GATHER_BLOCK = 1 << 22            # floats gathered at once in the fused kernel's backward (16 MB: stays in L3)
COULOMB_PAIR_BUDGET = 1 << 18      # Coulomb pair entries held at once (2 MB per float64 array)
COULOMB_DENSE_MAX = 256            # larger structures use the chunked analytic Coulomb sum in eval mode
COULOMB_DENSE_PAIRS = 1 << 21      # beyond N * n_max pairs the dense (twice differentiable) sum is not used
_WORKSPACE = threading.local()


def _symbol(z: int) -> str:
    from ase.data import chemical_symbols
    return chemical_symbols[z] if 0 < z < len(chemical_symbols) else f"Z={z}"


@dataclass
class ModelConfig:
    """All hyperparameters of :class:`EmbeddedAIMNet2` (lengths Å, potentials V, fields V/Å).

    elements : atomic numbers the model knows.
    nfeature, nshifts, ncomb_v : embedding channels F, radial shells S, vector combinations H.
    cutoff, rmin : radial basis range (Å); ``coulomb_cutoff`` : range of the short-range Coulomb removal.
    hidden : hidden layer sizes of each pass MLP (one list per pass, ≥ 2 passes).
    aim_size, out_hidden : AIM vector size and the readout MLP's hidden sizes.
    embedding : feed φ and E (False: vacuum model, φ/E ignored entirely).
    field_channels : number of learned contractions v·E fed to each pass.
    phi_scale, field_scale : fixed scales (V, V/Å) bringing φ−φ̄ and E to O(1) at the pass inputs.
    alpha_scale : polarisability of a neutral readout (α = alpha_scale · softplus(x)), e·Å²/V.
    d3, d3_params : add D3(BJ) dispersion (tad-dftd3) with these s6, s8, a1, a2 (a2 in Bohr).
    pol_damping : width a (Å) of the short-range damping of the MM field in the polarisation term (callers
        pass ``efield_pol`` = E minus :func:`potentials.electrostatics.damped_field_excess`); 0: the bare field.
    """

    elements: list[int]
    nfeature: int = 16
    nshifts: int = 16
    ncomb_v: int = 12
    cutoff: float = 5.0
    rmin: float = 0.8
    hidden: list[list[int]] = field(default_factory=lambda: [[512, 380], [512, 380], [512, 380, 380]])
    aim_size: int = 256
    out_hidden: list[int] = field(default_factory=lambda: [128, 128])
    coulomb_cutoff: float = 4.6
    embedding: bool = True
    field_channels: int = 16
    phi_scale: float = 1.0
    field_scale: float = 1.0
    alpha_scale: float = 0.1
    d3: bool = False
    d3_params: dict[str, float] = field(default_factory=lambda: dict(D3_WB97M))
    pol_damping: float = 0.0

    def __post_init__(self):
        self.elements = [int(z) for z in self.elements]
        self.hidden = [[int(h) for h in layer] for layer in self.hidden]
        self.out_hidden = [int(h) for h in self.out_hidden]
        self.d3_params = {k: float(v) for k, v in self.d3_params.items()}
        bad = [z for z in self.elements if not 1 <= z <= 118]
        if not self.elements or bad or len(set(self.elements)) != len(self.elements):
            raise SetupError(f"model config: 'elements' must be distinct atomic numbers 1..118, got {self.elements}")
        for name in ("nfeature", "nshifts", "ncomb_v", "aim_size"):
            if getattr(self, name) < 1:
                raise SetupError(f"model config: '{name}' must be >= 1, got {getattr(self, name)}")
        if self.field_channels < 0:
            raise SetupError(f"model config: 'field_channels' must be >= 0, got {self.field_channels}")
        if len(self.hidden) < 2 or any(not layer or min(layer) < 1 for layer in self.hidden):
            raise SetupError(f"model config: 'hidden' needs >= 2 passes of positive sizes, got {self.hidden}")
        if not 0 <= self.rmin < self.cutoff or not 0 < self.coulomb_cutoff <= self.cutoff:
            raise SetupError(f"model config: need 0 <= rmin < cutoff and 0 < coulomb_cutoff <= cutoff "
                             f"(rmin={self.rmin}, cutoff={self.cutoff}, coulomb_cutoff={self.coulomb_cutoff})")
        if self.pol_damping < 0:
            raise SetupError(f"model config: 'pol_damping' must be >= 0 (Å), got {self.pol_damping}")
        if min(self.phi_scale, self.field_scale, self.alpha_scale) <= 0:
            raise SetupError("model config: phi_scale, field_scale and alpha_scale must be > 0")
        unknown = set(self.d3_params) - set(D3_WB97M)
        if unknown:
            raise SetupError(f"model config: unknown d3_params {sorted(unknown)}; valid: {sorted(D3_WB97M)}")

    @classmethod
    def from_dict(cls, d: dict, where: str = "model config") -> ModelConfig:
        """Build from a plain dict (:func:`potentials.core.config.build`): unknown keys, wrong types and a
        missing ``elements`` raise SetupError naming ``where`` and the key (and the checks of
        ``__post_init__`` name ``where`` too)."""
        try:
            return build(cls, d, where)
        except SetupError as exc:
            msg = str(exc)
            if where == "model config" or not msg.startswith("model config:"):
                raise
            raise SetupError(where + msg[len("model config"):]) from None

    @classmethod
    def from_toml(cls, path: str | Path, **overrides) -> ModelConfig:
        """Read a preset such as inputs/models/configs/small.toml; ``overrides`` replace its keys."""
        d = read_toml(path, "model config")
        d.update(overrides)
        return cls.from_dict(d, where=f"model config {path}")

    def to_dict(self) -> dict:
        return asdict(self)


class _NeighborSum(torch.autograd.Function):
    """``out[s,i,d] = Σ_m gs[s,i,m] ang[i,d,m] · table[s, nb[i,m]]`` with a fused gather-and-sum.

    table [S, N+1, C] (row N is a zero dummy), radial weights gs [S, N, M] (zero on padding slots),
    angular factors ang [N, 4, M] (1, u_x, u_y, u_z), nb [N, M] (fill N); out [S, N, 4, C].
    One ``embedding_bag`` per shell (bags = (atom, component)); the [S, N, 4, M] weights exist only one
    shell at a time. The backward w.r.t. ``table`` uses that the list is full and u_ij = −u_ji: the
    transpose of the sum is again a neighbour sum over each atom's own row (sign-flipped vector parts),
    so no scatter is needed. First order only.
    """

    @staticmethod
    def forward(ctx, table: Tensor, gs: Tensor, ang: Tensor, nb: Tensor) -> Tensor:
        n_s, n, m = gs.shape
        n_d = ang.shape[1]
        idx = nb.repeat_interleave(n_d, dim=0)                                # [N*4, M], bag = (i, d)
        out = table.new_empty(n_s, n, n_d, table.shape[2])
        for s in range(n_s):
            w = (gs[s, :, None, :] * ang).view(n * n_d, m)
            out[s] = F.embedding_bag(idx, table[s], per_sample_weights=w, mode="sum").view(n, n_d, -1)
        ctx.save_for_backward(table, gs, ang, nb)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        table, gs, ang, nb = ctx.saved_tensors
        grad = grad.contiguous()                     # arrives permuted; strided bmm operands are slow
        n_s, n, n_d, n_c = grad.shape
        m = nb.shape[1]
        need_t, need_g, need_a = ctx.needs_input_grad[:3]
        g_table = torch.zeros_like(table) if need_t else None
        g_gs = torch.empty_like(gs) if need_g else None
        g_ang = torch.zeros_like(ang) if need_a else None
        if need_t:
            off = torch.arange(n_d, device=nb.device, dtype=nb.dtype) * (n + 1)
            idx_t = (nb[:, None, :] + off[:, None]).reshape(n, n_d * m)          # bag i: entries (d, m)
            sign = torch.ones(n_d, 1, 1, dtype=grad.dtype, device=grad.device)
            sign[1:] = -1.0
        for s in range(n_s):
            w = gs[s, :, None, :] * ang                                          # [N, 4, M]
            if need_t:
                g_s = torch.cat([grad[s].permute(1, 0, 2), grad.new_zeros(n_d, 1, n_c)], 1) * sign
                g_table[s, :n] = F.embedding_bag(idx_t, g_s.reshape(n_d * (n + 1), n_c),
                                                 per_sample_weights=w.view(n, n_d * m), mode="sum")
        if need_g or need_a:
            # d out / d weight: per pair, the dot product of grad[s, i, d] with table[s, j]; the neighbour rows
            # of all shells are gathered at once, in atom blocks, into a reused buffer (fresh multi-MB
            # allocations cost page faults on every call)
            rows = table.permute(1, 0, 2).reshape(n + 1, n_s * n_c)
            step = max(1, _GATHER_BLOCK // max(m * n_s * n_c, 1))
            buf = _workspace(table, min(step, n) * m * n_s * n_c)
            for lo in range(0, n, step):
                hi = min(n, lo + step)
                a_j = buf[:(hi - lo) * m * n_s * n_c].view((hi - lo) * m, n_s * n_c)
                torch.index_select(rows, 0, nb[lo:hi].reshape(-1), out=a_j)
                a_j = a_j.view(hi - lo, m, n_s, n_c)
                for s in range(n_s):
                    g_w = torch.bmm(grad[s, lo:hi], a_j[:, :, s].transpose(1, 2))    # [B, 4, M]
                    if need_g:
                        torch.sum(g_w * ang[lo:hi], 1, out=g_gs[s, lo:hi])
                    if need_a:
                        g_ang[lo:hi].addcmul_(g_w, gs[s, lo:hi, None, :])
        return g_table, g_gs, g_ang, None


def _workspace(like: Tensor, numel: int) -> Tensor:
    """A flat scratch buffer of at least ``numel`` elements, kept per thread, device and dtype, and reused."""
    cache = _WORKSPACE.__dict__.setdefault("buffers", {})
    key = (like.device, like.dtype)
    buf = cache.get(key)
    if buf is None or buf.numel() < numel:
        buf = cache[key] = like.new_empty(numel)
    return buf


def neighbor_sum(a: Tensor, nb: Tensor, gs: Tensor, ang: Tensor, fast: bool) -> Tensor:
    """``avf[i,d,c,s] = Σ_m a[nb[i,m], c, s] · gs[s,i,m] · ang[i,d,m]``: a [N,C,S] -> [N,4,C,S].

    ``fast`` allows the fused first-order kernel (used for N*M >= FAST_MIN_PAIRS); otherwise a
    twice-differentiable gather + einsum.
    """
    n, n_c, n_s = a.shape
    if fast and nb.numel() >= FAST_MIN_PAIRS:
        table = torch.cat([a.permute(2, 0, 1), a.new_zeros(n_s, 1, n_c)], dim=1)   # [S, N+1, C]
        return _NeighborSum.apply(table, gs, ang, nb).permute(1, 2, 3, 0)
    a_j = torch.cat([a, a.new_zeros(1, n_c, n_s)])[nb]                              # [N, M, C, S]
    w = gs.transpose(0, 1)[:, :, None, :] * ang[:, None]                           # [N, S, 4, M]
    return torch.einsum("nmcs,nsdm->ndcs", a_j, w)


def _coulomb_dense(q: Tensor, pos: Tensor, mol_idx: Tensor, n_structures: int) -> Tensor:
    """½ k Σ_{i≠j in structure} q_i q_j / r over all pairs, plain autograd (twice differentiable)."""
    n = q.shape[0]
    cand = structure_pairs(mol_idx, n_structures)                        # [N, n_max]
    valid = cand < n
    d = torch.cat([pos, pos.new_zeros(1, 3)])[cand] - pos[:, None]
    d = torch.where(valid[..., None], d, torch.ones_like(d))
    inv_r = torch.where(valid, 1.0 / d.norm(dim=-1), torch.zeros_like(valid, dtype=pos.dtype))
    qj = torch.cat([q, q.new_zeros(1)])[cand]
    return _per_structure(0.5 * COULOMB_EV_ANGSTROM * q * (qj * inv_r).sum(1), mol_idx, n_structures)


class _CoulombChunked(torch.autograd.Function):
    """Same energy as :func:`_coulomb_dense` for large structures: O(chunk) memory, each pair visited once.

    Row blocks of one structure against the columns from the block on (the block itself in both orders,
    the later columns once, accumulated into rows and columns); squared distances by one matrix product.
    Gradients are accumulated in the forward (cheaper than a recomputing backward). First order only.
    """

    @staticmethod
    def forward(ctx, q: Tensor, pos: Tensor, mol_idx: Tensor, start: Tensor, count: Tensor):
        n, k = q.shape[0], COULOMB_EV_ANGSTROM
        x = pos - pos.mean(0)                           # smaller coordinates: better |xi|²+|xj|²-2xi.xj
        sq = x.square().sum(1)
        qx = torch.cat([q[:, None], q[:, None] * x], 1)                   # [N, 4]: q_j, q_j x_j
        pot = torch.zeros_like(q)                                          # Σ_j q_j / r_ij
        acc = torch.zeros_like(qx)                                         # Σ_j (q_j, q_j x_j) / r_ij³
        end = (start + count).tolist()
        lo = 0
        while lo < n:
            stop = end[int(mol_idx[lo])]
            hi = min(stop, lo + max(1, COULOMB_PAIR_BUDGET // (stop - lo)))
            r_ = hi - lo
            d2 = torch.addmm(sq[lo:hi, None] + sq[None, lo:stop], x[lo:hi], x[lo:stop].T, alpha=-2.0)
            d2.diagonal().fill_(1.0)                                       # self pairs, zeroed below
            inv = d2.rsqrt_()
            inv.diagonal().zero_()
            cube = inv.pow(3)
            pot[lo:hi] += inv @ q[lo:stop]
            acc[lo:hi] += cube @ qx[lo:stop]
            if stop > hi:                                                  # later columns: the other order
                pot[hi:stop] += inv[:, r_:].T @ q[lo:hi]
                acc[hi:stop] += cube[:, r_:].T @ qx[lo:hi]
            lo = hi
        energy = q.new_zeros(start.shape[0]).index_add_(0, mol_idx, 0.5 * k * q * pot)
        dpos = -k * q[:, None] * (x * acc[:, :1] - acc[:, 1:])             # dE/dx_i = -k q_i Σ q_j (x_i-x_j)/r³
        ctx.save_for_backward(k * pot, dpos, mol_idx)
        return energy

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        dq, dpos, mol_idx = ctx.saved_tensors
        g = grad[mol_idx]
        return g * dq, g[:, None] * dpos, None, None, None


def coulomb_energy(q: Tensor, pos: Tensor, nb: Tensor, mol_idx: Tensor, n_structures: int, rc: float,
                   first_order: bool = False, complete: bool = False) -> Tensor:
    """ML–ML Coulomb energy per structure (eV), float64: ½ k Σ_{i≠j} q_i q_j (1 − f(r_ij)) / r_ij.

    q [N] e, pos [N,3] Å, nb a neighbour matrix holding every pair closer than ``rc`` (``complete``: every
    pair of each structure). Unless complete, the 1/r part runs over all pairs of each structure and the
    short-range envelope part over ``nb`` (autograd). The 1/r part is chunked and analytic (first order
    only) for structures above COULOMB_DENSE_MAX atoms when ``first_order``, and whenever the dense pair
    table would exceed COULOMB_DENSE_PAIRS entries.
    """
    q, pos = q.to(torch.float64), pos.to(torch.float64)
    n = q.shape[0]
    valid = nb < n
    d = _gather_rows(pos, nb) - pos[:, None]
    r = torch.where(valid[..., None], d, torch.ones_like(d)).norm(dim=-1)
    qj = _gather_rows(q, nb)
    f = _sr_envelope(r, rc)
    pair = torch.where(valid, ((1.0 - f) if complete else -f) / r, torch.zeros_like(r))
    part = _per_structure(0.5 * COULOMB_EV_ANGSTROM * q * (qj * pair).sum(1), mol_idx, n_structures)
    if complete:
        return part
    start, count = structure_layout(mol_idx, n_structures)
    n_max = int(count.max())
    if n * n_max > COULOMB_DENSE_PAIRS or (first_order and n_max > COULOMB_DENSE_MAX):
        return _CoulombChunked.apply(q, pos, mol_idx, start, count) + part
    return _coulomb_dense(q, pos, mol_idx, n_structures) + part


class EmbeddedAIMNet2(nn.Module):
    """AIMNet2-style network with electrostatic embedding. See the module docstring for the physics."""

    def __init__(self, config: ModelConfig, seed: int = 0):
        super().__init__()
        if not isinstance(config, ModelConfig):
            raise SetupError(f"EmbeddedAIMNet2 needs a ModelConfig, got {type(config).__name__}")
        self.config = c = config
        self.metadata: dict = {}
        gen = torch.Generator().manual_seed(seed)
        nel, nf, ns, nh = len(c.elements), c.nfeature, c.nshifts, c.ncomb_v
        z2s = torch.full((119,), -1, dtype=torch.long)
        z2s[torch.tensor(c.elements)] = torch.arange(nel)
        self.register_buffer("species_of_z", z2s, persistent=False)
        shifts = torch.linspace(c.rmin, c.cutoff, ns + 1)[:ns]
        self.register_buffer("shifts", shifts, persistent=False)
        self.eta = (ns / (c.cutoff - c.rmin)) ** 2                          # Å^-2, one width for all shells
        emb = torch.empty(nel, nf)
        nn.init.orthogonal_(emb, generator=gen)
        self.embedding = nn.Parameter(emb[:, :, None].expand(nel, nf, ns).contiguous())   # [E, F, S]
        self.conv_a = ConvSV(nf, ns, nh, gen)
        self.conv_q = ConvSV(1, ns, nh, gen)
        n_a, n_conv_a, n_conv_q = nf * ns, nf * ns + nf * nh, ns + nh
        self.n_passes = len(c.hidden)
        n_field = c.field_channels + 2 if c.embedding else 0
        self.field_mix = nn.ModuleList()          # per pass: learned mixtures of the v·E contractions
        self.passes = nn.ModuleList()
        for p, hidden in enumerate(c.hidden):
            if c.embedding:
                n_vec = nf * nh + (nh if p > 0 else 0)
                mix = nn.Linear(n_vec, c.field_channels, bias=False)
                nn.init.normal_(mix.weight, generator=gen, std=1.0 / math.sqrt(n_vec))
                self.field_mix.append(mix)
            n_in = n_a + n_conv_a + (1 + n_conv_q if p > 0 else 0) + n_field
            last = p == self.n_passes - 1
            n_out = c.aim_size if last else 2 + n_a
            self.passes.append(_mlp(n_in, hidden, n_out, last_activation=p > 0, gen=gen))
        self.output = _mlp(c.aim_size, c.out_hidden, 2, last_activation=False, gen=gen)   # energy, polarisability
        if c.d3:
            _import_tad_dftd3()
        self.shift = AtomicShift(nel)

    # ------------------------------------------------------------------ checks
    def check_numbers(self, numbers) -> None:
        """Raise SetupError naming the atomic numbers the model does not know (and the ones it knows)."""
        zs = sorted({int(z) for z in torch.as_tensor(numbers).reshape(-1).tolist()})
        unknown = [z for z in zs if z not in self.config.elements]
        if unknown:
            names = ", ".join(f"{_symbol(z)} (Z={z})" for z in unknown)
            known = " ".join(_symbol(z) for z in self.config.elements)
            raise SetupError(f"the network model does not know element(s) {names}; it knows {known}. "
                             "Use a model trained on these elements or move those atoms to the MM zone")

    def _check_inputs(self, numbers, positions, mol_idx, charge, phi, efield) -> None:
        n = numbers.shape[0]
        if positions.shape != (n, 3) or mol_idx.shape != (n,) or charge.dim() != 1:
            raise SetupError(f"network inputs: need numbers [N], positions [N,3], mol_idx [N], charge [B]; got "
                             f"{tuple(numbers.shape)}, {tuple(positions.shape)}, {tuple(mol_idx.shape)}, "
                             f"{tuple(charge.shape)}")
        if (phi is not None and phi.shape != (n,)) or (efield is not None and efield.shape != (n, 3)):
            raise SetupError(f"network inputs: phi must be [N] and efield [N,3] with N={n}")
        if n and (int(mol_idx[0]) < 0 or int(mol_idx[-1]) >= charge.shape[0]
                  or bool((mol_idx[1:] < mol_idx[:-1]).any())):
            raise SetupError(f"network inputs: mol_idx must be sorted and within 0..{charge.shape[0] - 1}")
        if not bool(torch.isfinite(positions).all()):
            raise CalculationFailed("network inputs: ML positions contain NaN or inf (exploded structure?)")

    # ------------------------------------------------------------------ pieces
    def _geometry(self, pos: Tensor, nb: Tensor) -> tuple[Tensor, Tensor]:
        """Radial basis gs [S, N, M] = g_s(r_ij) f_c(r_ij) and angular factors ang [N, 4, M] = (1, u_ij)."""
        n = pos.shape[0]
        valid = nb < n
        d = _gather_rows(pos, nb) - pos[:, None]                              # [N, M, 3]
        d = torch.where(valid[..., None], d, torch.ones_like(d))              # padding: r = sqrt(3), finite
        r = d.norm(dim=-1)
        rc = self.config.cutoff
        fc = torch.where(valid & (r < rc), 0.5 * torch.cos(r * (math.pi / rc)) + 0.5, torch.zeros_like(r))
        gs = torch.exp(-self.eta * (r[None] - self.shifts[:, None, None]).square()) * fc
        ang = torch.cat([torch.ones_like(r)[:, None], (d / r[..., None]).transpose(1, 2)], 1)
        return gs, ang

    def _field_inputs(self, phi, efield, mol_idx, n_structures, dtype):
        c = self.config
        phi_c = phi.to(dtype)
        counts = torch.bincount(mol_idx, minlength=n_structures).clamp(min=1).to(dtype)
        phibar = _per_structure(phi_c, mol_idx, n_structures) / counts        # gauge: only φ − φ̄ enters
        e_in = efield.to(dtype) / c.field_scale
        return ((phi_c - phibar.index_select(0, mol_idx)) / c.phi_scale)[:, None], e_in, \
            e_in.square().sum(-1, keepdim=True)

    # ------------------------------------------------------------------ forward
    def forward(self, numbers: Tensor, positions: Tensor, mol_idx: Tensor, charge: Tensor,
                phi: Tensor | None = None, efield: Tensor | None = None,
                efield_pol: Tensor | None = None) -> dict[str, Tensor]:
        """Energies [B] (eV, float64), charges [N] (e, float64) and their parts; see the module docstring.

        numbers [N] long; positions [N,3] Å; mol_idx [N] sorted structure index; charge [B] e;
        phi [N] V and efield [N,3] V/Å of the MM charges at each atom (None: vacuum); efield_pol [N,3] V/Å: the
        short-range-damped field the polarisation term uses (``config.pol_damping``; None: ``efield``).
        """
        c = self.config
        if not torch.jit.is_scripting():
            self._check_inputs(numbers, positions, mol_idx, charge, phi, efield)
        dtype = self.embedding.dtype
        n, n_struct = numbers.shape[0], charge.shape[0]
        zc = numbers.clamp(0, 118)
        species = self.species_of_z[zc]
        if bool(((species < 0) | (zc != numbers)).any()):
            self.check_numbers(numbers)
        pos = positions.to(dtype)
        # small structures: every pair is a neighbour slot (the cutoff functions zero the far ones), which
        # is cheaper than a distance test and lets the Coulomb sum run over the same list
        complete = int(torch.bincount(mol_idx).max()) <= ALL_PAIRS_MAX
        nb = structure_pairs(mol_idx, n_struct) if complete else neighbor_matrix(pos, mol_idx, c.cutoff)
        gs, ang = self._geometry(pos, nb)
        fast = not self.training
        if c.embedding:
            phi = positions.new_zeros(n) if phi is None else phi
            efield = positions.new_zeros(n, 3) if efield is None else efield
            phi_in, e_in, e2_in = self._field_inputs(phi, efield, mol_idx, n_struct, dtype)

        a = self.embedding[species]                                            # [N, F, S]
        q = torch.zeros(n, dtype=torch.float64, device=pos.device)
        nf, ns = c.nfeature, c.nshifts
        aim = a.new_zeros(0)
        for p, mlp in enumerate(self.passes):
            s_a, v2_a, vec_a = self.conv_a(neighbor_sum(a, nb, gs, ang, fast))
            feats = [a.reshape(n, -1), s_a, v2_a]
            vecs = [vec_a]
            if p > 0:
                q_c = q.to(dtype)
                q_j = _gather_rows(q_c, nb)                                         # [N, M]
                avq = torch.bmm(ang * q_j[:, None], gs.permute(1, 2, 0))[:, :, None]  # [N, 4, 1, S]
                s_q, v2_q, vec_q = self.conv_q(avq)
                feats += [q_c[:, None], s_q, v2_q]
                vecs.append(vec_q)
            if c.embedding:
                proj = torch.cat([torch.bmm(e_in[:, None], v)[:, 0] for v in vecs], 1)  # v·E: invariant
                feats += [self.field_mix[p](proj), phi_in, e2_in]
            out = mlp(torch.cat(feats, -1))
            if p < self.n_passes - 1:
                dq, f_raw, da = out.split([1, 1, nf * ns], dim=-1)
                q_tilde = dq[:, 0].to(torch.float64) + (q if p > 0 else 0.0)
                q = nqe(q_tilde, f_raw[:, 0].to(torch.float64), mol_idx, charge)
                a = a + da.reshape(n, nf, ns)
            else:
                aim = out

        head = self.output(aim)
        e_atom = head[:, 0].to(torch.float64) + self.shift(species)
        local = _per_structure(e_atom, mol_idx, n_struct)
        coul = coulomb_energy(q, positions, nb, mol_idx, n_struct, c.coulomb_cutoff, first_order=fast,
                              complete=complete)
        res = {"atomic_energies": e_atom, "charges": q, "local": local, "coulomb": coul}
        energy = local + coul
        if c.embedding:
            alpha = c.alpha_scale * F.softplus(head[:, 1]).to(torch.float64)
            ext = _per_structure(q * phi.to(torch.float64), mol_idx, n_struct)
            e_pol = (efield if efield_pol is None else efield_pol).to(torch.float64)
            pol = _per_structure(-0.5 * alpha * e_pol.square().sum(-1), mol_idx, n_struct)
            res.update(polarisability=alpha, external=ext, polarisation=pol)
            energy = energy + ext + pol
        if c.d3:
            disp = d3_energy(numbers, positions, mol_idx, n_struct, c.d3_params)
            res["dispersion"] = disp
            energy = energy + disp
        res["energy"] = energy
        return res


def field_dipole(model: EmbeddedAIMNet2, numbers: Tensor, positions: Tensor, mol_idx: Tensor, charge: Tensor,
                 create_graph: bool = False) -> Tensor:
    """Dipole μ = −∂E/∂E0 at E0 = 0 (e·Å) per structure [B,3], for a uniform field E0 (φ_i = −E0·r_i).

    Includes the response of the predicted charges (Hellmann–Feynman-like total derivative by autograd).
    """
    n_struct = charge.shape[0]
    e0 = torch.zeros(n_struct, 3, dtype=positions.dtype, device=positions.device, requires_grad=True)
    ef = e0[mol_idx]
    phi = -(ef * positions).sum(-1)
    energy = model(numbers, positions, mol_idx, charge, phi, ef)["energy"]
    (g,) = torch.autograd.grad(energy.sum(), e0, create_graph=create_graph)
    return -g


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())

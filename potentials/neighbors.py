"""Neighbour lists for non-periodic clusters (ML zones), batched over structures.

Structures are given flat: ``positions`` [N,3] and a sorted ``mol_idx`` [N]; pairs never cross structures.
All functions return a padded neighbour matrix ``nbmat`` [N, M] (long) whose row ``i`` lists the atoms ``j``
paired with ``i``; empty slots hold ``N`` (the index of a dummy row callers append to their per-atom
tensors). Lists are *full* (``j`` in row ``i`` implies ``i`` in row ``j``) and never contain ``i`` itself.

Index computation is discrete and runs without gradients; callers recompute distances with gradients
from the indices. Two algorithms, both vectorised torch (any device, no Python loop over atoms):

* dense: every pair inside each structure, O(N * n_max) work; best for small structures (beads, frames);
* cell list: atoms binned in cubic cells of edge ``cutoff``, candidates from the 27 surrounding cells,
  O(N) work; used when the largest structure exceeds ``dense_max`` atoms (whole-protein ML zones).
"""
from __future__ import annotations

import torch
from torch import Tensor

DENSE_MAX = 768         # largest structure handled by the dense path (measured crossover on CPU ~ 500-1000)
_CHUNK = 1 << 18        # candidate pairs evaluated at once (a few MB of temporaries: stays in cache)


def structure_layout(mol_idx: Tensor, n_structures: int | None = None) -> tuple[Tensor, Tensor]:
    """First atom and atom count of each structure: (start [B], count [B]), long, same device."""
    nb = int(mol_idx[-1]) + 1 if n_structures is None else n_structures
    count = torch.bincount(mol_idx, minlength=nb)
    start = torch.cumsum(count, 0) - count
    return start, count


def structure_pairs(mol_idx: Tensor, n_structures: int | None = None) -> Tensor:
    """All other atoms of the same structure for each atom: [N, n_max] long, padded with N (O(N * n_max))."""
    n = mol_idx.numel()
    start, count = structure_layout(mol_idx, n_structures)
    n_max = int(count.max()) if n else 0
    k = torch.arange(n_max, device=mol_idx.device)
    cand = start[mol_idx, None] + k                               # [N, n_max]
    self_ = torch.arange(n, device=mol_idx.device)[:, None]
    valid = (k < count[mol_idx, None]) & (cand != self_)
    return torch.where(valid, cand, n)


def _compact(cand: Tensor, keep: Tensor, n: int, width: int | None = None) -> Tensor:
    """Pack the kept candidates of each row to the left: [R, C] -> [R, M], fill n."""
    per_row = keep.sum(1)
    m = max(int(per_row.max()) if keep.numel() else 0, 1) if width is None else width
    slot = torch.where(keep, torch.cumsum(keep, 1) - 1, m)        # dropped candidates go to a spill column
    out = torch.full((cand.shape[0], m + 1), n, dtype=torch.long, device=cand.device)
    out.scatter_(1, slot, torch.where(keep, cand, n))
    return out[:, :m]


def _merge(rows: list[Tensor], n: int) -> Tensor:
    """Concatenate row blocks of different widths, padding with n."""
    m = max(r.shape[1] for r in rows)
    return torch.cat([torch.nn.functional.pad(r, (0, m - r.shape[1]), value=n) for r in rows])


@torch.no_grad()
def dense_neighbors(positions: Tensor, mol_idx: Tensor, cutoff: float) -> Tensor:
    """Neighbour matrix by testing every pair inside each structure. See the module docstring."""
    n = positions.shape[0]
    cand = structure_pairs(mol_idx)                               # [N, n_max]
    pos = torch.cat([positions, positions.new_zeros(1, 3)])
    rows = []
    step = max(1, _CHUNK // max(cand.shape[1], 1))
    for lo in range(0, max(n, 1), step):
        c = cand[lo:lo + step]
        d2 = (pos[c] - positions[lo:lo + step, None]).square().sum(-1)
        rows.append(_compact(c, (c < n) & (d2 < cutoff * cutoff), n))
    return _merge(rows, n)


@torch.no_grad()
def cell_neighbors(positions: Tensor, mol_idx: Tensor, cutoff: float) -> Tensor:
    """Neighbour matrix from a cell list (cells of edge ``cutoff``, 27-cell stencil). O(N)."""
    n, dev = positions.shape[0], positions.device
    pos = positions
    nstruct = int(mol_idx[-1]) + 1
    lo = torch.full((nstruct, 3), float("inf"), dtype=pos.dtype, device=dev).scatter_reduce(
        0, mol_idx[:, None].expand(-1, 3), pos, "amin")
    cell = ((pos - lo[mol_idx]) / cutoff).floor().long() + 1     # margin of one empty cell on each side
    dims = cell.max(0).values + 2                                 # same grid shape for every structure
    key = ((mol_idx * dims[0] + cell[:, 0]) * dims[1] + cell[:, 1]) * dims[2] + cell[:, 2]
    key_sorted, order = torch.sort(key)
    cells, count = torch.unique_consecutive(key_sorted, return_counts=True)
    first = torch.cumsum(count, 0) - count
    k_max = int(count.max())
    r = torch.arange(-1, 2, device=dev)
    stencil = ((r[:, None, None] * dims[1] + r[None, :, None]) * dims[2] + r[None, None, :]).reshape(-1)
    k = torch.arange(k_max, device=dev)
    cut2 = cutoff * cutoff
    rows = []
    step = max(1, _CHUNK // (27 * k_max))
    for a in range(0, n, step):
        b = min(a + step, n)
        nkey = key[a:b, None] + stencil                           # [R, 27] keys of the surrounding cells
        at = torch.searchsorted(cells, nkey).clamp(max=len(cells) - 1)
        found = cells[at] == nkey
        slot = first[at][..., None] + k                           # [R, 27, k_max] positions in sorted order
        valid = (k < torch.where(found, count[at], 0)[..., None]).reshape(b - a, -1)
        cand = order[slot.reshape(b - a, -1).clamp(max=n - 1)]
        d2 = (pos[cand] - pos[a:b, None]).square().sum(-1)
        me = torch.arange(a, b, device=dev)[:, None]
        rows.append(_compact(cand, valid & (d2 < cut2) & (cand != me), n))
    return _merge(rows, n)


def neighbor_matrix(positions: Tensor, mol_idx: Tensor, cutoff: float, dense_max: int | None = None) -> Tensor:
    """Padded neighbour matrix [N, M] (long, fill N) of pairs closer than ``cutoff`` within each structure.

    Parameters
    ----------
    positions : [N, 3] tensor, any length unit (the same as ``cutoff``; Å in the network)
    mol_idx : [N] long tensor, structure of each atom, sorted ascending
    cutoff : float
    dense_max : int, default DENSE_MAX
        Structures of at most this many atoms use the dense path; larger ones the cell list.
    """
    dense_max = DENSE_MAX if dense_max is None else dense_max
    if positions.shape[0] == 0:
        return torch.zeros(0, 1, dtype=torch.long, device=positions.device)
    n_max = int(torch.bincount(mol_idx).max())
    if n_max <= dense_max:
        return dense_neighbors(positions.detach(), mol_idx, cutoff)
    return cell_neighbors(positions.detach(), mol_idx, cutoff)

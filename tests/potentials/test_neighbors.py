"""Neighbour lists: dense and cell-list paths against brute force (scipy k-d tree)."""
import numpy as np
import pytest
import torch
from scipy.spatial import cKDTree

from potentials.neighbors import (cell_neighbors, dense_neighbors, neighbor_matrix, structure_layout,
                                  structure_pairs)


def _structures(sizes, seed=0, density=0.1):
    """Random clusters at liquid density (atoms/Å³), flat with a sorted mol_idx; some exact duplicates."""
    g = torch.Generator().manual_seed(seed)
    pos, mol = [], []
    for b, n in enumerate(sizes):
        side = (n / density) ** (1 / 3)
        x = torch.rand(n, 3, generator=g, dtype=torch.float64) * side + 37.0 * b   # structures overlap in space
        pos.append(x)
        mol.append(torch.full((n,), b))
    return torch.cat(pos), torch.cat(mol)


def _pairs(nb):
    n = nb.shape[0]
    i = torch.arange(n)[:, None].expand_as(nb)
    keep = nb < n
    return set(zip(i[keep].tolist(), nb[keep].tolist()))


def _brute(pos, mol, cutoff):
    out = set()
    for b in mol.unique().tolist():
        idx = torch.nonzero(mol == b)[:, 0].numpy()
        tree = cKDTree(pos[idx].numpy())
        for i, j in tree.query_pairs(cutoff - 1e-12, output_type="ndarray"):
            out |= {(int(idx[i]), int(idx[j])), (int(idx[j]), int(idx[i]))}
    return out


@pytest.mark.parametrize("sizes", [[1], [7, 1, 30], [300], [50, 400, 2]])
@pytest.mark.parametrize("method", [dense_neighbors, cell_neighbors])
def test_matches_brute_force(sizes, method):
    pos, mol = _structures(sizes, seed=len(sizes))
    nb = method(pos, mol, 5.0)
    assert nb.dtype == torch.long and nb.shape[0] == len(pos) and nb.shape[1] >= 1
    assert _pairs(nb) == _brute(pos, mol, 5.0)
    assert not (nb == torch.arange(len(pos))[:, None]).any()             # never itself


def test_cell_list_float32_and_sparse_cluster():
    # an elongated, sparse cluster (many empty cells) in float32
    g = torch.Generator().manual_seed(3)
    pos = torch.rand(500, 3, generator=g) * torch.tensor([300.0, 12.0, 12.0])
    mol = torch.zeros(500, dtype=torch.long)
    nb = cell_neighbors(pos, mol, 4.0)
    assert _pairs(nb) == _brute(pos.double(), mol, 4.0)


def test_dispatch_and_structure_helpers():
    pos, mol = _structures([20, 5])
    assert _pairs(neighbor_matrix(pos, mol, 5.0, dense_max=0)) == _pairs(neighbor_matrix(pos, mol, 5.0))
    start, count = structure_layout(mol)
    assert start.tolist() == [0, 20] and count.tolist() == [20, 5]
    allp = structure_pairs(mol)
    assert allp.shape == (25, 20)
    assert _pairs(allp) == {(i, j) for i in range(25) for j in range(25) if i != j and (i < 20) == (j < 20)}
    assert neighbor_matrix(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long), 5.0).shape == (0, 1)


def test_positions_with_grad_are_not_tracked():
    pos, mol = _structures([40])
    pos.requires_grad_()
    nb = neighbor_matrix(pos, mol, 5.0)
    assert not nb.requires_grad and np.isfinite(nb.numpy()).all()

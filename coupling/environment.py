"""The static description of the MM point charges the embedding draws from (numpy only: the MM client imports
it without torch). The embedding itself is :mod:`coupling.embedding`."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from potentials.core.errors import SetupError
from potentials.core.spec import CouplingSpec


@dataclass(frozen=True)
class MMEnvironment:
    """Static description of the MM point charges, read once from the OpenMM system.

    charges: (n_atoms,) partial charges (e) of every atom of the system (ML entries are ignored).
    residue: (n_atoms,) residue id of every atom.
    ml_indices: (n_ml,) atom indices of the ML zone.
    cutoff, switch_width: nm.
    """

    charges: np.ndarray
    residue: np.ndarray
    ml_indices: np.ndarray
    cutoff: float = CouplingSpec.cutoff_nm
    switch_width: float = CouplingSpec.switch_width_nm

    def __post_init__(self):
        n = len(self.charges)
        if len(self.residue) != n:
            raise SetupError(f"charges ({n}) and residue ids ({len(self.residue)}) differ in length")
        if len(self.ml_indices) == 0:
            raise SetupError("the ML zone is empty; give a selection that matches at least one atom")
        if not 0.0 <= self.switch_width <= self.cutoff:
            raise SetupError(f"switch width {self.switch_width} nm must lie in [0, cutoff={self.cutoff} nm]")
        is_ml = np.zeros(n, bool)
        is_ml[self.ml_indices] = True
        # MM atoms only, grouped: residues that contain ML atoms keep their MM atoms as their own group
        mm = np.flatnonzero(~is_ml)
        groups, gid = np.unique(self.residue[mm], return_inverse=True)
        order = np.argsort(gid, kind="stable")
        object.__setattr__(self, "_mm_atoms", mm[order])            # MM atoms sorted by group
        object.__setattr__(self, "_mm_group", gid[order])           # group id of each
        counts = np.bincount(gid, minlength=len(groups))
        object.__setattr__(self, "_group_start", np.concatenate([[0], np.cumsum(counts)]))
        object.__setattr__(self, "_n_groups", len(groups))

    @property
    def n_groups(self) -> int:
        return self._n_groups

"""The ML-zone seam: which system atoms the model sees, as which atoms, and how its forces come back.

A zone mapping turns the positions of its system atoms (``zone.atoms``) into the model's atoms
(``model_positions``, differentiable in torch), so the model's forces reach the system atoms by the chain rule
(autograd through ``model_positions``). Whole molecules are the identity. A zone may add model atoms that
are not system atoms (the caps of :mod:`coupling.link_atoms`): :meth:`WholeMolecules.extend` appends them to
the positions, :meth:`WholeMolecules.environment` makes them ML atoms of the embedding, and
:meth:`WholeMolecules.fold` moves their forces back onto system atoms. A new mapping is one class plus
``@ZONES.register(name)``, chosen by ``[ml] zone``.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:                                    # torch is imported where it is used: the MM client
    import torch                                     # builds its system with this module and no torch

from potentials.core.errors import SetupError
from potentials.core.registry import Registry

log = logging.getLogger(__name__)

ZONES: Registry = Registry("ML-zone mapping")


@ZONES.register("whole-molecules")
class WholeMolecules:
    """Identity mapping: the model's atoms are the ML atoms themselves (the selection cuts no bond).

    atoms : (n,) system indices of the ML atoms, in model order; numbers : (n,) their atomic numbers.
    """

    name = "whole-molecules"

    def __init__(self, atoms, numbers):
        self.atoms = np.asarray(atoms, dtype=np.int64).reshape(-1)
        self.numbers = np.asarray(numbers, dtype=np.int64).reshape(-1)
        if len(self.atoms) != len(self.numbers):
            raise SetupError(f"{len(self.numbers)} atomic numbers for {len(self.atoms)} ML atoms")

    @classmethod
    def from_topology(cls, topology, ml_indices) -> "WholeMolecules":
        """The zone of ``ml_indices`` with the elements of an OpenMM topology (SetupError if it cuts a bond)."""
        from coupling.selection import check_boundary

        check_boundary(topology, ml_indices)
        return cls(ml_indices, ml_numbers(topology, ml_indices))

    @classmethod
    def from_numbers(cls, ml_indices, numbers) -> "WholeMolecules":
        return cls(ml_indices, numbers)

    @property
    def n_model(self) -> int:
        """Number of model atoms."""
        return len(self.numbers)

    @property
    def model_indices(self) -> np.ndarray:
        """The model's atoms as indices of the extended system (:meth:`extend`): here the ML atoms."""
        return self.atoms

    @property
    def n_extra(self) -> int:
        """Model atoms that are not system atoms (appended after the N system atoms by :meth:`extend`)."""
        return 0

    def cut_pairs(self) -> set[tuple[int, int]]:
        """The covalent bonds the zone caps, as (ML atom, MM atom) pairs: none (it cuts no bond)."""
        return set()

    def extend(self, positions: np.ndarray, box: np.ndarray | None) -> np.ndarray:
        """The positions (N + n_extra, 3) nm of the system's atoms followed by the zone's extra atoms."""
        return positions

    def fold(self, forces: np.ndarray) -> np.ndarray:
        """Forces (N, 3) on the system's atoms from those (N + n_extra, 3) of the extended system."""
        return forces

    def environment(self, env, ml_charge: int | None = None):
        """The embedding's :class:`coupling.embedding.MMEnvironment` of the extended system."""
        return env

    def ml_charges(self, model_charges: np.ndarray) -> np.ndarray:
        """Charges (e) of the ML atoms from the model's atomic charges (those of extra atoms go to system atoms)."""
        return np.asarray(model_charges, dtype=np.float64)

    def model_positions(self, positions: torch.Tensor) -> torch.Tensor:
        """The model atoms' positions from the zone atoms' (n, 3) nm (identity)."""
        return positions


def ml_numbers(topology, ml_indices) -> np.ndarray:
    """Atomic numbers of the ML atoms from an OpenMM topology (SetupError for atoms without element)."""
    atoms = list(topology.atoms())
    out = []
    for i in np.asarray(ml_indices).reshape(-1):
        a = atoms[int(i)]
        if a.element is None:
            raise SetupError(f"ML atom {int(i)} ({a.name} of {a.residue.name}{a.residue.id}) has no element "
                             "(a virtual site or an untyped atom); the network needs real atoms")
        out.append(a.element.atomic_number)
    return np.asarray(out, dtype=np.int64)


def _fragments(topology, ml_indices) -> list[tuple[list[int], list[tuple[int, int]] | None]]:
    """The ML zone's covalently bonded fragments (connected components of the bonds among ML atoms), each as
    (atomic numbers, bonds as pairs of indices into them), with one hydrogen per bond it cuts (the link-atom cap,
    bonded to its ML atom). Atoms of residues the structure gives no bonds for fall back to their residue; such a
    fragment's bonds are None (unknown)."""
    ml = [int(i) for i in np.asarray(ml_indices).reshape(-1)]
    inside = set(ml)
    parent = {i: i for i in ml}

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    atoms = list(topology.atoms())
    caps: dict[int, int] = {}
    bonded: set[int] = set()
    pairs: list[tuple[int, int]] = []
    for a, b in topology.bonds():
        ia, ib = a.index in inside, b.index in inside
        if ia and ib:
            parent[root(a.index)] = root(b.index)
            bonded.update((a.index, b.index))
            pairs.append((a.index, b.index))
        elif ia or ib:
            q = a.index if ia else b.index
            caps[q] = caps.get(q, 0) + 1
    by_res: dict[int, int] = {}
    for i in ml:                              # unbonded atoms of one residue (no CONECT records): one fragment
        if i not in bonded:
            r = atoms[i].residue.index
            parent[i] = root(by_res.setdefault(r, i))
    members: dict[int, list[int]] = {}
    for i in ml:
        members.setdefault(root(i), []).append(i)
    out = []
    for group in members.values():
        local = {i: k for k, i in enumerate(group)}
        z = [atoms[i].element.atomic_number if atoms[i].element is not None else 0 for i in group]
        links = [(local[i], local[j]) for i, j in pairs if i in local]
        for i in group:                       # caps: hydrogens bonded to the atom whose bond was cut
            for _ in range(caps.get(i, 0)):
                links.append((local[i], len(z)))
                z.append(1)
        out.append((z, None if any(i not in bonded for i in group) and len(group) > 1 else links))
    return out


def zone_molecules(topology, ml_indices) -> int:
    """Number of molecules (covalently bonded fragments, capped ones included) in the ML zone."""
    return len(_fragments(topology, ml_indices))


def zone_formulas(topology, ml_indices, charge: int) -> list[tuple[str, int | None, str | None]]:
    """(Hill formula, charge, bond-graph key) of each molecule (bonded fragment, with its link-atom caps) of the
    ML zone; the charge is the zone's when it holds one molecule, else None (the force field's per-residue
    charges are not the model's business); the key (:func:`potentials.domain.graph_key`) is None where the
    structure gives no bonds."""
    from potentials.domain import formula, graph_key

    frags = _fragments(topology, ml_indices)
    one = len(frags) == 1
    return [(formula(z), int(charge) if one else None, None if links is None else graph_key(z, links))
            for z, links in frags]


def warn_new_domain(metadata: dict, topology, ml_indices, charge: int, where: str = "model") -> list[str]:
    """One warning line naming what the ML zone has that the model's training data did not (its metadata
    ``domain``, :func:`potentials.domain.domain_news`); returns the items (empty: inside the domain, or no
    record)."""
    from potentials.domain import domain_news

    n_model = sum(len(z) for z, _ in _fragments(topology, ml_indices))         # link-atom caps included
    news = domain_news((metadata or {}).get("domain") or {}, zone_formulas(topology, ml_indices, charge), n_model)
    if news:
        seen = ", ".join(m["formula"] + (f" ({m['charge']:+d})" if m["charge"] is not None else "")
                         for m in metadata["domain"].get("molecules", []))
        log.warning("%s was not trained on %s (its training molecules: %s); expect larger errors there and "
                    "check the run, or train a model for this system", where, "; ".join(news), seen)
    return news


# mappings in their own modules, imported (and registered) on the first look-up of their name: they build on
# WholeMolecules, so importing them here would make a cycle
ZONES.register_lazy("link-atoms", "coupling.link_atoms")

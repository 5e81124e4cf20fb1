"""The ML-zone seam: which system atoms the model sees, as which atoms, and how its forces come back.

A zone mapping turns the positions of its system atoms (``zone.atoms``) into the model's atoms
(``model_positions``, differentiable in torch), so the model's forces reach the system atoms by the chain rule
(autograd through ``model_positions``). Today's zones are whole molecules and the mapping is the identity;
link atoms (capping hydrogens placed along cut bonds, their forces shared by the two real atoms) belong here
and nowhere else: a new mapping is one class plus ``@ZONES.register(name)``, chosen by ``[ml] zone``.
"""
from __future__ import annotations

import logging

import numpy as np
import torch

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
        """The zone of ``ml_indices`` with the elements of an OpenMM topology."""
        return cls(ml_indices, ml_numbers(topology, ml_indices))

    @classmethod
    def from_numbers(cls, ml_indices, numbers) -> "WholeMolecules":
        return cls(ml_indices, numbers)

    @property
    def n_model(self) -> int:
        """Number of model atoms."""
        return len(self.numbers)

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


def zone_molecules(topology, ml_indices) -> int:
    """Number of molecules (residues: the zone never cuts a bond) in the ML zone."""
    atoms = list(topology.atoms())
    return len({atoms[int(i)].residue.index for i in np.asarray(ml_indices).reshape(-1)})


def zone_formulas(topology, ml_indices, charge: int) -> list[tuple[str, int | None]]:
    """(Hill formula, charge) of each molecule (residue) of the ML zone; the charge is the zone's when it holds
    one molecule, else None (the force field's per-residue charges are not the model's business)."""
    from potentials.domain import formula

    atoms = list(topology.atoms())
    by_res: dict[int, list[int]] = {}
    for i in np.asarray(ml_indices).reshape(-1):
        a = atoms[int(i)]
        by_res.setdefault(a.residue.index, []).append(a.element.atomic_number if a.element is not None else 0)
    one = len(by_res) == 1
    return [(formula(z), int(charge) if one else None) for z in by_res.values()]


def warn_new_domain(metadata: dict, topology, ml_indices, charge: int, where: str = "model") -> list[str]:
    """One warning line naming what the ML zone has that the model's training data did not (its metadata
    ``domain``, :func:`potentials.domain.domain_news`); returns the items (empty: inside the domain, or no
    record)."""
    from potentials.domain import domain_news

    news = domain_news((metadata or {}).get("domain") or {}, zone_formulas(topology, ml_indices, charge),
                       len(np.asarray(ml_indices).reshape(-1)))
    if news:
        seen = ", ".join(m["formula"] + (f" ({m['charge']:+d})" if m["charge"] is not None else "")
                         for m in metadata["domain"].get("molecules", []))
        log.warning("%s was not trained on %s (its training molecules: %s); expect larger errors there and "
                    "check the run, or train a model for this system", where, "; ".join(news), seen)
    return news

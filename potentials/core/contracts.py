"""What a force engine returns and what it must provide: the contract between the client loop
(:mod:`driver.client`) and every engine (:class:`coupling.ml_engine.MLEngine`,
:class:`potentials.openmm_engine.OpenMMEngine`, anything registered in :data:`coupling.engines.ENGINES`).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:
    import torch


class ForceResult(NamedTuple):
    """What an engine returns for one structure (internal units).

    energy : kJ/mol
    forces : (N, 3) kJ/mol/nm
    virial : (3, 3) kJ/mol, ``-dE/d(strain)``; for a cluster that is ``sum_i f_i (x) r_i`` (symmetric for a
        rotation-invariant energy). i-PI only uses it for pressure; zeros are fine for NVT.
    extras : JSON-serialisable dict with namespaced keys (``"ml.charges"``); i-PI stores it per bead.
    """

    energy: float
    forces: np.ndarray
    virial: np.ndarray
    extras: dict


@runtime_checkable
class Engine(Protocol):
    """Anything that turns positions into a :class:`ForceResult` per structure."""

    natoms: int

    def compute(self, positions: np.ndarray, boxes: np.ndarray | None) -> list[ForceResult]:
        """positions (B, N, 3) nm; boxes (B, 3, 3) nm with vectors as rows, or None (a non-periodic engine
        ignores them). Returns B results."""
        ...


class ModelAdapter(Protocol):
    """The contract between the ML engine and any potential (:data:`potentials.adapters.MODELS`).

    Everything crossing this seam is in the engine's units: positions nm, energies kJ/mol, charges e,
    potential kJ/mol/e, field kJ/mol/e/nm; the adapter converts to its model's own units (the only place
    where that happens). Tensors are torch tensors on ``device``.
    """

    architecture: str                 # registry key, stored in the model file
    elements: tuple[int, ...]         # atomic numbers the model can describe
    supports_charge: bool             # can describe a charged zone
    field_inputs: bool                # consumes phi and E of the MM point charges
    predicts_charges: bool            # returns atomic charges
    metadata: dict                    # what the file records of its training (plain values)
    device: "torch.device"
    dtype: "torch.dtype"              # dtype of the position/phi/E tensors it wants

    def check_zone(self, numbers, charge: int, where: str = "model") -> None:
        """Raise SetupError (one line naming the element or charge) if the zone is outside the model."""
        ...

    def forward(self, numbers, positions, mol_idx, charge, phi, field) -> dict:
        """numbers [N] long, positions [N,3] nm, mol_idx [N] long (structure of each atom), charge [B] e,
        phi [N] kJ/mol/e, field [N,3] kJ/mol/e/nm -> ``{"energy": [B] kJ/mol, "charges": [N] e (if
        predicts_charges), "terms": {name: [B] kJ/mol}}``; differentiable in positions, phi and field."""
        ...

    def vacuum_charges(self, numbers, positions_nm, charge: int):
        """The model's atomic charges (e, numpy) of one zone in vacuum (phi = E = 0) at one geometry."""
        ...


class TrainingScheme(Protocol):
    """What training and evaluation need of an embedding scheme (:data:`coupling.schemes.SCHEMES`): how the
    network's energy of a batch of frames is formed from the MM point charges' phi and E. Runs in the
    model's own units (the dataset's: Å, eV, V, V/Å) on plain torch tensors."""

    name: str

    def network_energy(self, model, numbers, positions, mol_idx, charge, phi, field) -> tuple:
        """(energy [B], the model's output dict) of frames whose MM charges give ``phi``/``field``."""
        ...

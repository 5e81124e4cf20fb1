"""What every model adapter shares: the :data:`MODELS` registry, torch device/dtype helpers, and
:class:`ForeignAdapter`, the base of the adapters of other packages' potentials (MACE, AIMNet2, ANI).

This module is the bottom of the adapter modules: :mod:`potentials.adapters` (our network, file detection,
:func:`~potentials.adapters.load_adapter`) and the family modules (``potentials/adapters_<family>.py``) import
it, it imports none of them, so a family module can be imported lazily without an import cycle.
"""
from __future__ import annotations

import logging

import numpy as np
import torch

from potentials.core.errors import SetupError
from potentials.core.registry import Registry
from potentials.core.units import ANGSTROM_PER_NM, EV_PER_KJMOL, KJMOL_PER_EV, NM_PER_ANGSTROM

log = logging.getLogger(__name__)

MODELS: Registry = Registry("model architecture")

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def torch_device(device) -> torch.device:
    """``device`` as a torch device that works on this machine (SetupError otherwise)."""
    try:
        dev = torch.device(device)
        torch.empty(0, device=dev)
    except (RuntimeError, AssertionError) as exc:
        raise SetupError(f"torch device {device!r} is not usable here ({exc}); use cpu or an available "
                         "cuda:N") from None
    return dev


def weights_dtype(module: torch.nn.Module) -> torch.dtype:
    """The floating dtype a module computes in: that of its first floating parameter or buffer (float64 if
    none)."""
    for t in list(module.parameters()) + list(module.buffers()):
        if t.is_floating_point():
            return t.dtype
    return torch.float64


def parse_dtype(dtype) -> torch.dtype | None:
    """``"float32"``/``"float64"`` (or a torch dtype, or None: the model's own) as a torch dtype."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if str(dtype) not in DTYPES:
        raise SetupError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
    return DTYPES[str(dtype)]


def element_symbol(z: int) -> str:
    from ase.data import chemical_symbols

    return chemical_symbols[z] if 0 < z < len(chemical_symbols) else f"Z={z}"


def freeze(module: torch.nn.Module) -> torch.nn.Module:
    """``module`` in eval mode with its parameters frozen (inference: gradients w.r.t. positions only)."""
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


class ForeignAdapter:
    """Base of the adapters of other packages' potentials (:class:`potentials.core.contracts.ModelAdapter`).

    Such a model describes the zone in vacuum: it takes no MM potential or field (``field_inputs`` False; the
    phi and E a scheme hands over are ignored), so it runs in mechanical embedding, or in a scheme that couples
    its predicted charges to the MM charges itself (``coupling/schemes_charges.py``). Subclasses set
    ``architecture``, ``family`` (for messages), ``elements``, ``supports_charge``, ``predicts_charges``,
    ``module`` and ``compute_dtype`` and implement :meth:`forward`; inputs come in float64 (``dtype``) and are
    converted (units, then dtype) inside ``forward``.
    """

    pol_damping_nm = 0.0          # no field inputs, so no damped field either

    architecture = ""
    family = ""
    field_inputs = False
    predicts_charges = False
    supports_charge = False
    dtype = torch.float64           # what the engine hands over; the model computes in ``compute_dtype``

    def __init__(self, module: torch.nn.Module, elements, device, compute_dtype: torch.dtype,
                 metadata: dict | None = None):
        self.module = module
        self.elements = tuple(sorted(int(z) for z in elements))
        self.device = torch_device(device)
        self.compute_dtype = compute_dtype
        self.metadata = dict(metadata or {})
        self.compiled = False

    # ------------------------------------------------------------------ what the model is
    def check_zone(self, numbers, charge: int, where: str = "model") -> None:
        """One line naming the first element of the zone the model has no parameters for, or a charge it
        cannot describe."""
        zs = sorted(set(int(z) for z in np.asarray(numbers).reshape(-1)))
        missing = [z for z in zs if z not in self.elements]
        if missing:
            known = " ".join(element_symbol(z) for z in self.elements)
            raise SetupError(f"{where}: the {self.family} model has no parameters for element "
                             f"{element_symbol(missing[0])} (Z={missing[0]}) of the ML zone; it knows {known}")
        if charge and not self.supports_charge:
            raise SetupError(f"{where}: the {self.family} model describes neutral zones only, but the ML zone has "
                             f"charge {charge:+d} e; use a model that takes a total charge, or change the selection")

    # ------------------------------------------------------------------ running it
    def forward(self, numbers, positions, mol_idx, charge, phi, field) -> dict:
        raise NotImplementedError

    def vacuum_charges(self, numbers, positions_nm, charge: int) -> np.ndarray:
        """The model's atomic charges (e) of one zone at one geometry (nm)."""
        if not self.predicts_charges:
            raise SetupError(f"the {self.family} model predicts no atomic charges; give mechanical_charges = "
                             "\"mm\" instead")
        n = len(numbers)
        pos = torch.as_tensor(np.asarray(positions_nm, dtype=np.float64), device=self.device)
        zeros = torch.zeros(n, dtype=torch.float64, device=self.device)
        out = self.forward(torch.as_tensor(np.asarray(numbers, dtype=np.int64), device=self.device), pos,
                           torch.zeros(n, dtype=torch.long, device=self.device),
                           torch.tensor([float(charge)], dtype=torch.float64, device=self.device),
                           zeros, torch.zeros(n, 3, dtype=torch.float64, device=self.device))
        q = out["charges"].detach().to(torch.float64).cpu().numpy()
        if not np.all(np.isfinite(q)):
            raise SetupError(f"the {self.family} model's charges are not finite for this ML zone")
        return q

    def compile(self) -> "ForeignAdapter":
        log.warning("--compile is not supported for %s models; the model runs uncompiled", self.family)
        return self

    def to(self, device) -> "ForeignAdapter":
        self.device = torch_device(device)
        self.module.to(self.device)
        return self


class ModelUnitsModule(torch.nn.Module):
    """An adapter seen as a module in the network's units, for training-side code that works in model units
    (``mlmm evaluate``: :func:`potentials.evaluate.evaluate` with a scheme's ``network_energy``)::

        module(numbers, positions Å, mol_idx, charge e, phi V, field V/Å) -> {"energy": [B] eV, "charges": [N] e}

    A model without charges reports zeros (its dipole is then zero)."""

    def __init__(self, adapter):
        super().__init__()
        self.adapter = adapter            # not a submodule: the adapter keeps its model on its device and dtype
        self._dtype = torch.nn.Parameter(torch.zeros((), dtype=torch.float64), requires_grad=False)   # inputs

    def forward(self, numbers, positions, mol_idx, charge, phi, field) -> dict:
        out = self.adapter.forward(numbers, positions * NM_PER_ANGSTROM, mol_idx, charge, phi * KJMOL_PER_EV,
                                   field * (KJMOL_PER_EV * ANGSTROM_PER_NM))
        q = out.get("charges")
        return {"energy": out["energy"] * EV_PER_KJMOL,
                "charges": q if q is not None else torch.zeros_like(positions[:, 0])}

"""The model-adapter seam: every potential the ML engine can run sits behind one contract,
:class:`potentials.core.contracts.ModelAdapter`, and is chosen by name from :data:`MODELS`.

Across the seam everything is in the engine's units: positions nm, energies kJ/mol, charges e, potential
kJ/mol/e, field kJ/mol/e/nm. An adapter converts to its model's own units and back; for the network
(Å, eV, V, V/Å) that happens here and nowhere else.

Model files record their architecture (``"architecture"``; files without it hold the network,
``"embedded-aimnet2"``) and :func:`load_adapter` dispatches on it. A new architecture is one module with an
adapter class and one registration::

    @MODELS.register("my-net")
    class MyNetAdapter:
        @classmethod
        def load(cls, path, device, contents):      # contents: the file's dict (None if model_type was forced)
            ...

:func:`adapt` wraps a bare torch module that follows the network's signature and units (test oracles,
modules built in memory) in :class:`NetworkAdapter`.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from potentials.adapter_base import MODELS, parse_dtype, torch_device, weights_dtype
from potentials.core.errors import SetupError
from potentials.core.units import ANGSTROM_PER_NM, EV_PER_KJMOL, KJMOL_PER_EV, NM_PER_ANGSTROM
from potentials.model_formats import MODEL_TYPES, classify, weights_family
from potentials.model_io import ARCHITECTURE, file_architecture, load_model, read_model_file
from potentials.network import EmbeddedAIMNet2

log = logging.getLogger(__name__)

__all__ = ["MODELS", "MODEL_TYPES", "torch_device", "weights_dtype", "load_adapter", "adapt", "NetworkAdapter",
           "EmbeddedAIMNet2Adapter"]

# model families in their own modules, imported on first use (importing this module imports none of their
# packages): --model-type name -> (pip extra, package)
FAMILIES = {"mace": ("mace", "mace-torch"), "aimnet2": ("aimnet", "aimnet"), "ani": ("ani", "torchani")}
assert MODEL_TYPES == (ARCHITECTURE,) + tuple(FAMILIES)

# outputs of the network that are not per-structure energy terms (every other output of shape [B] is one)
NOT_ENERGY_TERMS = ("energy", "charges", "atomic_energies", "polarisability")
PHI_V_PER_KJMOL_E = EV_PER_KJMOL                             # kJ/mol/e -> V (1 V = 1 eV/e)
FIELD_V_A_PER_KJMOL_E_NM = EV_PER_KJMOL * NM_PER_ANGSTROM    # kJ/mol/e/nm -> V/Å


class NetworkAdapter:
    """Adapter of a torch module with the network's signature and units::

        module(numbers [N] long, positions [N,3] Å, mol_idx [N] long, charge [B] e, phi [N] V, efield [N,3] V/Å)
            -> {"energy": [B] eV, "charges": [N] e, <term>: [B] eV, ...}

    The adapter is for inference: the module is put in ``eval()`` mode with its parameters frozen (forces need
    gradients w.r.t. positions and phi/E only). Inputs are handed over in float64 (``dtype``): the network casts
    positions/phi/E to its weights' dtype for the features but keeps its charge sums in float64. What this
    generic wrapper cannot know of a module it reads from the module's optional attributes (``check_numbers``,
    ``supports_charge``, ``elements``, ``metadata``); :class:`EmbeddedAIMNet2Adapter` knows its network.
    """

    architecture = "network-module"
    predicts_charges = True
    field_inputs = True

    def __init__(self, module: torch.nn.Module, device=None):
        if device is None:
            device = next((t.device for t in list(module.parameters()) + list(module.buffers())), "cpu")
        self.device = torch_device(device)
        self.module = module.to(self.device).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.dtype = torch.float64
        self._network = self.module
        self.compiled = False

    # ------------------------------------------------------------------ what the model is
    @property
    def elements(self) -> tuple[int, ...]:
        return tuple(int(z) for z in getattr(self.module, "elements", ()))

    @property
    def supports_charge(self) -> bool:
        return bool(getattr(self.module, "supports_charge", True))

    @property
    def metadata(self) -> dict:
        return dict(getattr(self.module, "metadata", None) or {})

    def check_zone(self, numbers, charge: int, where: str = "model") -> None:
        """Refuse a zone the model cannot describe: unknown elements, or a net charge it was not trained for."""
        check = getattr(self.module, "check_numbers", None)
        if callable(check):
            self._check_numbers(check, numbers, where)
        self._check_charge(charge, where)

    @staticmethod
    def _check_numbers(check, numbers, where: str) -> None:
        try:
            check(torch.as_tensor(np.asarray(numbers, dtype=np.int64)))
        except (ValueError, KeyError) as exc:
            raise SetupError(f"{where}: cannot describe the ML zone: {exc}") from None

    def _check_charge(self, charge: int, where: str) -> None:
        if charge and not self.supports_charge:
            raise SetupError(f"{where}: the model was trained on neutral molecules only, but the ML zone has "
                             f"charge {charge:+d} e; use a model trained with charged species or change the ML "
                             "selection")

    # ------------------------------------------------------------------ running it
    pol_damping_nm = 0.0         # width of the polarisation term's field damping (nm); 0: none

    def forward(self, numbers, positions, mol_idx, charge, phi, field, field_pol=None) -> dict:
        """Energies [B] kJ/mol (float64), charges [N] e and the per-structure energy terms (kJ/mol, detached:
        they are reported, not differentiated) of the structures ``mol_idx``; positions nm, phi kJ/mol/e,
        field kJ/mol/e/nm (see the contract); ``field_pol``: the damped field of the polarisation term (only for
        a model with ``pol_damping_nm`` > 0)."""
        inputs = [numbers, (positions * ANGSTROM_PER_NM).to(self.dtype), mol_idx, charge,
                  (phi * PHI_V_PER_KJMOL_E).to(self.dtype), (field * FIELD_V_A_PER_KJMOL_E_NM).to(self.dtype)]
        if field_pol is not None:
            inputs.append((field_pol * FIELD_V_A_PER_KJMOL_E_NM).to(self.dtype))
        out = self._run(*inputs)
        n = charge.shape[0]
        res = {"energy": out["energy"].to(torch.float64) * KJMOL_PER_EV,
               "terms": {k: v.detach().to(torch.float64) * KJMOL_PER_EV for k, v in out.items()
                         if k not in NOT_ENERGY_TERMS and torch.is_tensor(v) and v.shape == (n,)}}
        if "charges" in out:
            res["charges"] = out["charges"]
        return res

    def _run(self, *inputs) -> dict:
        if self._network is self.module:
            return self.module(*inputs)
        try:
            return self._network(*inputs)
        except Exception as exc:          # inductor cannot build every graph (e.g. float64 scatter in torch 2.13)
            log.warning("torch.compile failed (%s: %s); the network runs uncompiled", type(exc).__name__,
                        str(exc).strip().splitlines()[0] if str(exc).strip() else "")
            self._network, self.compiled = self.module, False
            return self.module(*inputs)

    def compile(self) -> "NetworkAdapter":
        """Run the module through ``torch.compile`` (fixed shapes: an ML zone never changes size). The first
        call compiles; if that fails the module runs eagerly and ``compiled`` turns False."""
        self._network = torch.compile(self.module, dynamic=False)
        self.compiled = True
        return self

    def to(self, device) -> "NetworkAdapter":
        self.device = torch_device(device)
        self.module.to(self.device)
        return self

    def vacuum_charges(self, numbers, positions_nm, charge: int) -> np.ndarray:
        """The model's atomic charges (e) of one zone in vacuum (phi = E = 0) at one geometry (nm): the fixed
        ML charges of mechanical embedding with ``[coupling] mechanical_charges = "model"``."""
        dev, dtype = self.device, weights_dtype(self.module)
        pos = torch.as_tensor(np.asarray(positions_nm, dtype=np.float64) * ANGSTROM_PER_NM, device=dev,
                              dtype=dtype)
        n = len(pos)
        with torch.no_grad():
            out = self.module(torch.as_tensor(np.asarray(numbers, dtype=np.int64), device=dev),
                              pos, torch.zeros(n, dtype=torch.long, device=dev),
                              torch.tensor([float(charge)], dtype=dtype, device=dev),
                              torch.zeros(n, dtype=dtype, device=dev), torch.zeros(n, 3, dtype=dtype, device=dev))
        if "charges" not in out:
            raise SetupError("the model predicts no atomic charges; give mechanical_charges = \"mm\" instead")
        q = out["charges"].to(torch.float64).cpu().numpy()
        if not np.all(np.isfinite(q)):
            raise SetupError("the model's vacuum charges are not finite for this ML zone")
        return q


@MODELS.register(ARCHITECTURE)
class EmbeddedAIMNet2Adapter(NetworkAdapter):
    """The adapter of :class:`potentials.network.EmbeddedAIMNet2` (model files of :mod:`potentials.model_io`).

    Any net charge of the zone is described (neural charge equilibration conserves it exactly).
    """

    architecture = ARCHITECTURE
    supports_charge = True

    def __init__(self, module: EmbeddedAIMNet2, device=None):
        if not isinstance(module, EmbeddedAIMNet2):
            raise SetupError(f"{ARCHITECTURE} adapter needs an EmbeddedAIMNet2, got {type(module).__name__}")
        super().__init__(module, device)

    @property
    def elements(self) -> tuple[int, ...]:
        return tuple(int(z) for z in self.module.config.elements)

    @property
    def field_inputs(self) -> bool:
        return bool(self.module.config.embedding)

    @property
    def pol_damping_nm(self) -> float:
        return float(self.module.config.pol_damping) * NM_PER_ANGSTROM if self.field_inputs else 0.0

    @property
    def metadata(self) -> dict:
        return self.module.metadata

    @classmethod
    def load(cls, path, device="cpu", contents: dict | None = None,
             dtype: torch.dtype | None = None) -> "EmbeddedAIMNet2Adapter":
        module = load_model(path, device, contents)
        return cls(module if dtype is None else module.to(dtype), device)

    def check_zone(self, numbers, charge: int, where: str = "model") -> None:
        self._check_numbers(self.module.check_numbers, numbers, where)
        self._check_charge(charge, where)


def load_adapter(path, device="cpu", model_type: str | None = None, dtype=None):
    """The adapter of the model in file ``path`` on ``device``.

    The family is found from the file without unpickling it (:func:`potentials.model_formats.classify`): a
    weights-only dict records its ``architecture`` (ours; the ``aimnet`` package's current format has
    ``model_yaml``), a pickled model object or a TorchScript archive is named by the package of its classes
    (MACE, ANI; AIMNet2's released ``.jpt`` files). ``model_type`` (:data:`MODEL_TYPES`) forces a family: its
    adapter then reads the file itself. ``dtype`` (``"float32"``/``"float64"``) converts the model's weights;
    None keeps the file's.
    """
    dev = torch_device(device)
    want = parse_dtype(dtype)
    extra = {} if want is None else {"dtype": want}
    if model_type is not None:
        return model_class(model_type).load(path, dev, None, **extra)
    kind = classify(path)
    contents = None
    if kind.kind == "weights":
        contents = read_model_file(path, dev)
        name = weights_architecture(contents)
    elif kind.family is not None:
        name = kind.family
    else:
        what = "a TorchScript archive" if kind.kind == "torchscript" else f"a pickled {kind.root.replace(' ', '.')}"
        raise SetupError(f"model file {Path(path)} is {what} of no known model family; give --model-type "
                         f"({', '.join(MODEL_TYPES)}) if you trust the file")
    try:
        entry = model_class(name)
    except SetupError as exc:
        raise SetupError(f"model file {Path(path)}: {exc}") from None
    return entry.load(path, dev, contents, **extra)


def weights_architecture(contents: dict) -> str:
    """The family of a weights-only model file: its ``architecture`` entry, else what its keys say
    (:func:`potentials.model_formats.weights_family`: AIMNet2, ANI); files of ours written before the key
    existed are the network."""
    return weights_family(contents) or file_architecture(contents)


def model_class(name: str):
    """The adapter class registered as ``name``, importing its family module on first use (SetupError naming
    the pip extra when its package is not installed)."""
    if name not in MODELS and name in FAMILIES:
        extra, package = FAMILIES[name]
        try:
            _import_family(name)
        except ImportError as exc:
            raise SetupError(f"{name} models need the {package} package ({exc}); install it with pip install "
                             f"'ipi-mlmm[{extra}]'") from None
    if name not in MODELS:
        known = list(dict.fromkeys(MODEL_TYPES + MODELS.names()))
        raise SetupError(f"unknown model architecture {name!r}; known: {', '.join(known)}")
    return MODELS.get(name)


def _import_family(name: str) -> None:
    """Import the module of a model family (it registers its adapter in MODELS)."""
    if name == "mace":
        from potentials import adapters_mace  # noqa: F401
    elif name == "aimnet2":
        from potentials import adapters_aimnet  # noqa: F401
    elif name == "ani":
        from potentials import adapters_ani  # noqa: F401


def adapt(model, device=None):
    """``model`` as a model adapter: an adapter is returned as it is (moved to ``device`` if given), a
    network module is wrapped (:class:`EmbeddedAIMNet2Adapter` for the network, else :class:`NetworkAdapter`)."""
    if isinstance(model, EmbeddedAIMNet2):
        return EmbeddedAIMNet2Adapter(model, device)
    if isinstance(model, torch.nn.Module):
        return NetworkAdapter(model, device)
    if all(callable(getattr(model, name, None)) for name in ("forward", "check_zone", "vacuum_charges")):
        return model.to(device) if device is not None and callable(getattr(model, "to", None)) else model
    raise SetupError(f"{type(model).__name__} is neither a model adapter nor a torch module with the network's "
                     "forward signature")


# committees of the network (potentials/committee.py), imported on the first look-up of the name; that module
# imports this one, so it is named here, not imported
MODELS.register_lazy("embedded-aimnet2-committee", "potentials.committee")

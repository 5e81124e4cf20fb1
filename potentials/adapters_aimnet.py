"""AIMNet2 models (the ``aimnet`` package) behind the model-adapter seam.

Files: the package's current format (a weights-only ``torch.save`` dict with ``model_yaml`` and
``state_dict``, what ``aimnet export`` and ``aimnet convert`` write; read with ``weights_only=True``) and its
released TorchScript files (``.jpt``, ``torch.jit.load``: TorchScript code from the file runs, in TorchScript's
interpreter). The model runs through the package's own :class:`aimnet.calculators.AIMNet2Calculator`, so the
energy is exactly what the package computes: the network, its long-range Coulomb of the predicted charges and
its D3 dispersion where the file asks for them. The ML zone is a cluster (no cell is passed: plain Coulomb,
no periodic images). The total charge of the zone is passed through; the predicted atomic charges (e) are
returned, differentiable in the positions, for the schemes that couple them to the MM charges.

Units: AIMNet2 works in Å and eV; the adapter converts from and to nm and kJ/mol. The package computes in
float32 (its models are float32 with a float64 atomic-shift table); ``--dtype float64`` is refused.
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch

from potentials.adapter_base import MODELS, ForeignAdapter, freeze
from potentials.core.errors import SetupError
from potentials.core.units import ANGSTROM_PER_NM, KJMOL_PER_EV
from potentials.model_formats import classify

log = logging.getLogger(__name__)

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from aimnet.calculators import AIMNet2Calculator            # ImportError: potentials.adapters names the extra
    from aimnet.models.base import load_legacy_jit, load_model as load_v2


@MODELS.register("aimnet2")
class AIMNet2Adapter(ForeignAdapter):
    """An AIMNet2 model, run by the package's calculator, in the engine's units."""

    architecture = "aimnet2"
    family = "AIMNet2"
    predicts_charges = True

    def __init__(self, calc: "AIMNet2Calculator", metadata: dict, device):
        module = freeze(calc.model)
        super().__init__(module, metadata.get("implemented_species") or (), device, torch.float32,
                         {k: v for k, v in metadata.items() if isinstance(v, (str, int, float, bool, list))})
        self.calc = calc
        self.supports_charge = metadata.get("supports_charged_systems") is not False

    @classmethod
    def load(cls, path, device="cpu", contents=None, dtype: torch.dtype | None = None) -> "AIMNet2Adapter":
        if dtype not in (None, torch.float32):
            raise SetupError("AIMNet2 models run in float32 (the aimnet package's precision); drop --dtype float64")
        path = Path(path).resolve()
        kind = classify(path)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if kind.kind == "torchscript":
                    log.warning("model file %s is a TorchScript archive: its TorchScript code runs when it is "
                                "loaded (torch.jit.load); load only files you trust", path)
                    module, meta = load_legacy_jit(str(path), str(device))
                else:
                    module, meta = load_v2(str(path), str(device))          # weights_only=True
                calc = AIMNet2Calculator(model=module, device=str(device))
        except SetupError:
            raise
        except Exception as exc:        # noqa: BLE001 - the package's loaders raise many kinds
            raise SetupError(f"model file {path} cannot be loaded as an AIMNet2 model ({type(exc).__name__}: "
                             f"{exc})") from None
        meta = dict(calc.metadata or meta or {})
        meta["file"] = path.name
        return cls(calc, meta, device)

    def forward(self, numbers, positions, mol_idx, charge, phi, field) -> dict:
        """Energies [B] kJ/mol (float64) and atomic charges [N] e of the structures ``mol_idx``; positions nm
        (phi and field ignored)."""
        coord = (positions.to(torch.float64) * ANGSTROM_PER_NM).to(torch.float32)
        data = {"coord": coord, "numbers": numbers, "charge": charge.to(torch.float32)}
        if charge.shape[0] > 1:
            data["mol_idx"] = mol_idx
        out = self.calc.eval(data, forces=False, validate_species=False)
        return {"energy": out["energy"].reshape(-1).to(torch.float64) * KJMOL_PER_EV,
                "charges": out["charges"].reshape(-1), "terms": {}}

    def to(self, device) -> "AIMNet2Adapter":
        super().to(device)
        self.calc.device = str(self.device)
        return self

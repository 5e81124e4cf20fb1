"""ANI models (TorchANI) behind the model-adapter seam, from files on disk (nothing is downloaded):

* the released weights as TorchANI keeps them, ``ani2x_state_dict.pt``, ``ani1x_state_dict.pt``,
  ``ani1ccx_state_dict.pt`` (weights-only state dicts, read with ``weights_only=True``; the architecture is
  TorchANI's own ``torchani.models.ANI2x``/``ANI1x``/``ANI1ccx``, built around the local file);
* a model object saved with ``torch.save`` (a pickle of a ``torchani.*`` class: loading runs code from the
  file, said in the log) or a TorchScript archive of one (``torch.jit.save(torch.jit.script(model))``).

Units: TorchANI works in Å and hartree; the adapter converts from and to nm and kJ/mol. The ML zone is a
cluster (no cell). ANI models describe neutral molecules only; they predict no charges.
"""
from __future__ import annotations

import logging
from pathlib import Path
from unittest import mock

import torch

from potentials.adapter_base import MODELS, ForeignAdapter, freeze, weights_dtype
from potentials.core.errors import SetupError
from potentials.core.units import ANGSTROM_PER_NM, KJMOL_PER_HARTREE
from potentials.model_formats import classify, weights_family
from potentials.model_io import read_model_file

import torchani  # noqa: E402,F401  (ImportError: potentials.adapters names the pip extra)

log = logging.getLogger(__name__)

# released models by the number of elements of their state dict (ANI-1x and ANI-1ccx: by the file name)
RELEASED = {7: "ANI2x", 4: "ANI1x"}


@MODELS.register("ani")
class ANIAdapter(ForeignAdapter):
    """A TorchANI model in the engine's units."""

    architecture = "ani"
    family = "ANI"

    def __init__(self, module, device, dtype: torch.dtype | None = None, metadata: dict | None = None):
        if isinstance(module, torch.jit.ScriptModule):
            dtype = dtype or weights_dtype(module)
            module = module.to(device=device, dtype=dtype).eval()
        else:
            dtype = dtype or weights_dtype(module)
            module = freeze(module.to(device=device, dtype=dtype))
        super().__init__(module, [int(z) for z in module.atomic_numbers], device, dtype, metadata)

    @classmethod
    def load(cls, path, device="cpu", contents=None, dtype: torch.dtype | None = None) -> "ANIAdapter":
        path = Path(path)
        kind = classify(path)
        try:
            if kind.kind == "weights":
                module = _released(path, contents if contents is not None else read_model_file(path, "cpu"))
            elif kind.kind == "torchscript":
                log.warning("model file %s is a TorchScript archive: its TorchScript code runs when it is loaded "
                            "(torch.jit.load); load only files you trust", path)
                module = torch.jit.load(str(path), map_location=device)
            else:
                log.warning("model file %s is a pickled TorchANI model: loading it runs code stored in the file "
                            "(torch.load with weights_only=False); load only files you trust", path)
                module = torch.load(str(path), map_location=device, weights_only=False)
        except SetupError:
            raise
        except Exception as exc:          # noqa: BLE001 - any failure of the package's loaders is a bad file
            raise SetupError(f"model file {path} cannot be loaded as an ANI model ({type(exc).__name__}: "
                             f"{exc})") from None
        if not hasattr(module, "atomic_numbers"):
            raise SetupError(f"model file {path} holds a {type(module).__name__}, not a TorchANI model")
        return cls(module, device, dtype, {"file": path.name, "class": type(module).__name__})

    def forward(self, numbers, positions, mol_idx, charge, phi, field) -> dict:
        """Energies [B] kJ/mol (float64); the B structures of a batch have the same atoms (one ML zone)."""
        n_struct = charge.shape[0]
        coords = (positions.to(torch.float64) * ANGSTROM_PER_NM).to(self.compute_dtype).reshape(n_struct, -1, 3)
        species = numbers.reshape(n_struct, -1)
        energies = self.module((species, coords)).energies
        return {"energy": energies.to(torch.float64) * KJMOL_PER_HARTREE, "terms": {}}


def _released(path: Path, state: dict):
    """TorchANI's released architecture of a local ``*_state_dict.pt`` (its own builder, fed this file)."""
    from torchani import models

    if weights_family(state) != "ani":
        raise SetupError(f"model file {path} is not a TorchANI state dict")
    n_elements = int(state["energy_shifter.self_energies"].shape[0])
    name = "ANI1ccx" if "ccx" in path.name.lower() and n_elements == 4 else RELEASED.get(n_elements)
    if name is None:
        raise SetupError(f"model file {path}: a TorchANI state dict of {n_elements} elements matches no released "
                         "model (ANI-2x: 7, ANI-1x/ANI-1ccx: 4); save the model object instead")
    log.info("model file %s: TorchANI %s weights, read with weights_only=True", path, name)
    with mock.patch.object(models, "_fetch_state_dict", lambda *a, **k: state):      # never downloads
        return getattr(models, name)()

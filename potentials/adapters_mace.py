"""MACE models (mace-torch) behind the model-adapter seam: ``--model FILE`` with a file as mace-torch saves it
(``torch.save`` of the model object, the format of the released MACE-OFF ``.model`` files).

Such a file is a pickle: loading it imports and runs code named in the file. :func:`load_adapter` loads one only
after :mod:`potentials.model_formats` has found (without unpickling) that its top object is a ``mace.*`` class,
or when ``--model-type mace`` says so; the log says that code from the file runs. Load only files you trust.

``import mace`` sets ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` for the whole process (e3nn 0.4 needs it to read its
own constants): the variable is restored as soon as mace is imported, so that every later ``torch.load`` that
does not say ``weights_only`` stays weights-only; our own model files are read with ``weights_only=True``
anyway (``tests/potentials/test_adapters_mace.py`` checks both).

Units: MACE works in Å and eV; the adapter converts from and to nm and kJ/mol. The ML zone is a cluster: the
graph is every pair of atoms of one structure within the model's ``r_max``, no periodic images. The energy is
MACE's ``energy`` (interaction energy + the atomic reference energies E0, as ``MACECalculator`` reports it;
openmm-ml reports the interaction energy by default: a constant offset).
"""
from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import torch

from potentials.adapter_base import MODELS, ForeignAdapter, freeze, weights_dtype
from potentials.core.errors import SetupError
from potentials.core.units import ANGSTROM_PER_NM, KJMOL_PER_EV

log = logging.getLogger(__name__)

_ENV = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"


def _import_mace():
    """``mace.modules``, imported with the process's torch.load default restored afterwards."""
    saved = os.environ.get(_ENV)
    os.environ[_ENV] = "1"                 # e3nn reads its constants.pt with a bare torch.load at import
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")    # e3nn/mace import-time warnings (the forced torch.load among them)
            import mace.modules
    finally:
        if saved is None:
            os.environ.pop(_ENV, None)
        else:
            os.environ[_ENV] = saved
    return mace.modules


_import_mace()          # ImportError here: potentials.adapters names the pip extra


@MODELS.register("mace")
class MACEAdapter(ForeignAdapter):
    """A MACE model (any ``mace.modules`` model class that takes mace's graph dict) in the engine's units."""

    architecture = "mace"
    family = "MACE"
    supports_charge = False

    def __init__(self, module: torch.nn.Module, device, dtype: torch.dtype | None = None,
                 metadata: dict | None = None):
        dtype = dtype or weights_dtype(module)
        module = freeze(module.to(device=device, dtype=dtype))
        zs = [int(z) for z in module.atomic_numbers]
        super().__init__(module, zs, device, dtype, metadata)
        self.r_max_a = float(module.r_max)
        index = torch.full((max(zs) + 1,), -1, dtype=torch.long)
        index[torch.tensor(zs)] = torch.arange(len(zs))
        self._index = index.to(self.device)
        # models trained with a total charge/spin input (MACE-OMOL) take it; plain MACE ignores it
        self.supports_charge = "total_charge" in (getattr(module, "embedding_specs", None) or {})

    @classmethod
    def load(cls, path, device="cpu", contents=None, dtype: torch.dtype | None = None) -> "MACEAdapter":
        log.warning("model file %s is a pickled MACE model: loading it runs code stored in the file "
                    "(torch.load with weights_only=False); load only files you trust", path)
        _import_mace()
        try:
            module = torch.load(str(path), map_location=device, weights_only=False)
        except Exception as exc:          # noqa: BLE001 - any unpickling failure is a bad file
            raise SetupError(f"model file {path} cannot be loaded as a MACE model ({type(exc).__name__}: "
                             f"{exc})") from None
        if not isinstance(module, torch.nn.Module) or not hasattr(module, "atomic_numbers") \
                or not hasattr(module, "r_max"):
            raise SetupError(f"model file {path} holds a {type(module).__name__}, not a MACE model")
        meta = {"file": Path(path).name, "class": type(module).__name__, "r_max_angstrom": float(module.r_max)}
        return cls(module, device, dtype, meta)

    # ------------------------------------------------------------------ running it
    def _graph(self, pos_a: torch.Tensor, mol_idx: torch.Tensor) -> torch.Tensor:
        """Edges [2, E] (sender, receiver): pairs of one structure closer than r_max (no images)."""
        with torch.no_grad():
            d = torch.cdist(pos_a, pos_a)
            mask = (d < self.r_max_a) & (mol_idx[:, None] == mol_idx[None, :])
            mask.fill_diagonal_(False)
            return mask.nonzero().T.contiguous()

    def forward(self, numbers, positions, mol_idx, charge, phi, field) -> dict:
        """Energies [B] kJ/mol (float64) of the structures ``mol_idx``; positions nm (phi and field ignored)."""
        dt, n_struct = self.compute_dtype, charge.shape[0]
        pos = (positions.to(torch.float64) * ANGSTROM_PER_NM).to(dt)
        idx = self._index[numbers]
        attrs = torch.nn.functional.one_hot(idx, len(self.elements)).to(dt)
        edges = self._graph(pos.detach(), mol_idx)
        counts = torch.bincount(mol_idx, minlength=n_struct)
        ptr = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
        zeros_e = pos.new_zeros(edges.shape[1], 3)
        data = {"positions": pos, "node_attrs": attrs, "edge_index": edges, "shifts": zeros_e,
                "unit_shifts": zeros_e, "batch": mol_idx, "ptr": ptr, "cell": pos.new_zeros(3 * n_struct, 3),
                "total_charge": charge.to(dt), "total_spin": torch.ones_like(charge, dtype=dt),
                "external_field": pos.new_zeros(n_struct, 3), "fermi_level": pos.new_zeros(n_struct)}
        out = self.module(data, training=False, compute_force=False)
        return {"energy": out["energy"].to(torch.float64) * KJMOL_PER_EV, "terms": {}}

    def to(self, device) -> "MACEAdapter":
        super().to(device)
        self._index = self._index.to(self.device)
        return self

"""Committees of the embedding-aware network: K models of one architecture (different seeds and training
splits) in one weights-only file, run as one adapter that returns their mean and lets the ML engine measure
their spread (the uncertainty extras ``ml.committee``, :func:`coupling.ml_engine.ml_extras`).

File (``torch.save`` dict, loaded with ``weights_only=True`` like every model file of ours)::

    format_version  1
    architecture    "embedded-aimnet2-committee"      (its entry in potentials.adapters.MODELS)
    members         [{"config": ModelConfig.to_dict(), "state_dict": {...}, "metadata": {...}}, ...]  (K >= 1)
    elements, cutoff (Å), units (potentials.model_io.UNITS)
    metadata        {"committee": {"n_members", "seeds", "members": [per-member training summary]},
                     "embedding", "domain", "ml_molecules" (member 0's: what the start-up checks read), ...}

Every member has the same ModelConfig (same architecture; the same field inputs and damping), so one batched
call of each member covers all structures of a request. :class:`CommitteeAdapter` returns the members' mean
energy, mean charges and mean energy terms, and ``member_energies`` [K, B] (kJ/mol, differentiable) from which
the engine takes the per-member forces on the ML atoms (:mod:`coupling.committee_spread`).

``potentials.adapters`` registers this module lazily (``MODELS.register_lazy``): it is imported on the first
look-up of the architecture, and it may import ``potentials.adapters`` (no import cycle).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from potentials.adapter_base import MODELS, torch_device
from potentials.adapters import EmbeddedAIMNet2Adapter
from potentials.core.errors import SetupError
from potentials.model_io import ARCHITECTURE, FORMAT_VERSION, UNITS, load_model, read_model_file
from potentials.network import EmbeddedAIMNet2

COMMITTEE = "embedded-aimnet2-committee"
# what the committee file's own metadata copies from member 0 (all members saw the same dataset and embedding):
# the start-up checks of the ML client read these (coupling.ml_engine.check_embedding, warn_new_domain, ...)
SHARED_METADATA = ("embedding", "domain", "ml_molecules", "dataset")


def _plain(meta: dict, what: str) -> dict:
    try:
        return json.loads(json.dumps(meta))          # plain types only: weights_only loading must accept it
    except TypeError as e:
        raise SetupError(f"{what} must hold only plain values (str, numbers, lists, dicts): {e}") from None


def member_summary(meta: dict) -> dict:
    """What the committee's metadata keeps of one member's training metadata (the full record stays in the
    member's own entry)."""
    training = meta.get("training") or {}
    return {"seed": training.get("seed"), "best_epoch": meta.get("best_epoch"), "epochs_run": meta.get("epochs_run"),
            "n_train": meta.get("n_train"), "n_val": meta.get("n_val"), "split": meta.get("split"),
            "best_val_score": min((h.get("val_score", float("inf")) for h in meta.get("history") or []),
                                  default=None)}


def save_committee(path, models: list[EmbeddedAIMNet2], metadata: dict | None = None) -> None:
    """Write the networks ``models`` (K >= 1, one ModelConfig) as one committee file at ``path``.

    Each member keeps its own ``metadata`` (its ``.metadata``); the file's ``metadata`` holds ``metadata``
    merged over member 0's shared entries (:data:`SHARED_METADATA`) and ``committee``: the number of members,
    their seeds and a summary of each one's training."""
    models = list(models)
    if not models:
        raise SetupError("a committee needs at least one model")
    configs = [m.config.to_dict() for m in models]
    for k, cfg in enumerate(configs[1:], 1):
        if cfg != configs[0]:
            diff = sorted(key for key in set(cfg) | set(configs[0]) if cfg.get(key) != configs[0].get(key))
            raise SetupError(f"committee member {k} has another architecture than member 0 (config keys {diff}); "
                             "every member must use the same model preset")
    metas = [_plain(dict(getattr(m, "metadata", {}) or {}), f"metadata of committee member {k}")
             for k, m in enumerate(models)]
    summary = [member_summary(meta) for meta in metas]
    meta = {key: metas[0][key] for key in SHARED_METADATA if key in metas[0]}
    meta.update(metadata or {})
    meta["committee"] = {"n_members": len(models), "seeds": [s["seed"] for s in summary], "members": summary,
                         **dict(meta.get("committee") or {})}
    meta = _plain(meta, "committee metadata")
    members = [{"config": cfg, "state_dict": {k: v.detach().cpu() for k, v in m.state_dict().items()},
                "metadata": mm} for cfg, m, mm in zip(configs, models, metas)]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format_version": FORMAT_VERSION, "architecture": COMMITTEE, "members": members,
                "elements": list(configs[0]["elements"]), "cutoff": float(configs[0]["cutoff"]),
                "units": dict(UNITS), "metadata": meta}, str(path))


def load_committee(path, device="cpu", contents: dict | None = None) -> list[EmbeddedAIMNet2]:
    """The member networks of a committee file (``eval()`` mode on ``device``; ``.metadata``: each member's)."""
    path = Path(path)
    d = read_model_file(path, device) if contents is None else contents
    if d.get("architecture") != COMMITTEE:
        raise SetupError(f"model file {path} holds a {d.get('architecture', ARCHITECTURE)!r} model, not a "
                         f"{COMMITTEE!r} committee")
    members = d.get("members")
    if not isinstance(members, list) or not members:
        raise SetupError(f"committee file {path} holds no members")
    out = []
    for k, m in enumerate(members):
        one = {"format_version": d.get("format_version"), "architecture": ARCHITECTURE, "config": m["config"],
               "state_dict": m["state_dict"], "units": d.get("units"), "metadata": m.get("metadata") or {}}
        try:
            out.append(load_model(f"{path} (member {k})", device, contents=one))
        except KeyError as exc:
            raise SetupError(f"committee file {path}: member {k} lacks {exc}") from None
    return out


class CommitteeNetwork(torch.nn.Module):
    """The committee's mean as one network in the network's own units and call (positions Å, φ V, E V/Å ->
    energy eV, charges e, and the mean ``dispersion`` when the members add D3): what the training-side code
    (:func:`potentials.train.predict`, ``mlmm evaluate``, ``mlmm learn``'s held-out errors) evaluates. It carries
    member 0's ``config``, so the polarisation term gets the damped field (``pol_damping``) and the D3 term is
    left out of the comparison with DFT labels, exactly as for a single network."""

    def __init__(self, members: list[EmbeddedAIMNet2]):
        super().__init__()
        self.members = torch.nn.ModuleList(members)
        self.config = members[0].config

    def forward(self, numbers, positions, mol_idx, charge, phi=None, efield=None, efield_pol=None) -> dict:
        outs = [m(numbers, positions, mol_idx, charge, phi, efield, efield_pol=efield_pol) for m in self.members]
        res = {k: torch.stack([o[k] for o in outs]).mean(0) for k in ("energy", "charges")}
        if all("dispersion" in o for o in outs):
            res["dispersion"] = torch.stack([o["dispersion"] for o in outs]).mean(0)
        return res


@MODELS.register(COMMITTEE)
class CommitteeAdapter:
    """K networks (:class:`potentials.adapters.EmbeddedAIMNet2Adapter` each) behind one adapter.

    ``forward`` runs every member on the whole batch (one batched call per member; a loop over members) and
    returns the mean energy [B] (kJ/mol), the mean charges [N] (e), the mean of each energy term and
    ``member_energies`` [K, B] (kJ/mol, in the autograd graph of the inputs): the ML engine differentiates the
    mean for the forces and each member for the spread of the forces on the ML atoms."""

    architecture = COMMITTEE
    predicts_charges = True
    supports_charge = True

    def __init__(self, members: list, device=None, metadata: dict | None = None):
        self.members = [m if isinstance(m, EmbeddedAIMNet2Adapter) else EmbeddedAIMNet2Adapter(m, device)
                        for m in members]
        if not self.members:
            raise SetupError("a committee needs at least one model")
        first = self.members[0]
        self.device = first.device if device is None else torch_device(device)
        self.module = torch.nn.ModuleList([m.module for m in self.members])
        self.dtype = first.dtype
        self._metadata = dict(metadata if metadata is not None else first.metadata)

    @property
    def compiled(self) -> bool:
        return any(m.compiled for m in self.members)

    @property
    def n_members(self) -> int:
        return len(self.members)

    @property
    def elements(self) -> tuple[int, ...]:
        return self.members[0].elements

    @property
    def field_inputs(self) -> bool:
        return self.members[0].field_inputs

    @property
    def pol_damping_nm(self) -> float:
        return self.members[0].pol_damping_nm

    @property
    def metadata(self) -> dict:
        return self._metadata

    @classmethod
    def load(cls, path, device="cpu", contents: dict | None = None,
             dtype: torch.dtype | None = None) -> "CommitteeAdapter":
        d = read_model_file(path, device) if contents is None else contents
        nets = load_committee(path, device, d)
        if dtype is not None:
            nets = [n.to(dtype) for n in nets]
        return cls([EmbeddedAIMNet2Adapter(n, device) for n in nets], device, dict(d.get("metadata") or {}))

    def check_zone(self, numbers, charge: int, where: str = "model") -> None:
        self.members[0].check_zone(numbers, charge, where)

    def forward(self, numbers, positions, mol_idx, charge, phi, field, field_pol=None) -> dict:
        """As :meth:`potentials.adapters.NetworkAdapter.forward`, averaged over the members, plus
        ``member_energies`` [K, B] kJ/mol."""
        extra = () if field_pol is None else (field_pol,)
        outs = [m.forward(numbers, positions, mol_idx, charge, phi, field, *extra) for m in self.members]
        energies = torch.stack([o["energy"] for o in outs])
        res = {"energy": energies.mean(0), "member_energies": energies,
               "terms": {k: torch.stack([o["terms"][k] for o in outs]).mean(0) for k in outs[0]["terms"]
                         if all(k in o["terms"] for o in outs)}}
        if all("charges" in o for o in outs):
            res["charges"] = torch.stack([o["charges"] for o in outs]).mean(0)
        return res

    def vacuum_charges(self, numbers, positions_nm, charge: int) -> np.ndarray:
        """The members' mean vacuum charges (e)."""
        return np.mean([m.vacuum_charges(numbers, positions_nm, charge) for m in self.members], axis=0)

    def compile(self) -> "CommitteeAdapter":
        for m in self.members:
            m.compile()
        return self

    def to(self, device) -> "CommitteeAdapter":
        self.device = torch_device(device)
        for m in self.members:
            m.to(self.device)
        return self

"""Model files of the embedding-aware network: one ``torch.save`` dict, loaded with ``weights_only=True``.

Keys: ``format_version``, ``architecture`` (the :data:`potentials.adapters.MODELS` entry that reads the
file: ``"embedded-aimnet2"``; files without the key are that architecture), ``config`` (ModelConfig.to_dict()),
``state_dict``, ``elements``, ``cutoff`` (Å), ``units`` (:data:`UNITS`: Å, eV, e, V, V/Å), ``metadata``
(training information: plain str/int/float/bool/None, lists and dicts of them).
Loading runs no pickled code and needs no network access.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from potentials.core.errors import SetupError
from potentials.network import EmbeddedAIMNet2, ModelConfig

FORMAT_VERSION = 1
ARCHITECTURE = "embedded-aimnet2"         # this network's entry in potentials.adapters.MODELS
UNITS = {"length": "angstrom", "energy": "eV", "charge": "e", "potential": "V", "field": "V/angstrom"}


def save_model(path, model: EmbeddedAIMNet2, metadata: dict | None = None) -> None:
    """Write ``model`` (weights, config, units) and ``metadata`` (merged over ``model.metadata``) to ``path``."""
    meta = {**getattr(model, "metadata", {}), **(metadata or {})}
    try:
        meta = json.loads(json.dumps(meta))            # plain types only: weights_only loading must accept it
    except TypeError as e:
        raise SetupError(f"model metadata must hold only plain values (str, numbers, lists, dicts): {e}") from None
    cfg = model.config.to_dict()
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format_version": FORMAT_VERSION, "architecture": ARCHITECTURE, "config": cfg,
                "state_dict": state, "elements": list(cfg["elements"]), "cutoff": float(cfg["cutoff"]),
                "units": dict(UNITS), "metadata": meta}, str(path))


def read_model_file(path, device="cpu") -> dict:
    """The contents of a model file (any architecture), loaded with ``weights_only=True`` onto ``device``.

    SetupError if the file is missing, cannot be read without running pickled code, or is not a dict.
    """
    path = Path(path)
    if not path.is_file():
        raise SetupError(f"model file {path} not found; train one with `mlmm train` or give the right path")
    try:
        d = torch.load(str(path), map_location=device, weights_only=True)
    except Exception as e:                                  # corrupt file, or a pickle with code in it
        raise SetupError(f"model file {path} cannot be read as a network model ({type(e).__name__}: {e})") from None
    if not isinstance(d, dict):
        raise SetupError(f"model file {path} is not a network model file (no format_version)")
    return d


def file_architecture(contents: dict) -> str:
    """The architecture a model file declares (files written before the key existed: this network)."""
    return str(contents.get("architecture", ARCHITECTURE))


def load_model(path, device="cpu", contents: dict | None = None) -> EmbeddedAIMNet2:
    """Read a model file written by :func:`save_model`; returns the model in ``eval()`` mode on ``device``.

    ``contents``: the file's dict if already read (:func:`read_model_file`). The weights keep the dtype they
    were saved with (float32 unless the model was saved after ``.double()``); ``model.metadata`` holds the
    training metadata.
    """
    path = Path(path)
    d = read_model_file(path, device) if contents is None else contents
    if "format_version" not in d:
        raise SetupError(f"model file {path} is not a network model file (no format_version)")
    if file_architecture(d) != ARCHITECTURE:
        raise SetupError(f"model file {path} holds a {file_architecture(d)!r} model, not {ARCHITECTURE!r}; "
                         "load it with potentials.adapters.load_adapter")
    if d["format_version"] != FORMAT_VERSION:
        raise SetupError(f"model file {path} has format_version {d['format_version']}, this code reads "
                         f"{FORMAT_VERSION}; retrain the model or convert it with the matching version")
    if d.get("units") != UNITS:
        raise SetupError(f"model file {path} uses units {d.get('units')}, expected {UNITS}")
    model = EmbeddedAIMNet2(ModelConfig.from_dict(d["config"], where=f"model file {path} config"))
    dtype = d["state_dict"]["embedding"].dtype
    model.to(device=device, dtype=dtype)
    try:
        model.load_state_dict(d["state_dict"])
    except RuntimeError as e:
        raise SetupError(f"model file {path}: weights do not match its config ({e})") from None
    model.metadata = dict(d.get("metadata") or {})
    return model.eval()

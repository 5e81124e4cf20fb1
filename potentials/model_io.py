"""Model files of the embedding-aware network: one ``torch.save`` dict, loaded with ``weights_only=True``.

Keys: ``format_version``, ``architecture`` (the :data:`potentials.adapters.MODELS` entry that reads the
file: ``"embedded-aimnet2"``; files without the key are that architecture), ``config`` (ModelConfig.to_dict()),
``state_dict``, ``elements``, ``cutoff`` (Å), ``units`` (:data:`UNITS`: Å, eV, e, V, V/Å), ``metadata``
(training information: plain str/int/float/bool/None, lists and dicts of them).
Loading runs no pickled code and needs no network access.

``metadata["embedding"]`` records how the model's field inputs were made in training (:func:`embedding_metadata`,
stamped by ``mlmm train`` from the dataset's attributes): the scheme, the embedding cutoff and switch width of the
QM/MM labels (nm), the long-range treatment of the labels ("none": only the switched MM charges within the
cutoff) and the MM charge model. The ML client compares it with the system's ``[coupling]`` at start-up
(:func:`coupling.ml_engine.check_embedding`). Files written before the key (or with only the scheme's name as a
string) are read by :func:`trained_embedding` as far as they tell.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from potentials.core.errors import SetupError
from potentials.network import EmbeddedAIMNet2, ModelConfig

log = logging.getLogger(__name__)

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


def embedding_metadata(scheme: str, cutoff_nm: float, switch_nm: float, long_range: str = "none",
                       mm_charges: str = "force-field point charges of the MM atoms", source: str = "") -> dict:
    """The ``metadata["embedding"]`` entry of a model file: how the network's field inputs were made in training.

    ``scheme``: the training embedding (``coupling.schemes.SCHEMES`` name); ``cutoff_nm``/``switch_nm``: the
    embedding cutoff and switch width the QM/MM labels were computed with; ``long_range``: what the labels hold
    beyond the cutoff ("none": nothing; the run-time ``electrostatic-lr`` adds PME on top, see
    :func:`coupling.ml_engine.check_embedding`); ``mm_charges``: the MM charge model of the labels;
    ``source``: where the values come from (e.g. the dataset's attributes)."""
    return {"scheme": str(scheme), "cutoff_nm": float(cutoff_nm), "switch_nm": float(switch_nm),
            "long_range": str(long_range), "mm_charges": str(mm_charges), "source": str(source)}


def dataset_embedding(path, scheme: str, name: str | None = None) -> dict:
    """:func:`embedding_metadata` of a model trained in ``scheme`` on the QM/MM dataset ``path`` (``name``: how to
    call it, e.g. the original of a snapshot): the embedding cutoff, switch width and MM model its labels were
    computed with (global attributes ``embedding_cutoff_nm``, ``embedding_switch_nm``, ``mm_model``, written by
    ``mlmm label``). A dataset without them: the labelling defaults (those of ``[coupling]``), with a warning.
    The labels hold nothing beyond the cutoff: ``long_range = "none"``."""
    from potentials.core.spec import CouplingSpec

    name = str(path if name is None else name)
    try:
        import netCDF4

        with netCDF4.Dataset(str(path)) as nc:
            attrs = {k: nc.getncattr(k) for k in nc.ncattrs()}
    except (OSError, ImportError) as exc:
        log.warning("cannot read the attributes of %s (%s)", path, exc)
        attrs = {}
    if "embedding_cutoff_nm" in attrs and "embedding_switch_nm" in attrs:
        cutoff, switch = float(attrs["embedding_cutoff_nm"]), float(attrs["embedding_switch_nm"])
        source = f"attributes of the dataset {name}"
    else:
        default = CouplingSpec()
        cutoff, switch = default.cutoff_nm, default.switch_width_nm
        source = f"labelling defaults ({name} records no embedding_cutoff_nm/embedding_switch_nm)"
        log.warning("%s records no embedding cutoff/switch; the model's metadata assumes the labelling defaults "
                    "%.2f/%.2f nm", name, cutoff, switch)
    mm_model = str(attrs.get("mm_model", "")).split(";")[0].strip()
    mm_charges = "force-field point charges of the MM atoms" + (f": {mm_model}" if mm_model else "")
    return embedding_metadata(scheme, cutoff, switch, "none", mm_charges, source)


def trained_embedding(metadata: dict | None) -> dict | None:
    """The training embedding a model file records (:func:`embedding_metadata`), or None when it records none.

    Older files may hold only the scheme's name (``metadata["embedding"] = "electrostatic"``): then the cutoff
    and switch are None (unknown)."""
    emb = (metadata or {}).get("embedding")
    if isinstance(emb, str) and emb:
        return {"scheme": emb, "cutoff_nm": None, "switch_nm": None, "long_range": None, "mm_charges": None}
    if not isinstance(emb, dict) or not emb.get("scheme"):
        return None

    def number(key):
        value = emb.get(key)
        return None if value is None else float(value)

    return {"scheme": str(emb["scheme"]), "cutoff_nm": number("cutoff_nm"), "switch_nm": number("switch_nm"),
            "long_range": emb.get("long_range"), "mm_charges": emb.get("mm_charges")}


def stamp_embedding(path, dataset, scheme: str = "electrostatic") -> dict:
    """Record in the model file ``path`` (ours) the embedding of its training (:func:`dataset_embedding` of the
    QM/MM ``dataset`` it was trained on, in ``scheme``), for a file trained before ``mlmm train`` stamped it;
    weights and other metadata are left as they are. Returns the entry written."""
    d = read_model_file(path)
    if file_architecture(d) != ARCHITECTURE:
        raise SetupError(f"model file {path} holds a {file_architecture(d)!r} model; only {ARCHITECTURE!r} files "
                         "record a training embedding")
    entry = dataset_embedding(dataset, scheme)
    d["metadata"] = {**(d.get("metadata") or {}), "embedding": entry}
    torch.save(d, str(path))
    return entry


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

"""The training configuration of ``mlmm train``: :class:`TrainConfig` and the sectioned TOML layout it is read
from ([model] [data] [loss] [optim] [train] [output]; relative paths are relative to the config file's folder).
A top-level ``base = "OTHER.toml"`` starts from another config file and changes only the keys given (a later
training stage that differs from the one before in its seed and outputs).
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

from potentials.core.config import build, read_toml
from potentials.core.errors import SetupError

PRESET_DIR = Path(__file__).resolve().parent.parent / "inputs" / "models" / "configs"


# --------------------------------------------------------------------------------------------- config
@dataclass
class TrainConfig:
    """Everything ``mlmm train`` needs. Relative paths are relative to the config file's folder.

    Loss weights multiply mean squared errors in eV (per atom), eV/Å, e·Å and e.
    """

    dataset: str                         # QM/MM dataset (NetCDF4)
    output: str                          # model file written at the end (best validation state)
    model: dict = field(default_factory=dict)   # ModelConfig fields (after resolving `preset`)
    extra: list = field(default_factory=list)   # more datasets whose train/val frames join ([data] extra)
    checkpoint: str = ""                 # default: <output stem>.ckpt
    curve: str = ""                      # default: <output stem>_curve.png
    snapshot: bool = True                # copy the dataset first (it may be growing while we train)
    init_model: str = ""                 # start from this model file's weights and self-energies (fine-tuning)
    seed: int = 0
    epochs: int = 100
    batch_size: int = 16
    optimizer: str = "adamw"             # adamw | radam
    lr: float = 1e-3
    weight_decay: float = 1e-6
    clip_grad_norm: float = 10.0
    ema_decay: float = 0.0               # > 0: also keep an exponential moving average of the weights (per step)
    plateau_factor: float = 0.5
    plateau_patience: int = 5
    min_lr: float = 1e-5                 # stop once the scheduler goes below this
    early_stopping: int = 20             # epochs without validation improvement
    w_energy: float = 1.0
    w_forces: float = 1.0
    w_mm_forces: float = 1.0
    w_dipole: float = 0.1
    w_charges: float = 0.0
    max_frames: dict = field(default_factory=dict)   # optional cap per split, e.g. {train = 200}
    threads: int = 1                     # torch CPU threads (the QM labeller needs the other core)
    embedding: str = "electrostatic"     # the embedding scheme the model is trained for (coupling.schemes)
    max_minutes: float = 0.0             # stop after this wall time (0: no limit); the best state is saved
    progress: bool = True
    committee: int = 1                   # > 1: train that many members into one committee file (--committee K)

    @classmethod
    def from_toml(cls, path: str | Path) -> "TrainConfig":
        path = Path(path)
        if not path.is_file():
            raise SetupError(f"training config {path} not found; give the path of a TOML file "
                             "(see inputs/models/train_*.toml)")
        return cls.from_dict(_read_with_base(path), base=path.parent, where=str(path))

    @classmethod
    def from_dict(cls, raw: dict, base: Path | str = ".", where: str = "training config") -> "TrainConfig":
        """Flatten the TOML sections ([model], [data], [loss], [optim], [train], [output]), then build the
        config with :func:`potentials.core.config.build` (types checked, errors name ``where`` and the key)."""
        base = Path(base)
        cfg = build(cls, _flatten(dict(raw), base), where)
        cfg.dataset = str((base / cfg.dataset).resolve())
        cfg.extra = [str((base / str(p)).resolve()) for p in cfg.extra]
        cfg.output = str((base / cfg.output).resolve())
        stem = str(Path(cfg.output).with_suffix(""))
        cfg.checkpoint = str((base / cfg.checkpoint).resolve()) if cfg.checkpoint else stem + ".ckpt"
        cfg.curve = str((base / cfg.curve).resolve()) if cfg.curve else stem + "_curve.png"
        if cfg.init_model:
            cfg.init_model = str((base / cfg.init_model).resolve())
        if not 0.0 <= cfg.ema_decay < 1.0:
            raise SetupError(f"{where}: [optim] ema_decay must be in [0, 1) (0: off; 0.99-0.999 usual), "
                             f"not {cfg.ema_decay}")
        if cfg.optimizer not in ("adamw", "radam"):
            raise SetupError(f"{where}: optimizer {cfg.optimizer!r} unknown; choose adamw or radam")
        if cfg.committee < 1:
            raise SetupError(f"{where}: committee must be >= 1 (members of the committee), got {cfg.committee}")
        if cfg.batch_size < 1 or cfg.epochs < 0:
            raise SetupError(f"{where}: batch_size must be >= 1 and epochs >= 0")
        return cfg


# keys holding paths (relative to their file's folder), by section; "" is the top level
_PATH_KEYS = {"data": ("path", "extra"), "output": ("model", "checkpoint", "curve"), "train": ("init_model",),
              "": ("dataset", "extra", "output", "checkpoint", "curve", "init_model")}


def _read_with_base(path: Path, chain: tuple = ()) -> dict:
    """The TOML file as a dict, with ``base = "OTHER.toml"`` resolved: OTHER (itself possibly based on a third
    file) read first, its relative paths made absolute against its own folder, then this file's keys laid over
    it table by table ([model.config] key by key; lists such as [data] extra are replaced, not appended)."""
    path = path.resolve()
    if path in chain:
        raise SetupError(f"training config {chain[0]}: base files form a loop "
                         f"({' -> '.join(p.name for p in (*chain, path))}); remove one base key")
    raw = read_toml(path, "training config")
    ref = raw.pop("base", None)
    if ref is None:
        return raw
    if not isinstance(ref, str):
        raise SetupError(f"{path}: base must be the path of another training config (a string), not {ref!r}")
    parent_path = (path.parent / ref)
    if not parent_path.is_file():
        raise SetupError(f"{path}: base = {ref!r}: no such file (relative paths are relative to {path.parent})")
    parent = _absolute_paths(_read_with_base(parent_path, (*chain, path)), parent_path.resolve().parent)
    return _overlay(parent, raw)


def _absolute_paths(raw: dict, folder: Path) -> dict:
    """``raw`` with its relative path values made absolute against ``folder`` (so a base file's paths keep meaning
    what they meant there); a [model] preset is rebased only when it names a file there, not a preset name."""
    def fix(v):
        if isinstance(v, list):
            return [fix(x) for x in v]
        return str((folder / v).resolve()) if isinstance(v, str) and v else v

    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for section, keys in _PATH_KEYS.items():
        table = out if section == "" else out.get(section)
        if isinstance(table, dict):
            for k in keys:
                if k in table and not (section == "" and isinstance(table[k], dict)):
                    table[k] = fix(table[k])
    model = out.get("model")
    if isinstance(model, dict) and isinstance(model.get("preset"), str) and (folder / model["preset"]).is_file():
        model["preset"] = str((folder / model["preset"]).resolve())
    return out


def _overlay(parent: dict, child: dict) -> dict:
    """``child`` laid over ``parent``: tables merge key by key (recursively), anything else is replaced."""
    out = dict(parent)
    for k, v in child.items():
        out[k] = _overlay(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _flatten(raw: dict, base: Path) -> dict:
    """The sectioned TOML layout as TrainConfig's flat keys ([loss] energy -> w_energy, [data] path ->
    dataset, [output] model -> output; top-level keys are accepted too); unknown keys are errors."""
    flat: dict = {}
    model = dict(raw.pop("model", {}))
    preset = model.pop("preset", None)
    inline = model.pop("config", {})
    if model:
        raise SetupError(f"[model]: unknown keys {sorted(model)}; use preset = NAME|PATH and/or [model.config]")
    flat["model"] = {**(_load_preset(preset, base) if preset else {}), **inline}
    if not flat["model"]:
        raise SetupError("[model]: give preset = \"small\" (a file in inputs/models/configs) or [model.config]")
    names = {f.name for f in fields(TrainConfig)}
    renames = {"loss": "w_", "data": "", "optim": "", "train": "", "output": ""}
    for section, prefix in renames.items():
        for key, value in raw.pop(section, {}).items():
            name = prefix + key if section == "loss" else key
            if section == "data" and key == "path":
                name = "dataset"
            if section == "output" and key == "model":
                name = "output"
            if name not in names or name == "model":
                known = sorted(n.removeprefix(prefix) for n in names - {"model"} if n.startswith(prefix))
                raise SetupError(f"[{section}] {key}: unknown key; known: {known}")
            flat[name] = value
    for key, value in raw.items():          # top-level keys (seed = 0, ...) are accepted too
        if key not in names or key == "model":
            raise SetupError(f"unknown config key {key!r}; sections are [model] [data] [loss] [optim] "
                             "[train] [output]")
        flat[key] = value
    for key in ("dataset", "output"):
        if key not in flat:
            raise SetupError(f"training config: {key} missing ([data] path = ..., [output] model = ...)")
    return flat


def _load_preset(preset: str, base: Path) -> dict:
    """A preset name (inputs/models/configs/NAME.toml) or a path to a TOML file holding ModelConfig keys."""
    candidates = [PRESET_DIR / f"{preset}.toml", base / preset, Path(preset)]
    for c in candidates:
        if c.is_file():
            raw = read_toml(c, "model preset")
            return dict(raw.get("model", raw))
    known = sorted(p.stem for p in PRESET_DIR.glob("*.toml"))
    raise SetupError(f"model preset {preset!r} not found; known presets: {known}, or give a TOML path")

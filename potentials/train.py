"""Training of the embedding-aware network: ``mlmm train CONFIG`` (evaluation: :mod:`potentials.evaluate`).

Data come from the QM/MM reference dataset (:mod:`potentials.dataset`, Å / eV / e). For every frame the MM
point charges are stored already scaled by the embedding switch, so the network's field inputs are
recomputed here with the one definition, :func:`coupling.embedding.potential_and_field`, and forces on ML
atoms and on MM charges come out of autograd through that function, exactly as in the ML client.

Loss (units eV, Å, e; weights from the config)::

    L = w_E MSE(ΔE / N_atoms) + w_F MSE(ΔF_ML) + w_MM MSE(ΔF_MM) + w_mu MSE(Δμ) [+ w_q MSE(Δq)]

with μ = Σ q_i (r_i − centroid) from the predicted charges. Per-element self-energies are fitted by least
squares on the training split and written into the model's float64 shift before training. Splits are the
dataset's own (by trajectory). A checkpoint is written every epoch (``--resume`` continues bit-identically:
the batch order depends only on seed and epoch); the best validation state is saved as the model.

The mechanical-embedding baseline (:func:`predict` with ``mode="mechanical"``) evaluates the SAME model in
vacuum (φ = E = 0) and adds the Coulomb energy of its vacuum charges, held fixed, with the MM charges: what
the coupling layer's mechanical mode computes in a simulation.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import random
import shutil
import sys
import time
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

from coupling.embedding import potential_and_field
from driver.errors import SetupError
from driver.units import EV_PER_KJMOL, KCALMOL_PER_EV, NM_PER_ANGSTROM

log = logging.getLogger(__name__)

PRESET_DIR = Path(__file__).resolve().parent.parent / "inputs" / "models" / "configs"
_FRAME_KEYS = ("numbers", "total_charge", "positions", "mm_positions", "mm_charges", "energy", "forces",
               "mm_forces", "dipole")


# --------------------------------------------------------------------------------------------- config
@dataclass
class TrainConfig:
    """Everything ``mlmm train`` needs. Relative paths are relative to the config file's folder.

    Loss weights multiply mean squared errors in eV (per atom), eV/Å, e·Å and e.
    """

    dataset: str                         # QM/MM dataset (NetCDF4)
    output: str                          # model file written at the end (best validation state)
    model: dict = field(default_factory=dict)   # ModelConfig fields (after resolving `preset`)
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
    max_minutes: float = 0.0             # stop after this wall time (0: no limit); the best state is saved
    progress: bool = True

    @classmethod
    def from_toml(cls, path: str | Path) -> "TrainConfig":
        path = Path(path)
        if not path.is_file():
            raise SetupError(f"training config {path} not found; give the path of a TOML file "
                             "(see inputs/models/train_*.toml)")
        try:
            raw = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise SetupError(f"{path}: not valid TOML ({exc})") from None
        return cls.from_dict(raw, base=path.parent)

    @classmethod
    def from_dict(cls, raw: dict, base: Path | str = ".") -> "TrainConfig":
        """Flatten the TOML sections ([model], [data], [loss], [optim], [train], [output]) and check keys."""
        base = Path(base)
        raw = dict(raw)
        flat: dict = {}
        model = dict(raw.pop("model", {}))
        preset = model.pop("preset", None)
        inline = model.pop("config", {})
        if model:
            raise SetupError(f"[model]: unknown keys {sorted(model)}; use preset = NAME|PATH and/or [model.config]")
        flat["model"] = {**(_load_preset(preset, base) if preset else {}), **inline}
        if not flat["model"]:
            raise SetupError("[model]: give preset = \"small\" (a file in inputs/models/configs) or [model.config]")
        names = {f.name for f in fields(cls)}
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
        cfg = cls(**flat)
        cfg.dataset = str((base / cfg.dataset).resolve())
        cfg.output = str((base / cfg.output).resolve())
        stem = str(Path(cfg.output).with_suffix(""))
        cfg.checkpoint = str((base / cfg.checkpoint).resolve()) if cfg.checkpoint else stem + ".ckpt"
        cfg.curve = str((base / cfg.curve).resolve()) if cfg.curve else stem + "_curve.png"
        if cfg.init_model:
            cfg.init_model = str((base / cfg.init_model).resolve())
        if cfg.optimizer not in ("adamw", "radam"):
            raise SetupError(f"optimizer {cfg.optimizer!r} unknown; choose adamw or radam")
        if cfg.batch_size < 1 or cfg.epochs < 0:
            raise SetupError("batch_size must be >= 1 and epochs >= 0")
        return cfg


def _load_preset(preset: str, base: Path) -> dict:
    """A preset name (inputs/models/configs/NAME.toml) or a path to a TOML file holding ModelConfig keys."""
    candidates = [PRESET_DIR / f"{preset}.toml", base / preset, Path(preset)]
    for c in candidates:
        if c.is_file():
            raw = tomllib.loads(c.read_text())
            return dict(raw.get("model", raw))
    known = sorted(p.stem for p in PRESET_DIR.glob("*.toml"))
    raise SetupError(f"model preset {preset!r} not found; known presets: {known}, or give a TOML path")


# --------------------------------------------------------------------------------------------- data
def load_frames(path: str | Path, split: str | None = None, limit: int | None = None,
                indices: list[int] | None = None) -> list[dict]:
    """Frames of one split as dicts of numpy arrays (Å, eV, e), plus "solute", "index" and "charge"."""
    from potentials.dataset import Dataset

    ds = Dataset.open(str(path))
    try:
        if indices is None:
            indices = list(range(len(ds))) if split in (None, "all") else list(ds.indices(split))
        if limit is not None:
            indices = indices[:limit]
        frames = []
        for i in indices:
            f = ds.frame(int(i))
            missing = [k for k in _FRAME_KEYS if k not in f]
            if missing:
                raise SetupError(f"{path}: frame {i} lacks {missing}; is this a QM/MM dataset from `mlmm label`?")
            frames.append({**f, "index": int(i)})
    finally:
        close = getattr(ds, "close", None)
        if close:
            close()
    return frames


def snapshot_dataset(path: str, dest: str, tries: int = 5) -> str:
    """Copy a dataset that may be growing and check that the copy opens (HDF5 can be mid-write)."""
    from potentials.dataset import Dataset

    for attempt in range(tries):
        shutil.copyfile(path, dest)
        try:
            ds = Dataset.open(dest)
            n = len(ds)
            getattr(ds, "close", lambda: None)()
            log.info("dataset snapshot %s: %d frames", dest, n)
            return dest
        except Exception as exc:          # noqa: BLE001 - any read error of a half-written file: retry
            log.warning("snapshot of %s unreadable (%s); retrying", path, exc)
            time.sleep(2.0 + attempt)
    raise SetupError(f"could not take a readable snapshot of {path} after {tries} tries")


@dataclass
class Batch:
    """Frames concatenated for one network call (flat batching). Lengths: N ML atoms, M MM charges, B frames."""

    numbers: torch.Tensor        # [N] long
    positions: torch.Tensor      # [N,3] Å
    mol_idx: torch.Tensor        # [N] long
    charge: torch.Tensor         # [B] e
    n_atoms: torch.Tensor        # [B]
    ml_off: list[int]
    mm_off: list[int]
    mm_positions: torch.Tensor   # [M,3] Å
    mm_charges: torch.Tensor     # [M] e
    energy: torch.Tensor         # [B] eV float64
    forces: torch.Tensor         # [N,3] eV/Å
    mm_forces: torch.Tensor      # [M,3] eV/Å
    dipole: torch.Tensor         # [B,3] e·Å
    atomic_charges: torch.Tensor | None
    solute: list[str]


def collate(frames: list[dict], device: torch.device | str = "cpu", dtype=torch.float32) -> Batch:
    def cat(key, dt=dtype):
        return torch.as_tensor(np.concatenate([np.asarray(f[key]).reshape(-1, *np.shape(f[key])[1:])
                                               for f in frames]), dtype=dt, device=device)

    n = [len(f["numbers"]) for f in frames]
    m = [len(f["mm_charges"]) for f in frames]
    q_at = None
    if all(f.get("charges") is not None and np.size(f.get("charges")) == len(f["numbers"]) for f in frames):
        q_at = cat("charges")
    return Batch(
        numbers=cat("numbers", torch.long),
        positions=cat("positions"),
        mol_idx=torch.repeat_interleave(torch.arange(len(frames), device=device), torch.tensor(n, device=device)),
        charge=torch.tensor([float(f["total_charge"]) for f in frames], dtype=dtype, device=device),
        n_atoms=torch.tensor(n, dtype=torch.float64, device=device),
        ml_off=np.concatenate([[0], np.cumsum(n)]).tolist(),
        mm_off=np.concatenate([[0], np.cumsum(m)]).tolist(),
        mm_positions=cat("mm_positions").reshape(-1, 3),
        mm_charges=cat("mm_charges").reshape(-1),
        energy=torch.tensor([float(f["energy"]) for f in frames], dtype=torch.float64, device=device),
        forces=cat("forces"),
        mm_forces=cat("mm_forces").reshape(-1, 3),
        dipole=torch.as_tensor(np.stack([f["dipole"] for f in frames]), dtype=dtype, device=device),
        atomic_charges=q_at,
        solute=[str(f.get("solute", "")) for f in frames],
    )


# --------------------------------------------------------------------------------------------- model call
def mm_potential_field(b: Batch, positions: torch.Tensor, mm_positions: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """φ (V) and E (V/Å) of each frame's MM charges at its ML atoms, differentiable in both position sets."""
    phis, fields_ = [], []
    for k in range(len(b.ml_off) - 1):
        a0, a1, m0, m1 = b.ml_off[k], b.ml_off[k + 1], b.mm_off[k], b.mm_off[k + 1]
        if m1 == m0:                                   # gas-phase frame
            phis.append(positions.new_zeros(a1 - a0))
            fields_.append(positions.new_zeros(a1 - a0, 3))
            continue
        phi, ef = potential_and_field(positions[a0:a1] * NM_PER_ANGSTROM, mm_positions[m0:m1] * NM_PER_ANGSTROM,
                                      b.mm_charges[m0:m1])
        phis.append(phi * EV_PER_KJMOL)                        # kJ/mol/e -> V
        fields_.append(ef * (EV_PER_KJMOL * NM_PER_ANGSTROM))  # kJ/mol/e/nm -> V/Å
    return torch.cat(phis), torch.cat(fields_)


def predict(model: torch.nn.Module, b: Batch, mode: str = "electrostatic", create_graph: bool = False
            ) -> dict[str, torch.Tensor]:
    """Energy [B] eV, forces [N,3] and MM forces [M,3] eV/Å, charges [N] e, dipole [B,3] e·Å.

    mode "electrostatic": φ, E of the MM charges enter the network. "mechanical": the network sees φ = E = 0
    and its vacuum charges, held fixed, interact with the MM charges by plain Coulomb. "gas": φ = E = 0 and
    no interaction (the model's vacuum energy at the same geometry).
    """
    pos = b.positions.detach().requires_grad_(True)
    mm = b.mm_positions.detach().requires_grad_(True)
    phi, ef = mm_potential_field(b, pos, mm)
    if mode == "electrostatic":
        out = model(b.numbers, pos, b.mol_idx, b.charge, phi, ef)
        energy = out["energy"]
    elif mode in ("mechanical", "gas"):
        out = model(b.numbers, pos, b.mol_idx, b.charge, torch.zeros_like(phi), torch.zeros_like(ef))
        energy = out["energy"]
        if mode == "mechanical":
            coul = out["charges"].detach() * phi              # q_i φ_i in eV
            energy = energy + torch.zeros_like(energy).index_add_(0, b.mol_idx, coul.to(energy.dtype))
    else:
        raise SetupError(f"mode {mode!r} unknown; choose electrostatic, mechanical or gas")
    g_pos, g_mm = torch.autograd.grad(energy.sum(), [pos, mm], create_graph=create_graph, allow_unused=True)
    if g_mm is None:                                    # batch of gas-phase frames only
        g_mm = torch.zeros_like(mm)
    q = out["charges"]
    centroid = torch.zeros(len(b.energy), 3, dtype=pos.dtype, device=pos.device).index_add_(0, b.mol_idx, pos)
    centroid = centroid / b.n_atoms.to(pos.dtype)[:, None]
    dipole = torch.zeros_like(centroid).index_add_(0, b.mol_idx, q.to(pos.dtype)[:, None] * (pos - centroid[b.mol_idx]))
    return {"energy": energy, "forces": -g_pos, "mm_forces": -g_mm, "charges": q, "dipole": dipole}


def loss_terms(pred: dict, b: Batch) -> dict[str, torch.Tensor]:
    """Mean squared errors (eV/atom)², (eV/Å)², (e·Å)², e² of one batch."""
    de = (pred["energy"] - b.energy) / b.n_atoms
    terms = {
        "energy": (de ** 2).mean(),
        "forces": ((pred["forces"] - b.forces) ** 2).mean(),
        "mm_forces": ((pred["mm_forces"] - b.mm_forces) ** 2).mean() if len(b.mm_forces) else de.new_zeros(()),
        "dipole": ((pred["dipole"] - b.dipole) ** 2).mean(),
    }
    if b.atomic_charges is not None:
        terms["charges"] = ((pred["charges"] - b.atomic_charges) ** 2).mean()
    return terms


def total_loss(terms: dict, cfg: TrainConfig) -> torch.Tensor:
    w = {"energy": cfg.w_energy, "forces": cfg.w_forces, "mm_forces": cfg.w_mm_forces,
         "dipole": cfg.w_dipole, "charges": cfg.w_charges}
    return sum(w[k] * v.to(torch.float64) for k, v in terms.items() if w[k] != 0.0)


# --------------------------------------------------------------------------------------------- self-energies
def shift_parameter(model: torch.nn.Module) -> tuple[torch.Tensor, list[int]]:
    """The model's per-element float64 energy shift and the atomic number of each of its entries."""
    shift = getattr(getattr(model, "shift", None), "weight", None)
    if not isinstance(shift, torch.Tensor):
        raise SetupError("the model has no per-element energy shift `shift.weight`; cannot fit self-energies")
    elements = [int(z) for z in model.config.elements]
    return shift, elements


def fit_self_energies(frames: list[dict], elements: list[int]) -> np.ndarray:
    """Least-squares per-element energies (eV) from the element counts of each frame: E ≈ Σ_Z n_Z e_Z.

    With fewer distinct compositions than elements the system is underdetermined; lstsq then returns the
    minimum-norm solution, which is fine as a starting point for the network.
    """
    col = {z: k for k, z in enumerate(elements)}
    counts = np.zeros((len(frames), len(elements)))
    for i, f in enumerate(frames):
        for z in np.asarray(f["numbers"]):
            if int(z) not in col:
                raise SetupError(f"frame {f['index']}: element Z={int(z)} not in the model's elements {elements}")
            counts[i, col[int(z)]] += 1
    energy = np.array([float(f["energy"]) for f in frames])
    sae, *_ = np.linalg.lstsq(counts, energy, rcond=None)
    return sae


def set_self_energies(model: torch.nn.Module, sae: np.ndarray) -> None:
    shift, elements = shift_parameter(model)
    with torch.no_grad():
        shift.copy_(torch.as_tensor(sae, dtype=shift.dtype, device=shift.device))   # one entry per element


# --------------------------------------------------------------------------------------------- training
def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _batches(n: int, size: int, seed: int, epoch: int, shuffle: bool) -> list[np.ndarray]:
    """Batch indices for one epoch; the order depends only on (seed, epoch), so resuming repeats it."""
    order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
    return [order[i:i + size] for i in range(0, n, size)]


@dataclass
class TrainState:
    epoch: int = 0
    best_val: float = math.inf
    best_epoch: int = -1
    bad_epochs: int = 0
    history: list = field(default_factory=list)


def build_model(cfg: TrainConfig, device) -> torch.nn.Module:
    from potentials.network import EmbeddedAIMNet2, ModelConfig

    return EmbeddedAIMNet2(ModelConfig.from_dict(cfg.model), seed=cfg.seed).to(device)


def _make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    shift, _ = shift_parameter(model)
    # no weight decay on the self-energies (absolute energies, eV-large)
    decay = [p for p in model.parameters() if p.requires_grad and p is not shift]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}]
    if shift.requires_grad:
        groups.append({"params": [shift], "weight_decay": 0.0})
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.RAdam
    if cls is torch.optim.RAdam:
        return cls(groups, lr=cfg.lr, decoupled_weight_decay=True)
    return cls(groups, lr=cfg.lr)


# Model selection (early stopping, best state, LR schedule) uses the validation MAEs divided by the project's
# targets (kcal/mol, kcal/mol/Å), not the MSE loss: the MSE is dominated by a few strongly displaced frames
# and then picks states with worse typical errors.
SCORE_TARGETS = {"energy": 0.5, "force": 1.0, "mm_force": 0.2}


def evaluate_loss(model, frames, cfg: TrainConfig, device, dtype) -> dict[str, float]:
    """Validation loss, its terms and MAEs (kcal/mol, kcal/mol/Å); forces by autograd, no graph kept."""
    sums: dict[str, float] = {}
    for idx in _batches(len(frames), cfg.batch_size, 0, 0, shuffle=False):
        b = collate([frames[i] for i in idx], device, dtype)
        pred = predict(model, b)
        terms = {name: v.detach() for name, v in loss_terms(pred, b).items()}
        k = len(idx) / len(frames)
        sums["loss"] = sums.get("loss", 0.0) + k * float(total_loss(terms, cfg))
        for name, v in terms.items():
            sums[name] = sums.get(name, 0.0) + k * float(v)
        maes = {"energy_mae": (pred["energy"].detach() - b.energy).abs().mean(),
                "force_mae": (pred["forces"].detach() - b.forces).abs().mean(),
                "mm_force_mae": (pred["mm_forces"].detach() - b.mm_forces).abs().mean()
                if len(b.mm_forces) else torch.zeros(())}
        for name, v in maes.items():   # weighted by frames, close enough for monitoring
            sums[name] = sums.get(name, 0.0) + k * KCALMOL_PER_EV * float(v)
    sums["score"] = sum(sums[f"{name}_mae"] / target for name, target in SCORE_TARGETS.items())
    return sums


def train(cfg: TrainConfig, device: str = "cpu", resume: bool = False) -> Path:
    """Train a model as configured; returns the path of the saved model (best validation state)."""
    from potentials.model_io import save_model

    torch.set_num_threads(max(1, cfg.threads))
    device = torch.device(device)
    if not Path(cfg.dataset).is_file():
        raise SetupError(f"dataset {cfg.dataset} not found; run `mlmm label` or fix [data] path")
    Path(cfg.output).parent.mkdir(parents=True, exist_ok=True)
    ckpt_path = Path(cfg.checkpoint)
    data_path = cfg.dataset
    snap = str(Path(cfg.checkpoint).with_suffix(".data.nc"))
    if resume and ckpt_path.is_file() and cfg.snapshot and Path(snap).is_file():
        data_path = snap                         # resume on the very same frames
    elif cfg.snapshot:
        data_path = snapshot_dataset(cfg.dataset, snap)
    splits = {s: load_frames(data_path, s, cfg.max_frames.get(s)) for s in ("train", "val")}
    if not splits["train"] or not splits["val"]:
        raise SetupError(f"{cfg.dataset}: need frames in both train and val splits "
                         f"(found {len(splits['train'])} / {len(splits['val'])})")
    log.info("training on %d frames, validating on %d", len(splits["train"]), len(splits["val"]))

    _seed_everything(cfg.seed)
    model = build_model(cfg, device)
    dtype = next(model.parameters()).dtype
    if cfg.init_model:
        from potentials.model_io import load_model

        init = load_model(cfg.init_model, device)
        if init.config.to_dict() != model.config.to_dict():
            raise SetupError(f"init_model {cfg.init_model} has another architecture than [model]; "
                             "use the same preset")
        model.load_state_dict(init.state_dict())
        sae = model.shift.weight.detach().cpu().numpy()
        log.info("starting from the weights of %s", cfg.init_model)
    else:
        sae = fit_self_energies(splits["train"], [int(z) for z in model.config.elements])
        set_self_energies(model, sae)
    opt = _make_optimizer(model, cfg)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=cfg.plateau_factor,
                                                       patience=cfg.plateau_patience)
    state = TrainState()
    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if resume and ckpt_path.is_file():
        ck = torch.load(ckpt_path, map_location=device, weights_only=True)   # plain tensors/containers only
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        state = TrainState(**ck["state"])
        best_state = ck["best_model"]
        torch.set_rng_state(ck["torch_rng"])
        log.info("resumed from %s at epoch %d", ckpt_path, state.epoch)
    elif resume:
        log.warning("--resume: no checkpoint at %s, starting fresh", ckpt_path)

    from tqdm import tqdm

    t_start = time.time()
    while state.epoch < cfg.epochs:
        model.train()
        batches = _batches(len(splits["train"]), cfg.batch_size, cfg.seed, state.epoch, shuffle=True)
        running, t0 = 0.0, time.time()
        bar = tqdm(batches, desc=f"epoch {state.epoch + 1}/{cfg.epochs}",
                   disable=not (cfg.progress and sys.stderr.isatty()),
                   leave=False, mininterval=5.0)
        for idx in bar:
            b = collate([splits["train"][i] for i in idx], device, dtype)
            loss = total_loss(loss_terms(predict(model, b, create_graph=True), b), cfg)
            opt.zero_grad(set_to_none=True)
            if not torch.isfinite(loss):
                log.warning("non-finite loss in epoch %d; batch skipped", state.epoch + 1)
                continue
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad_norm)
            opt.step()
            running += float(loss.detach()) * len(idx)
            bar.set_postfix(loss=f"{float(loss.detach()):.3g}")
        model.eval()
        val = evaluate_loss(model, splits["val"], cfg, device, dtype)
        sched.step(val["score"])
        lr = opt.param_groups[0]["lr"]
        state.epoch += 1
        state.history.append({"epoch": state.epoch, "train_loss": running / len(splits["train"]),
                              "val_loss": val["loss"], "val_score": val["score"],
                              "val_energy_mae": val["energy_mae"],
                              "val_force_mae": val["force_mae"], "val_mm_force_mae": val["mm_force_mae"],
                              "lr": lr, "seconds": time.time() - t0})
        if val["score"] < state.best_val:
            state.best_val, state.best_epoch, state.bad_epochs = val["score"], state.epoch, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            state.bad_epochs += 1
        h = state.history[-1]
        log.info("epoch %d: train %.4g val %.4g score %.3f | val MAE: E %.3f kcal/mol, F %.3f, MM F %.3f "
                 "kcal/mol/Å | lr %.2g | %.0f s", state.epoch, h["train_loss"], h["val_loss"], h["val_score"],
                 h["val_energy_mae"], h["val_force_mae"], h["val_mm_force_mae"], lr, h["seconds"])
        _save_checkpoint(ckpt_path, model, opt, sched, state, best_state)
        plot_curve(state.history, cfg.curve)
        if state.bad_epochs >= cfg.early_stopping:
            log.info("early stopping: no validation improvement for %d epochs", state.bad_epochs)
            break
        if lr < cfg.min_lr:
            log.info("learning rate %.2g below min_lr %.2g: stopping", lr, cfg.min_lr)
            break
        if cfg.max_minutes and time.time() - t_start > 60.0 * cfg.max_minutes:
            log.info("time budget of %.0f min used up: stopping", cfg.max_minutes)
            break

    model.load_state_dict(best_state)
    model.eval()
    metadata = {
        "training": {k: v for k, v in asdict(cfg).items() if k not in ("progress",)},
        "dataset": cfg.dataset, "n_train": len(splits["train"]), "n_val": len(splits["val"]),
        "self_energies_ev": dict(zip([int(z) for z in model.config.elements], map(float, sae))),
        "best_epoch": state.best_epoch, "epochs_run": state.epoch, "history": state.history,
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }
    save_model(cfg.output, model, metadata)
    plot_curve(state.history, cfg.curve)
    log.info("saved %s (best epoch %d, validation score %.4g)", cfg.output, state.best_epoch, state.best_val)
    return Path(cfg.output)


def _save_checkpoint(path: Path, model, opt, sched, state: TrainState, best_state) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "state": asdict(state), "best_model": best_state, "torch_rng": torch.get_rng_state()}, tmp)
    os.replace(tmp, path)                         # never leave a half-written checkpoint behind


def plot_curve(history: list[dict], path: str) -> None:
    """Training/validation loss and validation MAE/RMSE vs epoch (PNG, matplotlib Agg)."""
    if not history:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [h["epoch"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.semilogy(ep, [h["train_loss"] for h in history], label="train")
    a.semilogy(ep, [h["val_loss"] for h in history], label="validation")
    a.set_xlabel("epoch"), a.set_ylabel("loss"), a.legend()
    b.semilogy(ep, [h["val_energy_mae"] for h in history], label="energy MAE (kcal/mol)")
    b.semilogy(ep, [h["val_force_mae"] for h in history], label="ML force MAE (kcal/mol/Å)")
    b.semilogy(ep, [h["val_mm_force_mae"] for h in history], label="MM force MAE (kcal/mol/Å)")
    b.set_xlabel("epoch"), b.set_title("validation"), b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# --------------------------------------------------------------------------------------------- CLI
def main(args: argparse.Namespace) -> int:
    """``mlmm train CONFIG [--device D] [--resume]``."""
    cfg = TrainConfig.from_toml(args.config)
    train(cfg, device=args.device, resume=args.resume)
    return 0

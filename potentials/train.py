"""Training of the embedding-aware network: ``mlmm train CONFIG`` (evaluation: :mod:`potentials.evaluate`).

Data come from the QM/MM reference dataset (:mod:`potentials.dataset`, Å / eV / e; frames and batches:
:mod:`potentials.batches`). For every frame the MM point charges are stored already scaled by the embedding
switch, so the network's field inputs are recomputed here with the one definition,
:func:`potentials.electrostatics.potential_and_field` (in Å and V), and forces on ML atoms and on MM charges
come out of autograd through that function.

How the network's energy is formed from phi and E is the embedding scheme's business: :func:`predict`,
:func:`train` and :func:`potentials.evaluate.evaluate` are handed scheme objects
(:class:`potentials.core.contracts.TrainingScheme`, from ``coupling.schemes.SCHEMES``; the ``mlmm train``
command, :mod:`driver.pipeline`, resolves the config's ``embedding``). This module imports no scheme.

Loss (units eV, Å, e; weights from the config)::

    L = w_E MSE(ΔE / N_atoms) + w_F MSE(ΔF_ML) + w_MM MSE(ΔF_MM) + w_mu MSE(Δμ) [+ w_q MSE(Δq)]

with μ = −∂E/∂E₀, the response to a uniform field (:func:`predict`). Per-element self-energies are fitted by least
squares on the training split and written into the model's float64 shift before training. Splits are the
dataset's own (by trajectory). A checkpoint is written every epoch (``--resume`` continues bit-identically:
the batch order depends only on seed and epoch); the best validation state is saved as the model. With
``ema_decay`` an exponential moving average of the weights is kept as well, and whichever of the two validates
better each epoch is that epoch's candidate (:func:`_fit`).

The mechanical-embedding baseline (:func:`predict` with the "mechanical" scheme) evaluates the SAME model in
vacuum (φ = E = 0) and adds the Coulomb energy of its vacuum charges, held fixed, with the MM charges; a
simulation fixes them once, at its start, and ``mlmm evaluate`` does the same per trajectory
(:func:`potentials.evaluate.mechanical_charges`). Without a scheme, :func:`predict` gives the
model's vacuum energy at the same geometry (no interaction).
"""
from __future__ import annotations

import logging
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from potentials.batches import Batch, _batches, collate, load_frames, snapshot_dataset  # noqa: F401 (re-exported)
from potentials.core.errors import SetupError
from potentials.core.units import COULOMB_EV_ANGSTROM, KCALMOL_PER_EV
from potentials.domain import training_domain
from potentials.electrostatics import damped_field_excess, potential_and_field
from potentials.train_config import PRESET_DIR, TrainConfig, _flatten, _load_preset  # noqa: F401 (re-exported)
from potentials.widen import WIDTHS, check_widths, grown_state, like_element

if TYPE_CHECKING:
    from potentials.core.contracts import TrainingScheme

log = logging.getLogger(__name__)

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
        phi, ef = potential_and_field(positions[a0:a1], mm_positions[m0:m1], b.mm_charges[m0:m1],
                                      k=COULOMB_EV_ANGSTROM)             # Å, e -> V, V/Å
        phis.append(phi)
        fields_.append(ef)
    return torch.cat(phis), torch.cat(fields_)


def mm_damped_excess(b: Batch, positions: torch.Tensor, mm_positions: torch.Tensor, width: float) -> torch.Tensor:
    """The part of each frame's MM field (V/Å) that the polarisation term's short-range damping removes
    (:func:`potentials.electrostatics.damped_field_excess`, width Å), differentiable in both position sets."""
    parts = []
    for k in range(len(b.ml_off) - 1):
        a0, a1, m0, m1 = b.ml_off[k], b.ml_off[k + 1], b.mm_off[k], b.mm_off[k + 1]
        parts.append(damped_field_excess(positions[a0:a1], mm_positions[m0:m1], b.mm_charges[m0:m1], width,
                                         k=COULOMB_EV_ANGSTROM))
    return torch.cat(parts)


class _DampedPolarisation:
    """The network called by a scheme with (phi, E), given the damped field E - excess for its polarisation
    term (a uniform probe field added to E reaches both, as it should: damping concerns point charges)."""

    def __init__(self, model, excess: torch.Tensor):
        self.model, self.excess = model, excess

    def __call__(self, numbers, positions, mol_idx, charge, phi, field):
        return self.model(numbers, positions, mol_idx, charge, phi, field,
                          efield_pol=field - self.excess.to(field.dtype))


def predict(model: torch.nn.Module, b: Batch, scheme: "TrainingScheme | None" = None,
            create_graph: bool = False) -> dict[str, torch.Tensor]:
    """Energy [B] eV, forces [N,3] and MM forces [M,3] eV/Å, charges [N] e, dipole [B,3] e·Å.

    ``scheme`` (:class:`potentials.core.contracts.TrainingScheme`) forms the network's energy from φ and E of
    the MM charges ("electrostatic": they enter the network; "mechanical": the network sees φ = E = 0 and its
    vacuum charges, held fixed, interact with the MM charges by plain Coulomb). None: φ = E = 0 and no
    interaction (the model's vacuum energy at the same geometry).

    The dipole is the response to a uniform field, μ = −∂E/∂E0 at E0 = 0 (φ_i → φ_i − E0·(r_i − centroid),
    E_i → E_i + E0), which is what the QM dipole label is (Hellmann–Feynman): the predicted charges' Σ q r plus
    the induced dipoles of the polarisation term and every other field dependence of the energy. Models that
    ignore φ/E (foreign potentials, vacuum models) fall back to Σ q (r − centroid). An analytic dispersion
    term of the model (``out["dispersion"]``, D3) is left out of the energy: the labels are DFT without it.
    """
    pos = b.positions.detach().requires_grad_(True)
    mm = b.mm_positions.detach().requires_grad_(True)
    n_struct = len(b.energy)
    centroid = torch.zeros(n_struct, 3, dtype=pos.dtype, device=pos.device).index_add_(0, b.mol_idx, pos.detach())
    centroid = centroid / b.n_atoms.to(pos.dtype)[:, None]
    rel = pos - centroid[b.mol_idx]
    e0 = torch.zeros(n_struct, 3, dtype=pos.dtype, device=pos.device, requires_grad=True)
    phi, ef = mm_potential_field(b, pos, mm)
    width = float(getattr(getattr(model, "config", None), "pol_damping", 0.0) or 0.0)
    if width > 0 and scheme is not None and scheme.field_inputs:
        model = _DampedPolarisation(model, mm_damped_excess(b, pos, mm, width))
    e0_atoms = e0.index_select(0, b.mol_idx)
    probe_phi, probe_ef = -(e0_atoms * rel).sum(-1), e0_atoms
    if scheme is None:
        out = model(b.numbers, pos, b.mol_idx, b.charge, probe_phi.to(phi.dtype), probe_ef.to(ef.dtype))
        energy = out["energy"]
    else:
        energy, out = scheme.network_energy(model, b.numbers, pos, b.mol_idx, b.charge,
                                            phi + probe_phi.to(phi.dtype), ef + probe_ef.to(ef.dtype))
    if "dispersion" in out:
        energy = energy - out["dispersion"]
    g_pos, g_mm, g_e0 = torch.autograd.grad(energy.sum(), [pos, mm, e0], create_graph=create_graph,
                                            allow_unused=True)
    if g_mm is None:                                    # batch of gas-phase frames only
        g_mm = torch.zeros_like(mm)
    q = out.get("charges")
    if g_e0 is not None:
        dipole = -g_e0
    elif q is not None:
        dipole = torch.zeros_like(centroid).index_add_(0, b.mol_idx, q.to(pos.dtype)[:, None] * rel)
    else:
        dipole = torch.zeros_like(centroid)
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


def evaluate_loss(model, frames, cfg: TrainConfig, device, dtype, scheme: "TrainingScheme | None"
                  ) -> dict[str, float]:
    """Validation loss, its terms and MAEs (kcal/mol, kcal/mol/Å); forces by autograd, no graph kept."""
    sums: dict[str, float] = {}
    for idx in _batches(len(frames), cfg.batch_size, 0, 0, shuffle=False):
        b = collate([frames[i] for i in idx], device, dtype)
        pred = predict(model, b, scheme)
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


def train(cfg: TrainConfig, device: str = "cpu", resume: bool = False,
          scheme: "TrainingScheme | None" = None) -> Path:
    """Train a model as configured; returns the path of the saved model (best validation state).

    ``scheme``: the embedding scheme named by ``cfg.embedding`` (``coupling.schemes.SCHEMES``), which forms the
    network's energy of every frame (:func:`predict`).
    """
    if scheme is None or getattr(scheme, "name", cfg.embedding) != cfg.embedding:
        raise SetupError(f"training for embedding {cfg.embedding!r} needs that scheme object (got "
                         f"{getattr(scheme, 'name', scheme)!r}); `mlmm train` resolves it from coupling.schemes")
    torch.set_num_threads(max(1, cfg.threads))
    device = torch.device(device)
    splits = _training_frames(cfg, resume)
    _seed_everything(cfg.seed)
    model, sae = _initial_model(cfg, splits["train"], device, scheme)
    dtype = next(model.parameters()).dtype
    opt = _make_optimizer(model, cfg)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=cfg.plateau_factor,
                                                       patience=cfg.plateau_patience)
    state, best_state, ema = _restore(cfg, resume, model, opt, sched, device)
    best_state = _fit(cfg, model, opt, sched, state, best_state, splits, scheme, device, dtype, ema)
    model.load_state_dict(best_state)
    model.eval()
    return _save_result(cfg, model, state, splits, sae)


def _training_frames(cfg: TrainConfig, resume: bool) -> dict[str, list[dict]]:
    """The train and val frames, read from a snapshot of the dataset (the same one again on resume)."""
    if not Path(cfg.dataset).is_file():
        raise SetupError(f"dataset {cfg.dataset} not found; run `mlmm label` or fix [data] path")
    Path(cfg.output).parent.mkdir(parents=True, exist_ok=True)
    data_path = cfg.dataset
    snap = str(Path(cfg.checkpoint).with_suffix(".data.nc"))
    if resume and Path(cfg.checkpoint).is_file() and cfg.snapshot and Path(snap).is_file():
        data_path = snap                         # resume on the very same frames
    elif cfg.snapshot:
        data_path = snapshot_dataset(cfg.dataset, snap)
    splits = {s: load_frames(data_path, s, cfg.max_frames.get(s)) for s in ("train", "val")}
    for path in cfg.extra:                       # e.g. field probes (potentials/field_probes.py): no cap
        if not Path(path).is_file():
            raise SetupError(f"[data] extra: dataset {path} not found")
        for s in splits:
            splits[s] += load_frames(path, s)
    if not splits["train"] or not splits["val"]:
        raise SetupError(f"{cfg.dataset}: need frames in both train and val splits "
                         f"(found {len(splits['train'])} / {len(splits['val'])})")
    log.info("training on %d frames, validating on %d", len(splits["train"]), len(splits["val"]))
    return splits


def _initial_model(cfg: TrainConfig, train_frames: list[dict], device, scheme=None
                   ) -> tuple[torch.nn.Module, np.ndarray]:
    """A new model with self-energies fitted on the training frames, or ``init_model``'s weights (widened to the
    config's elements when it asks for more, :func:`widen_elements`; to its layer widths when they are wider,
    :func:`potentials.widen.grown_state`)."""
    model = build_model(cfg, device)
    if not cfg.init_model:
        sae = fit_self_energies(train_frames, [int(z) for z in model.config.elements])
        set_self_energies(model, sae)
        return model, sae
    from potentials.model_io import load_model

    init = load_model(cfg.init_model, device)
    analytic = ("d3", "d3_params", "pol_damping")     # weight-free settings: may change when fine-tuning
    def same(c):
        return {k: v for k, v in c.to_dict().items() if k not in analytic + ("elements",) + WIDTHS}
    old, new = [int(z) for z in init.config.elements], [int(z) for z in model.config.elements]
    if same(init.config) != same(model.config) or not set(old) <= set(new):
        raise SetupError(f"init_model {cfg.init_model} has another architecture than [model]; use the same preset "
                         "(its elements and layer widths may only grow)")
    check_widths(init.config, model.config, cfg.init_model)
    if old == new:
        model.load_state_dict(grown_state(init.state_dict(), model.state_dict()))
    else:
        widen_elements(init, model, train_frames, scheme)
    log.info("starting from the weights of %s", cfg.init_model)
    return model, model.shift.weight.detach().cpu().numpy()


def widen_elements(init: torch.nn.Module, model: torch.nn.Module, frames: list[dict], scheme=None) -> None:
    """Load ``init``'s weights into ``model``, which knows more elements: every weight is copied; an added
    element's embedding starts as that of a known element of its group (S from O: :func:`potentials.widen.like_element`) and its
    self-energy is the least-squares fit of what the widened network leaves unexplained on the training
    frames that hold it (the known elements keep theirs). SetupError when no training frame holds an added
    element (its embedding could not be trained)."""
    old, new = [int(z) for z in init.config.elements], [int(z) for z in model.config.elements]
    added = [z for z in new if z not in old]
    with_added = [f for f in frames if set(int(z) for z in f["numbers"]) & set(added)]
    missing = sorted(set(added) - {int(z) for f in with_added for z in f["numbers"]})
    if missing:
        raise SetupError(f"the model grows by element(s) {missing} but no training frame holds them; add data with "
                         "them or leave them out of [model.config] elements")
    sd = init.state_dict()
    target = grown_state({k: v for k, v in sd.items() if k not in ("embedding", "shift.weight")}, model.state_dict())
    emb, shift = target["embedding"].clone(), torch.zeros_like(target["shift.weight"])
    for i, z in enumerate(new):
        emb[i] = sd["embedding"][old.index(z if z in old else like_element(z, old))]
        if z in old:
            shift[i] = sd["shift.weight"][old.index(z)]
    target["embedding"], target["shift.weight"] = emb, shift
    model.load_state_dict(target)
    dtype, device = next(model.parameters()).dtype, next(model.parameters()).device
    residual, counts = [], []
    for idx in _batches(len(with_added), 8, 0, 0, shuffle=False):
        chunk = [with_added[i] for i in idx]
        pred = predict(model, collate(chunk, device, dtype), scheme)["energy"].detach().cpu().numpy()
        for f, e in zip(chunk, pred):
            residual.append(float(f["energy"]) - float(e))
            counts.append([int(np.sum(np.asarray(f["numbers"]) == z)) for z in added])
    fit, *_ = np.linalg.lstsq(np.asarray(counts, float), np.asarray(residual), rcond=None)
    with torch.no_grad():
        for z, e in zip(added, fit):
            model.shift.weight[new.index(z)] = float(e)
    log.info("widened the model from elements %s to %s: %s", old, new,
             ", ".join(f"Z={z} starts as Z={like_element(z, old)}, self-energy {e:.3f} eV" for z, e in zip(added, fit)))


def _restore(cfg: TrainConfig, resume: bool, model, opt, sched, device) -> tuple["TrainState", dict, object]:
    """Training state, best weights and the weight average (:func:`_averager`; None without ``ema_decay``): fresh,
    or from the checkpoint when resuming (a checkpoint written without an average starts it from the weights)."""
    ckpt_path = Path(cfg.checkpoint)
    state = TrainState()
    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ck: dict = {}
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
    ema = _averager(cfg, model)
    if ema is not None and ck.get("ema") is not None:
        ema.load_state_dict(ck["ema"])
    return state, best_state, ema


CURVE_EVERY_S = 60.0          # the loss-curve PNG is redrawn at most this often while training, and at the end


def _fit(cfg: TrainConfig, model, opt, sched, state: "TrainState", best_state: dict, splits: dict, scheme,
         device, dtype, ema=None) -> dict:
    """The epoch loop (checkpoint after every epoch, the curve at most every ``CURVE_EVERY_S``: drawing it takes
    ~0.5 s, as long as an epoch of a few hundred frames); returns the best validation state.

    ``ema``, the moving average of the weights (:func:`_averager`), is validated too, and each epoch the better
    of the two (by validation score) is the epoch's candidate for the best state and drives the schedule.
    """
    t_start = t_curve = time.time()
    while state.epoch < cfg.epochs:
        t0 = time.time()
        running = _train_epoch(cfg, model, opt, splits["train"], state.epoch, scheme, device, dtype, ema)
        model.eval()
        val = evaluate_loss(model, splits["val"], cfg, device, dtype, scheme)
        candidate, extra = model, {}
        if ema is not None:
            ema.module.eval()
            val_ema = evaluate_loss(ema.module, splits["val"], cfg, device, dtype, scheme)
            extra = {"val_score_raw": val["score"], "val_score_ema": val_ema["score"]}
            if val_ema["score"] <= val["score"]:
                candidate, val = ema.module, val_ema
        sched.step(val["score"])
        lr = opt.param_groups[0]["lr"]
        state.epoch += 1
        state.history.append({"epoch": state.epoch, "train_loss": running / len(splits["train"]),
                              "val_loss": val["loss"], "val_score": val["score"],
                              "val_energy_mae": val["energy_mae"],
                              "val_force_mae": val["force_mae"], "val_mm_force_mae": val["mm_force_mae"],
                              "lr": lr, "seconds": time.time() - t0, **extra})
        if val["score"] < state.best_val:
            state.best_val, state.best_epoch, state.bad_epochs = val["score"], state.epoch, 0
            best_state = {k: v.detach().clone() for k, v in candidate.state_dict().items()}
        else:
            state.bad_epochs += 1
        h = state.history[-1]
        log.info("epoch %d: train %.4g val %.4g score %.3f%s | val MAE: E %.3f kcal/mol, F %.3f, MM F %.3f "
                 "kcal/mol/Å | lr %.2g | %.0f s", state.epoch, h["train_loss"], h["val_loss"], h["val_score"],
                 f" (weights {extra['val_score_raw']:.3f}, average {extra['val_score_ema']:.3f})" if extra else "",
                 h["val_energy_mae"], h["val_force_mae"], h["val_mm_force_mae"], lr, h["seconds"])
        _save_checkpoint(Path(cfg.checkpoint), model, opt, sched, state, best_state, ema)
        if time.time() - t_curve >= CURVE_EVERY_S:
            plot_curve(state.history, cfg.curve)
            t_curve = time.time()
        if _stop(cfg, state, lr, t_start):
            break
    return best_state


def _averager(cfg: TrainConfig, model):
    """The exponential moving average of ``model``'s weights (``torch.optim.swa_utils.AveragedModel``, updated
    after every optimiser step with decay ``cfg.ema_decay``), or None when the config has none."""
    if not cfg.ema_decay:
        return None
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay))


def _train_epoch(cfg: TrainConfig, model, opt, frames: list[dict], epoch: int, scheme, device, dtype,
                 ema=None) -> float:
    """One pass over the training frames (``ema``: the weight average, updated after every step); returns the
    summed loss (times batch sizes)."""
    from tqdm import tqdm

    model.train()
    batches = _batches(len(frames), cfg.batch_size, cfg.seed, epoch, shuffle=True)
    running = 0.0
    bar = tqdm(batches, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not (cfg.progress and sys.stderr.isatty()),
               leave=False, mininterval=5.0)
    for idx in bar:
        b = collate([frames[i] for i in idx], device, dtype)
        loss = total_loss(loss_terms(predict(model, b, scheme, create_graph=True), b), cfg)
        opt.zero_grad(set_to_none=True)
        if not torch.isfinite(loss):
            log.warning("non-finite loss in epoch %d; batch skipped", epoch + 1)
            continue
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad_norm)
        opt.step()
        if ema is not None:
            ema.update_parameters(model)
        running += float(loss.detach()) * len(idx)
        bar.set_postfix(loss=f"{float(loss.detach()):.3g}")
    return running


def _stop(cfg: TrainConfig, state: "TrainState", lr: float, t_start: float) -> bool:
    """Early stopping, the learning-rate floor and the wall-time budget."""
    if state.bad_epochs >= cfg.early_stopping:
        log.info("early stopping: no validation improvement for %d epochs", state.bad_epochs)
        return True
    if lr < cfg.min_lr:
        log.info("learning rate %.2g below min_lr %.2g: stopping", lr, cfg.min_lr)
        return True
    if cfg.max_minutes and time.time() - t_start > 60.0 * cfg.max_minutes:
        log.info("time budget of %.0f min used up: stopping", cfg.max_minutes)
        return True
    return False


def _save_result(cfg: TrainConfig, model, state: "TrainState", splits: dict, sae) -> Path:
    """Write the model (best state, already loaded) with its training metadata, and the final curve."""
    from potentials.model_io import save_model

    metadata = {
        "training": {k: v for k, v in asdict(cfg).items() if k not in ("progress",)},
        "embedding": training_embedding(cfg),
        "domain": training_domain(splits["train"]),
        "dataset": cfg.dataset, "n_train": len(splits["train"]), "n_val": len(splits["val"]),
        "self_energies_ev": dict(zip([int(z) for z in model.config.elements], map(float, sae))),
        "best_epoch": state.best_epoch, "epochs_run": state.epoch, "history": state.history,
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }
    metadata["ml_molecules"] = metadata["domain"]["ml_molecules"]
    save_model(cfg.output, model, metadata)
    plot_curve(state.history, cfg.curve)
    log.info("saved %s (best epoch %d, validation score %.4g)", cfg.output, state.best_epoch, state.best_val)
    return Path(cfg.output)


def training_embedding(cfg: TrainConfig) -> dict:
    """``metadata["embedding"]`` of a trained model: the config's scheme and the embedding the dataset's labels
    were computed with (:func:`potentials.model_io.dataset_embedding`; the training snapshot when there is one)."""
    from potentials.model_io import dataset_embedding

    snap = Path(cfg.checkpoint).with_suffix(".data.nc")
    return dataset_embedding(snap if cfg.snapshot and snap.is_file() else cfg.dataset, cfg.embedding,
                             name=cfg.dataset)


def _save_checkpoint(path: Path, model, opt, sched, state: TrainState, best_state, ema=None) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "state": asdict(state), "best_model": best_state, "torch_rng": torch.get_rng_state(),
                **({"ema": ema.state_dict()} if ema is not None else {})}, tmp)
    os.replace(tmp, path)                         # never leave a half-written checkpoint behind


def plot_curve(history: list[dict], path: str) -> None:
    """Training/validation loss and validation MAE vs epoch (PNG, matplotlib Agg); with a moving average of the
    weights (``[optim] ema_decay``) a third panel puts the validation score of the weights beside the average's."""
    if not history:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [h["epoch"] for h in history]
    averaged = all("val_score_ema" in h for h in history)     # [optim] ema_decay: both scores, every epoch
    fig, axes = plt.subplots(1, 3 if averaged else 2, figsize=(15 if averaged else 10, 4))
    a, b = axes[0], axes[1]
    a.semilogy(ep, [h["train_loss"] for h in history], label="train")
    a.semilogy(ep, [h["val_loss"] for h in history], label="validation")
    a.set_xlabel("epoch"), a.set_ylabel("loss"), a.legend()
    b.semilogy(ep, [h["val_energy_mae"] for h in history], label="energy MAE (kcal/mol)")
    b.semilogy(ep, [h["val_force_mae"] for h in history], label="ML force MAE (kcal/mol/Å)")
    b.semilogy(ep, [h["val_mm_force_mae"] for h in history], label="MM force MAE (kcal/mol/Å)")
    b.set_xlabel("epoch"), b.set_title("validation"), b.legend()
    if averaged:
        c = axes[2]
        c.semilogy(ep, [h["val_score_raw"] for h in history], label="weights")
        c.semilogy(ep, [h["val_score_ema"] for h in history], label="moving average")
        c.set_xlabel("epoch"), c.set_ylabel("validation score"), c.set_title("weights vs their average"), c.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)

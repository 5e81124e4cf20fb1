"""``mlmm train CONFIG --committee K``: train K members of one architecture and write them as one committee file
(:mod:`potentials.committee`) at ``[output] model``, each member also as a model file of its own next to it.

Member k uses seed ``seed + k`` (initial weights, batch order) and, for k > 0, its own train/val split: the
trajectories of the dataset's train and val splits together are shuffled with that seed, per solute, and as many
of them go to validation as the dataset's own split has (the test split is never touched; member 0 keeps the dataset's
split, so a committee of one is the plain ``mlmm train`` model). With fewer than two trajectories the members
differ by seed only.

Files of member k (``<stem>`` = the output without its suffix): ``<stem>.member<k>.pt`` (the model),
``.member<k>.ckpt`` (its checkpoint, every epoch), ``.member<k>_curve.png``, ``.member<k>.data.nc`` (its dataset
snapshot). ``--resume`` keeps a member that finished (:func:`finished`) and continues an unfinished one from its
checkpoint; without ``--resume`` every member is trained anew.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from potentials import train as T
from potentials.core.errors import SetupError

if TYPE_CHECKING:
    from potentials.core.contracts import TrainingScheme

log = logging.getLogger(__name__)


def member_config(cfg: "T.TrainConfig", k: int) -> "T.TrainConfig":
    """The training config of member ``k``: seed ``cfg.seed + k`` and its own output, checkpoint and curve."""
    stem = str(Path(cfg.output).with_suffix(""))
    return dataclasses.replace(cfg, seed=cfg.seed + k, output=f"{stem}.member{k}.pt",
                               checkpoint=f"{stem}.member{k}.ckpt", curve=f"{stem}.member{k}_curve.png")


def resplit(splits: dict[str, list[dict]], seed: int) -> tuple[dict[str, list[dict]], dict]:
    """Train/val frames re-split by trajectory with ``seed``, per solute (each solute keeps as many val
    trajectories as the dataset's split gives it, and at least one in training); returns the splits and a record
    of the split for the member's metadata."""
    pool = splits["train"] + splits["val"]
    traj = lambda f: str(f.get("trajectory", ""))                      # noqa: E731
    rng = np.random.default_rng(seed)
    chosen: set[str] = set()
    for solute in sorted({str(f.get("solute", "")) for f in pool}):
        mine = sorted({traj(f) for f in pool if str(f.get("solute", "")) == solute})
        n_val = min(len({traj(f) for f in splits["val"] if str(f.get("solute", "")) == solute}), len(mine) - 1)
        chosen.update(rng.permutation(mine)[:max(n_val, 0)].tolist())
    out = {"train": [f for f in pool if traj(f) not in chosen], "val": [f for f in pool if traj(f) in chosen]}
    if not chosen or not out["train"]:
        log.warning("committee member with seed %d: too few trajectories to re-split the train and val frames; "
                    "the member keeps the dataset's split and differs by seed only", seed)
        return splits, {"kind": "dataset", "seed": seed}
    log.info("committee member with seed %d: re-split by trajectory, %d train / %d val frames (%d val "
             "trajectories)", seed, len(out["train"]), len(out["val"]), len(chosen))
    return out, {"kind": "by-trajectory", "seed": seed, "val_trajectories": sorted(chosen)}


def finished(mcfg: "T.TrainConfig") -> bool:
    """The member finished training: its model file was written after its last checkpoint, and that checkpoint
    reached ``epochs`` or stopped early (no improvement, learning-rate floor); a member stopped by
    ``max_minutes``, or one asked for more epochs, is not finished (``--resume`` continues it)."""
    model, ckpt = Path(mcfg.output), Path(mcfg.checkpoint)
    if not model.is_file():
        return False
    if not ckpt.is_file():
        return True
    if model.stat().st_mtime < ckpt.stat().st_mtime:
        return False
    ck = torch.load(ckpt, map_location="cpu", weights_only=True)
    state, lr = ck["state"], ck["optimizer"]["param_groups"][0]["lr"]
    return state["epoch"] >= mcfg.epochs or state["bad_epochs"] >= mcfg.early_stopping or lr < mcfg.min_lr


def train_member(cfg: "T.TrainConfig", k: int, device: str = "cpu", resume: bool = False,
                 scheme: "TrainingScheme | None" = None) -> Path:
    """Train member ``k`` of the committee of ``cfg`` (:func:`potentials.train.train` with the member's seed,
    files and split); returns its model file."""
    mcfg = member_config(cfg, k)
    torch.set_num_threads(max(1, mcfg.threads))
    dev = torch.device(device)
    splits = T._training_frames(mcfg, resume)
    split = {"kind": "dataset", "seed": mcfg.seed}
    if k > 0:
        splits, split = resplit(splits, mcfg.seed)
    T._seed_everything(mcfg.seed)
    model, sae = T._initial_model(mcfg, splits["train"], dev, scheme)
    dtype = next(model.parameters()).dtype
    opt = T._make_optimizer(model, mcfg)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=mcfg.plateau_factor,
                                                       patience=mcfg.plateau_patience)
    state, best_state, ema = T._restore(mcfg, resume, model, opt, sched, dev)
    best_state = T._fit(mcfg, model, opt, sched, state, best_state, splits, scheme, dev, dtype, ema)
    model.load_state_dict(best_state)
    model.eval()
    model.metadata = {"split": split, "committee_member": k}
    return T._save_result(mcfg, model, state, splits, sae)


def train_committee(cfg: "T.TrainConfig", n_members: int, device: str = "cpu", resume: bool = False,
                    scheme: "TrainingScheme | None" = None) -> Path:
    """Train ``n_members`` members (see the module's docstring) and write the committee file at ``cfg.output``."""
    from potentials.committee import save_committee
    from potentials.model_io import load_model

    if n_members < 1:
        raise SetupError(f"--committee {n_members}: a committee needs at least 1 member")
    if scheme is None or getattr(scheme, "name", cfg.embedding) != cfg.embedding:
        raise SetupError(f"training for embedding {cfg.embedding!r} needs that scheme object (got "
                         f"{getattr(scheme, 'name', scheme)!r}); `mlmm train` resolves it from coupling.schemes")
    paths = []
    for k in range(n_members):
        mcfg = member_config(cfg, k)
        if resume and finished(mcfg):
            log.info("committee member %d of %d (seed %d): finished before, %s kept", k + 1, n_members, mcfg.seed,
                     mcfg.output)
            paths.append(Path(mcfg.output))
            continue
        log.info("committee member %d of %d (seed %d)", k + 1, n_members, mcfg.seed)
        paths.append(train_member(cfg, k, device, resume, scheme))
    members = [load_model(p) for p in paths]
    save_committee(cfg.output, members, {"member_files": [str(p) for p in paths]})
    log.info("saved the committee of %d members %s", n_members, cfg.output)
    return Path(cfg.output)

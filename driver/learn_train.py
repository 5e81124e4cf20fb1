"""Training and held-out evaluation of one ``mlmm learn`` round (:mod:`driver.learn`).

The committee of round r is ``round_NNN/committee.pt`` (:func:`potentials.committee.save_committee`), its members
``committee.member<k>.pt`` trained by :func:`potentials.committee_train.train_member` (member k: seed ``seed + k``
and, for k > 0, its own train/val re-split by trajectory; the test split is never touched) from the preset of
``[train] preset`` with the ML zone's elements added; from round 1 on, member k starts from member k of the
previous round (``warm_start``, learning rate ``warm_lr``). Training is resumable: a finished member is kept, an
unfinished one continues from its checkpoint. The embedding the labels were computed with (the system's
``[coupling]`` cutoff and switch, stored in the dataset's attributes) goes into the model's metadata as
``mlmm train`` records it, so the ML client's ``check_embedding`` accepts the model for this system.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


def _train_config(learner, r: int):
    from potentials.train_config import TrainConfig, _load_preset

    t = learner.cfg.train
    d = learner.round_dir(r)
    preset = _load_preset(t.preset, Path.cwd())
    elements = sorted(set(int(z) for z in preset.get("elements", [])) | set(int(z) for z in learner.numbers))
    model = {"preset": t.preset, "config": {"elements": elements}}
    if t.init_model:                     # fine-tuning: the architecture (and D3, damping) of the starting model
        model["config"] = init_model_config(learner)
    raw = {"model": model,
           "data": {"path": str(learner.dataset)},
           "output": {"model": str(d / "committee.pt")},
           "loss": {"energy": t.w_energy, "forces": t.w_forces, "mm_forces": t.w_mm_forces, "dipole": t.w_dipole},
           "optim": {"lr": t.lr},
           "train": {"epochs": t.epochs, "batch_size": t.batch_size, "early_stopping": t.early_stopping,
                     "seed": t.seed, "threads": t.threads, "max_minutes": t.max_minutes, "embedding": "electrostatic",
                     "progress": False, "committee": t.committee}}
    if t.init_model and r == 0:          # fine-tuning: the warm-start learning rate, not a from-scratch one
        raw["train"]["init_model"] = str(Path(t.init_model).resolve())
        raw["optim"]["lr"] = t.warm_lr
    return TrainConfig.from_dict(raw, base=d, where=f"mlmm learn round {r} training")


def init_model_config(learner) -> dict:
    """The model config of ``[train] init_model`` (every member of round 0 starts from its weights), its elements
    grown by those of the ML zone it lacks (:func:`potentials.train.widen_elements`); SetupError if it is not a
    single network of ours."""
    from potentials.core.errors import SetupError
    from potentials.model_io import read_model_file

    path = Path(learner.cfg.train.init_model)
    if not path.is_file():
        raise SetupError(f"[train] init_model = {str(path)!r}: no such file")
    d = read_model_file(path)
    if d.get("architecture") != "embedded-aimnet2" or "config" not in d:
        raise SetupError(f"[train] init_model = {str(path)!r} is not a single network of ours (architecture "
                         f"{d.get('architecture')!r}); give one model file, e.g. inputs/models/small_b3lyp_svp.pt")
    config = dict(d["config"])
    config["elements"] = sorted(set(int(z) for z in config["elements"]) | set(int(z) for z in learner.numbers))
    return config


def train_round(learner, r: int) -> tuple[Path, dict]:
    """Train the committee of round ``r``; returns its file and the record of what it was trained on
    (``trained_trajectories``: train + val trajectories of the training snapshot; ``test_trajectories``)."""
    import torch

    from coupling.schemes import SCHEMES
    from potentials.committee import save_committee
    from potentials.committee_train import finished, member_config, train_member
    from potentials.dataset import Dataset
    from potentials.model_io import load_model

    cfg = _train_config(learner, r)
    t = learner.cfg.train
    scheme = SCHEMES.get(cfg.embedding)()
    torch.set_num_threads(t.threads)
    paths = []
    for k in range(t.committee):
        init = learner.round_dir(r - 1) / f"committee.member{k}.pt" if (r > 0 and t.warm_start) else None
        kcfg = dataclasses.replace(cfg, init_model=str(init), lr=t.warm_lr, epochs=t.warm_epochs) \
            if init and init.is_file() else cfg
        mcfg = member_config(kcfg, k)
        if finished(mcfg):
            log.info("round %d: committee member %d/%d finished before, kept", r, k + 1, t.committee)
            paths.append(Path(mcfg.output))
            continue
        log.info("round %d: training committee member %d/%d (%s, seed %d%s)", r, k + 1, t.committee, t.preset,
                 mcfg.seed, ", warm start from round %d" % (r - 1) if kcfg is not cfg else "")
        paths.append(train_member(kcfg, k, learner.device, resume=Path(mcfg.checkpoint).is_file(), scheme=scheme))
    members = [load_model(p) for p in paths]
    save_committee(cfg.output, members, {"member_files": [str(p) for p in paths], "learn_round": r})
    snap = Path(member_config(cfg, 0).checkpoint).with_suffix(".data.nc")
    with Dataset.open(snap if snap.is_file() else learner.dataset) as ds:
        split, traj, fid = ds.meta["split"], ds.meta["trajectory"], ds.meta["frame_id"]
        trained = sorted({str(x) for x, s in zip(traj, split) if s in ("train", "val")})
        ids = {"trained_trajectories": trained,
               "trained_frame_ids": sorted(str(x) for x, s in zip(fid, split) if s in ("train", "val")),
               "n_train": int(np.sum(split == "train")), "n_val": int(np.sum(split == "val"))}
    log.info("round %d: committee of %d members saved %s (%d train, %d val frames)", r, t.committee, cfg.output,
             ids["n_train"], ids["n_val"])
    return Path(cfg.output), ids


def held_out_errors(learner, r: int, st: dict) -> dict:
    """MAEs of the committee mean (electrostatic embedding, as the ML client runs it) on every test frame labelled so
    far: ``{"n", "energy" kcal/mol, "forces", "mm_forces" kcal/mol/Å, "dipole" e·Å, "test_frame_ids",
    "test_trajectories"}``; the test trajectories never overlap the ones the committee was trained on."""
    from coupling.schemes import SCHEMES
    from driver.pipeline import evaluated_model
    from potentials.batches import load_frames
    from potentials.core.errors import SetupError
    from potentials.evaluate import evaluate

    frames = load_frames(learner.dataset, "test")
    if not frames:
        raise SetupError(f"{learner.dataset} has no test frame; split_pattern must contain \"test\"")
    test_traj = sorted({str(f["trajectory"]) for f in frames})
    overlap = set(test_traj) & set(st.get("trained_trajectories", []))
    if overlap:                                   # cannot happen with a split by trajectory: a guard, not a rule
        raise SetupError(f"test trajectories {sorted(overlap)[:3]} were also trained on")
    model, _ = evaluated_model(st["model"], learner.device)
    res = evaluate(model, frames, learner.device, schemes={"electrostatic": SCHEMES.get("electrostatic")()})
    row = res["electrostatic"]["all"]
    out = {k: float(row[k]) for k in ("energy", "forces", "mm_forces", "dipole") if k in row}
    out.update(n=int(row["n"]), test_frame_ids=sorted(str(f["frame_id"]) for f in frames), test_trajectories=test_traj)
    log.info("round %d: held-out (%d test frames, %d trajectories) MAE energy %.3f kcal/mol, ML forces %.3f, MM forces "
             "%.3f kcal/mol/Å", r, out["n"], len(test_traj), out["energy"], out["forces"], out.get("mm_forces", 0.0))
    return out

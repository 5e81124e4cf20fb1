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

SHIPPED_MODEL = Path(__file__).resolve().parents[1] / "inputs" / "models" / "small_b3lyp_svp.pt"


def _train_config(learner, r: int):
    from potentials.train_config import TrainConfig, _load_preset

    t = learner.cfg.train
    d = learner.round_dir(r)
    preset = _load_preset(t.preset, Path.cwd())
    elements = sorted(set(int(z) for z in preset.get("elements", [])) | set(int(z) for z in learner.numbers))
    model = {"preset": t.preset, "config": {"elements": elements}}
    if t.init_model:                     # fine-tuning: the architecture (and D3, damping) of the starting model
        model["config"] = init_model_config(learner, t.init_model)
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


def init_model_config(learner, init_model: str, key: str = "[train] init_model") -> dict:
    """The model config of ``init_model`` (the members start from its weights), its elements grown by those of the
    ML zone it lacks (:func:`potentials.train.widen_elements`); SetupError if it is not a single network of ours."""
    from potentials.core.errors import SetupError
    from potentials.model_io import read_model_file

    path = Path(init_model)
    if not path.is_file():
        raise SetupError(f"{key} = {str(path)!r}: no such file")
    d = read_model_file(path)
    if d.get("architecture") != "embedded-aimnet2" or "config" not in d:
        raise SetupError(f"{key} = {str(path)!r} is not a single network of ours (architecture "
                         f"{d.get('architecture')!r}); give one model file, e.g. inputs/models/small_b3lyp_svp.pt")
    config = dict(d["config"])
    config["elements"] = sorted(set(int(z) for z in config["elements"]) | set(int(z) for z in learner.numbers))
    return config


def train_round(learner, r: int) -> tuple[Path, dict]:
    """Train the committee of round ``r``; returns its file and the record of what it was trained on
    (``trained_trajectories``: train + val trajectories of the training snapshot; ``test_trajectories``)."""
    t = learner.cfg.train
    cfg = _train_config(learner, r)

    def start(k):
        init = learner.round_dir(r - 1) / f"committee.member{k}.pt" if (r > 0 and t.warm_start) else None
        if init and init.is_file():
            return dataclasses.replace(cfg, init_model=str(init), lr=t.warm_lr, epochs=t.warm_epochs), \
                f", warm start from round {r - 1}"
        return cfg, ""
    return _train_committee(learner, cfg, start, f"round {r}", {"learn_round": r})


def final_init_model(learner) -> str:
    """The model ``[final]`` starts from ("" = from scratch): ``init_model = "auto"`` takes ``[train] init_model`` if
    set, else the shipped network (``SHIPPED_MODEL``) when the rounds use its preset ("small") and its level of
    theory (the default B3LYP/def2-SVP): fine-tuning it on the loop's frames beat training from scratch for formate
    (PERFORMANCE.md section 12)."""
    from potentials.qmmm_reference import LevelOfTheory

    f, t, lvl = learner.cfg.final, learner.cfg.train, learner.cfg.level
    if f.init_model == "none":
        return ""
    if f.init_model != "auto":
        return f.init_model
    if t.init_model:
        return t.init_model
    shipped_level = (lvl.xc, lvl.basis) == (LevelOfTheory().xc, LevelOfTheory().basis)
    return str(SHIPPED_MODEL) if t.preset == "small" and shipped_level and SHIPPED_MODEL.is_file() else ""


def train_final(learner, r: int) -> tuple[Path, dict]:
    """``[final]``: the committee trained once more on every train/val frame of the loop (rounds 0..r), from scratch
    or from :func:`final_init_model` (its architecture, elements widened to the zone's), with the final schedule,
    into ``DIR/final/committee.pt``; returns it and its training record (as :func:`train_round`, plus
    ``init_model``: the start model, "" from scratch). Resumable like a round."""
    f = learner.cfg.final
    d = learner.out / "final"
    d.mkdir(exist_ok=True)
    base = _train_config(learner, r)
    cfg = dataclasses.replace(base, init_model="", output=str(d / "committee.pt"), checkpoint="", curve="",
                              epochs=f.epochs, lr=f.lr, w_forces=f.w_forces, plateau_patience=f.plateau_patience,
                              min_lr=f.min_lr, early_stopping=f.early_stopping, max_minutes=f.max_minutes)
    init = final_init_model(learner)
    if init:
        cfg = dataclasses.replace(cfg, init_model=str(Path(init).resolve()),
                                  model=init_model_config(learner, init, "[final] init_model"),
                                  lr=min(f.lr, learner.cfg.train.warm_lr))
    note = f", fine-tuned from {init}" if init else ", from scratch"
    path, ids = _train_committee(learner, cfg, lambda k: (cfg, note), "final",
                                 {"learn_round": r, "final": True, "final_init_model": init})
    return path, {**ids, "init_model": init}


def _train_committee(learner, cfg, start, tag: str, extra: dict) -> tuple[Path, dict]:
    """Train (or keep, when finished) each member as ``start(k)`` -> (its config, a note) says; save the
    committee to ``cfg.output``; return it and the record of its training split."""
    import torch

    from coupling.schemes import SCHEMES
    from potentials.committee import save_committee
    from potentials.committee_train import finished, member_config, train_member
    from potentials.dataset import Dataset
    from potentials.model_io import load_model

    t = learner.cfg.train
    scheme = SCHEMES.get(cfg.embedding)()
    torch.set_num_threads(t.threads)
    paths = []
    for k in range(t.committee):
        kcfg, note = start(k)
        mcfg = member_config(kcfg, k)
        if finished(mcfg):
            log.info("%s: committee member %d/%d finished before, kept", tag, k + 1, t.committee)
            paths.append(Path(mcfg.output))
            continue
        log.info("%s: training committee member %d/%d (%s, seed %d%s)", tag, k + 1, t.committee, t.preset,
                 mcfg.seed, note)
        paths.append(train_member(kcfg, k, learner.device, resume=Path(mcfg.checkpoint).is_file(), scheme=scheme))
    members = [load_model(p) for p in paths]
    save_committee(cfg.output, members, {"member_files": [str(p) for p in paths], **extra})
    snap = Path(member_config(cfg, 0).checkpoint).with_suffix(".data.nc")
    with Dataset.open(snap if snap.is_file() else learner.dataset) as ds:
        split, traj, fid = ds.meta["split"], ds.meta["trajectory"], ds.meta["frame_id"]
        trained = sorted({str(x) for x, s in zip(traj, split) if s in ("train", "val")})
        ids = {"trained_trajectories": trained,
               "trained_frame_ids": sorted(str(x) for x, s in zip(fid, split) if s in ("train", "val")),
               "n_train": int(np.sum(split == "train")), "n_val": int(np.sum(split == "val"))}
    log.info("%s: committee of %d members saved %s (%d train, %d val frames)", tag, t.committee, cfg.output,
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
    log.info("%s: held-out (%d test frames, %d trajectories) MAE energy %.3f kcal/mol, ML forces %.3f, MM forces "
             "%.3f kcal/mol/Å", f"round {r}" if r >= 0 else "final committee", out["n"], len(test_traj), out["energy"], out["forces"], out.get("mm_forces", 0.0))
    return out

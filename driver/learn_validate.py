"""Independent validation of the committee ``mlmm learn`` ends with (:mod:`driver.learn`, ``[validate]``).

The loop's held-out errors are measured on test *trajectories* of the loop itself: the MM seed chains and the
ML/MM runs whose frames were picked by committee disagreement. That is the right test set to decide when to stop,
but it shares the loop's chains and its selection bias. This step samples QM/MM clusters of the molecule in its
environment *after* the loop, with nothing shared:

* **MM:** a new OpenMM chain (seed ``[validate] random_seed``) of the prepared system with the same elastic
  stand-in of the ML zone as the seed sampling (sampling only), equilibrated ``equil_ps`` from the prepared
  structure, then a frame every ``spacing_ps``;
* **ML/MM:** ASE Langevin MD with the *final* committee (``DIR/model.pt``) from the last MM frame, a frame every
  ``stride`` steps, every frame kept (no selection, no ceiling).

Each frame becomes a QM/MM cluster as in the loop (the QM zone, link caps included, in the switched point charges
of the MM atoms within the system's embedding cutoff) and is labelled at ``[level]`` into
``DIR/validation_rNNN/data.nc`` (split ``test``; NNN: the round of the final committee, so a loop that goes on later
is validated anew; ``validation_final_rNNN`` when ``[final]`` trained the model). The committee mean's MAEs, overall and per source, and the committee spread on the ML/MM frames
go to ``DIR/validation_rNNN/errors.json``, the report and the card. Resumable like the rounds: MD is cached, frames
are labelled once.
"""
from __future__ import annotations

import dataclasses
import json
import logging

import numpy as np

log = logging.getLogger(__name__)

SOURCES = ("mm", "md")


def validate(learner, r: int, final: bool = False) -> dict:
    """Sample, label and evaluate the validation clusters of ``DIR/model.pt`` of a finished
    :class:`driver.learn.Learner`: the committee of round ``r``, or (``final``) the ``[final]`` committee trained
    after it; returns the error record (also ``DIR/validation_rNNN/errors.json``, ``validation_final_rNNN`` for a
    final committee)."""
    from driver.learn_label import label_frames

    v = learner.cfg.validate
    d = learner.out / (f"validation_final_r{r:03d}" if final else f"validation_r{r:03d}")
    d.mkdir(exist_ok=True)
    model = learner.out / "model.pt"
    out_json = d / "errors.json"
    if out_json.exists():
        old = json.loads(out_json.read_text())
        if old.get("frames_planned") == v.frames:
            return old
    frames = d / "frames.npz"
    if not frames.exists():
        _sample(learner, d, frames)
    dataset = d / "data.nc"
    label_frames(learner, frames, dataset, "validation")
    res = _errors(learner, dataset, model)
    with np.load(frames) as z:
        spread = z["force_std_max"][z["source"] == "md"] if "force_std_max" in z else np.zeros(0)
    res.update(frames_planned=v.frames, model=str(model), round=r,
               temperature_K=v.temperature_K,
               md_force_std_median=float(np.median(spread)) if len(spread) else None,
               md_force_std_max=float(np.max(spread)) if len(spread) else None)
    out_json.write_text(json.dumps(res, indent=1))
    a = res["all"]
    log.info("validation (%d independent clusters at %g K): MAE energy %.3f kcal/mol, ML forces %.3f, MM forces "
             "%.3f kcal/mol/Å", a["n"], v.temperature_K, a["energy"], a["forces"], a.get("mm_forces", 0.0))
    return res


def _sample(learner, d, frames) -> None:
    from driver.learn_sample import _atomic_savez, explore_run, sampling_system, seed_segments

    v = learner.cfg.validate
    n_md = int(round(v.frames * v.ml_fraction))
    n_mm = v.frames - n_md
    seed_cfg = dataclasses.replace(learner.cfg.seed, trajectories=1, frames_per_trajectory=max(n_mm, 1),
                                   spacing_ps=v.spacing_ps, equil_ps=v.equil_ps)
    system, _ = sampling_system(learner.topology, learner.mm_system, learner.positions, learner.ml, learner.charge,
                                seed_cfg)
    log.info("validation: fresh MM chain at %g K (seed %d), %d frames every %g ps", v.temperature_K, v.random_seed,
             n_mm, v.spacing_ps)
    mm = seed_segments(system, learner.positions, learner.box, v.temperature_K, v.random_seed, seed_cfg,
                       d / "mm")[0]
    pos, src, f_std = [x.astype(np.float32) for x in mm[:n_mm]], ["mm"] * n_mm, [np.nan] * n_mm
    if n_md:
        ex = dataclasses.replace(learner.cfg.explore, steps=n_md * v.stride, stride=v.stride,
                                 ceiling_kjmol_nm=np.inf, stop_after=10 ** 9)
        log.info("validation: ML/MM MD with the final committee at %g K, %d frames every %d steps", v.temperature_K,
                 n_md, v.stride)
        res = explore_run(learner.system_toml, learner.out / "model.pt", mm[-1], v.temperature_K, v.random_seed + 1,
                          ex, learner.device)
        if res["stopped"]:
            log.warning("validation ML/MM MD ended early (%s): %d of %d frames", res["stopped"],
                        len(res["positions"]), n_md)
        pos += list(res["positions"])
        src += ["md"] * len(res["positions"])
        f_std += [float(x) for x in res["force_std_max"]]
    n = len(pos)
    traj = np.array([f"validation/{s}-{v.temperature_K:g}K" for s in src])
    idx = np.array([i if s == "mm" else i - n_mm for i, s in enumerate(src)], int)
    _atomic_savez(frames, frame_id=np.array([f"{t}/f{k:03d}" for t, k in zip(traj, idx)]), trajectory=traj,
                  split=np.array(["test"] * n), temperature=np.full(n, v.temperature_K), displaced=np.zeros(n, int),
                  block=np.full(n, -1), index=idx, positions=np.asarray(pos, np.float32), source=np.array(src),
                  force_std_max=np.asarray(f_std, float))


def _errors(learner, dataset, model) -> dict:
    from coupling.schemes import SCHEMES
    from driver.pipeline import evaluated_model
    from potentials.batches import load_frames
    from potentials.evaluate import evaluate

    frames = load_frames(dataset, "test")
    net, _ = evaluated_model(str(model), learner.device)
    schemes = {"electrostatic": SCHEMES.get("electrostatic")()}
    out: dict = {}
    for name, sub in (("all", frames),) + tuple((s, [f for f in frames if f"/{s}-" in str(f["trajectory"])])
                                                 for s in SOURCES):
        if not sub:
            continue
        row = evaluate(net, sub, learner.device, schemes=schemes)["electrostatic"]["all"]
        out[name] = {k: float(row[k]) for k in ("n", "energy", "forces", "mm_forces", "dipole") if k in row}
        out[name]["n"] = int(row["n"])
    return out


def report_lines(cfg, val: dict | None) -> list[str]:
    """Markdown lines for the report and the card (empty without a validation)."""
    if not val or "all" not in val:
        return []
    t = cfg.targets
    names = {"all": "all", "mm": "fresh MM chain", "md": "ML/MM MD with the final committee"}
    lines = ["## Independent validation", "",
             f"QM/MM clusters sampled after the loop at {val['temperature_K']:g} K with nothing shared with it "
             "(a new MM chain and ML/MM MD with the final committee, frames at fixed intervals, not selected; "
             "`driver/learn_validate.py`), labelled at the same level. MAEs of the committee mean; targets "
             f"{t.energy_kcalmol:g} kcal/mol, {t.forces_kcalmol_A:g} (ML) and {t.mm_forces_kcalmol_A:g} (MM) "
             "kcal/mol/Å.", "",
             "| frames | n | energy (kcal/mol) | ML forces (kcal/mol/Å) | MM forces (kcal/mol/Å) |", "|---|---|---|---|---|"]
    for key in ("all",) + SOURCES:
        r = val.get(key)
        if r:
            lines.append(f"| {names[key]} | {r['n']} | {r['energy']:.3f} | {r['forces']:.3f} | "
                         f"{r.get('mm_forces', float('nan')):.3f} |")
    if val.get("md_force_std_median") is not None:
        lines += ["", f"Committee spread on the ML/MM frames: median force_std_max {val['md_force_std_median']:.1f}, "
                      f"largest {val['md_force_std_max']:.1f} kJ/mol/nm."]
    return lines + [""]

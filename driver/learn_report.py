"""``DIR/report.md`` (with ``errors.png``, ``uncertainty.png``, ``frames.png``) and the model card ``DIR/model.md``
of an ``mlmm learn`` run (:mod:`driver.learn`), written from the rounds' ``state.json`` files when the loop stops.
The card follows ``inputs/models/small_b3lyp_svp.md``: file, network, level of theory, records, domain, data,
training, held-out errors."""
from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


def _plots(out: Path, states: list[dict], cfg) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    rounds = [s["round"] for s in states if "errors" in s]
    if rounds:
        fig, ax = plt.subplots(figsize=(6, 4))
        for key, label, target in (("energy", "energy (kcal/mol)", cfg.targets.energy_kcalmol),
                                   ("forces", "ML forces (kcal/mol/Å)", cfg.targets.forces_kcalmol_A),
                                   ("mm_forces", "MM forces (kcal/mol/Å)", cfg.targets.mm_forces_kcalmol_A)):
            y = [s["errors"].get(key, np.nan) for s in states if "errors" in s]
            line, = ax.semilogy(rounds, y, "o-", label=label)
            ax.axhline(target, color=line.get_color(), ls=":", lw=1)
        ax.set_xlabel("round"), ax.set_ylabel("held-out MAE"), ax.legend(fontsize=8)
        ax.set_title("held-out errors (dotted: targets)")
        fig.tight_layout(), fig.savefig(out / "errors.png", dpi=90), plt.close(fig)
        names.append("errors.png")
    ex = [s for s in states if "explore" in s]
    if ex:
        fig, ax = plt.subplots(figsize=(6, 4))
        r = [s["round"] for s in ex]
        ax.plot(r, [s["explore"]["force_std_median"] for s in ex], "o-", label="median of explored frames")
        ax.plot(r, [s["explore"]["force_std_p95"] for s in ex], "s-", label="95th percentile")
        sel = [(s["round"], np.mean(s["selected_force_std"])) for s in ex if s.get("selected_force_std")]
        if sel:
            ax.plot(*zip(*sel), "^", label="mean of selected frames")
        ax.axhline(cfg.explore.floor_kjmol_nm, color="k", ls=":", lw=1, label="floor / ceiling")
        ax.axhline(cfg.explore.ceiling_kjmol_nm, color="k", ls=":", lw=1)
        ax.set_xlabel("round (explored with the committee of round − 1)"), ax.set_ylabel("force_std_max (kJ/mol/nm)")
        ax.set_yscale("log"), ax.legend(fontsize=8), ax.set_title("committee disagreement in ML/MM MD")
        fig.tight_layout(), fig.savefig(out / "uncertainty.png", dpi=90), plt.close(fig)
        names.append("uncertainty.png")
    fig, ax = plt.subplots(figsize=(6, 4))
    r = [s["round"] for s in states]
    ax.bar(r, [s.get("labelled_new", 0) for s in states], label="labelled in the round")
    ax.plot(r, [s.get("frames_total", 0) for s in states], "ko-", label="total")
    ax.set_xlabel("round"), ax.set_ylabel("frames"), ax.legend(fontsize=8), ax.set_title("labelled frames")
    fig.tight_layout(), fig.savefig(out / "frames.png", dpi=90), plt.close(fig)
    names.append("frames.png")
    return names


def _fmt(v, digits=3) -> str:
    return "–" if v is None or (isinstance(v, float) and not np.isfinite(v)) else f"{v:.{digits}f}"


def write_report(learner, states: list[dict], result: dict) -> Path:
    """``DIR/report.md`` and its PNGs."""
    cfg, out = learner.cfg, learner.out
    pngs = _plots(out, states, cfg)
    lines = [f"# mlmm learn: {learner.formula} (charge {learner.charge:+d}) in {learner.system_toml}", "",
             f"**Result:** {result['reason']}; model `{result['model']}` = {_which(result)}, "
             f"{result['frames']} labelled frames, {learner.meta.get('elapsed_s', 0.0) / 60:.1f} min in all.", "",
             "| round | how | candidates | above floor | stopped runs | selected | spread selected / random "
             "(kJ/mol/nm) | labelled (total) | train / val | test frames | E MAE | F MAE | MM F MAE |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in states:
        ex, err = s.get("explore"), s.get("errors", {})
        sel = s.get("selected_force_std") or []
        rnd = s.get("random_force_std") or []
        lines.append("| {} | {} | {} | {} | {} | {} | {} | {} ({}) | {} / {} | {} | {} | {} | {} |".format(
            s["round"], "MM seed" if s["round"] == 0 else "ML/MM MD", ex["n_candidates"] if ex else "–",
            f"{100 * ex['uncertain_fraction']:.1f}%" if ex else "–", len(ex["stopped_runs"]) if ex else "–",
            s.get("n_selected", "–"), f"{np.mean(sel):.1f} / {np.mean(rnd):.1f}" if sel and rnd else "–",
            s.get("labelled_new", "–"), s.get("frames_total", "–"), s.get("n_train", "–"), s.get("n_val", "–"),
            err.get("n", "–"), _fmt(err.get("energy")), _fmt(err.get("forces")), _fmt(err.get("mm_forces"))))
    t, e = cfg.targets, cfg.explore
    lines += ["", f"Targets: energy ≤ {t.energy_kcalmol} kcal/mol, ML forces ≤ {t.forces_kcalmol_A} and MM forces "
              f"≤ "
              f"{t.mm_forces_kcalmol_A} kcal/mol/Å (MAE of the committee mean on every test frame labelled so far, "
              f"never trained on: the split is by trajectory), and at most {100 * t.uncertain_fraction:g}% of the "
              f"explored frames above the floor. Selection window: force_std_max in [{e.floor_kjmol_nm:g}, "
              f"{e.ceiling_kjmol_nm:g}] kJ/mol/nm. Round r explores with the committee of round r − 1; the table's "
              "errors are those of the round's own committee.", ""]
    fin = result.get("final")
    if fin:
        e = fin["errors"]
        init = fin.get("init_model") or ""
        lines += [f"**Final training** (`[final]`): {cfg.train.committee} members "
                  + (f"fine-tuned from `{init}`" if init else "from scratch") + " on the loop's "
                  f"{fin['n_train']} train / {fin['n_val']} val frames, at most {cfg.final.epochs} epochs, lr "
                  f"{cfg.final.lr:g}, force weight {cfg.final.w_forces:g}: held-out E {_fmt(e.get('energy'))}, "
                  f"F {_fmt(e.get('forces'))}, MM F {_fmt(e.get('mm_forces'))} on the same {e.get('n')} test "
                  "frames.", ""]
    lines += [f"![{p}]({p})" for p in pngs]
    from driver.learn_validate import report_lines
    lines += [""] + report_lines(cfg, result.get("validation"))
    stopped = [(s["round"], x) for s in states for x in (s.get("explore") or {}).get("stopped_runs", [])]
    if stopped:
        lines += ["", "Runs that ended early:", ""] + [f"* round {r}: {x}" for r, x in stopped]
    lines += ["", "Files: `data.nc` (the QM/MM dataset, `mlmm label` format), `round_NNN/` (state, frames, "
              "committee), "
              "`learn.log`, `model.md` (card)."]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def write_card(learner, states: list[dict], result: dict) -> Path:
    """``DIR/model.md``, the model card of ``DIR/model.pt``."""
    from potentials.dataset import Dataset
    from potentials.model_io import read_model_file

    cfg, out = learner.cfg, learner.out
    d = read_model_file(out / "model.pt")
    meta = d.get("metadata") or {}
    emb, dom = meta.get("embedding") or {}, meta.get("domain") or {}
    members = d.get("members") or []
    n_par = sum(int(np.prod(v.shape)) for v in members[0]["state_dict"].values()) if members else 0
    final = next(s for s in states if s["round"] == result["round"])
    err = (result.get("final") or final).get("errors", {})
    fin_init = (meta.get("final_init_model") or "") if result.get("final") else ""
    with Dataset.open(learner.dataset) as ds:
        counts = Counter(zip(ds.meta["split"], ds.meta["kind"]))
        secs = float(np.median(ds.meta["seconds"])) if ds.n else 0.0
        n_charges = float(np.median(ds.meta["n_charges"])) if ds.n else 0.0
    lvl = cfg.level
    mols = ", ".join(f"{m['formula']}" + (f" ({m['charge']:+d})" if m.get("charge") else "") for m in
                     dom.get("molecules", []))
    kinds = sorted({k for _, k in counts})
    table = ["| split | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
    for s in ("train", "val", "test"):
        table.append(f"| {s} | " + " | ".join(str(counts.get((s, k), 0)) for k in kinds) + " |")
    t = cfg.train
    lines = [
        f"# {out.name}/model.pt: embedding-aware committee for {learner.formula} (charge {learner.charge:+d}), "
        f"{lvl.xc}/{lvl.basis} QM/MM", "",
        f"**Status:** written by `mlmm learn` ({result['reason']}); {_which(result)} of "
        f"`{learner.system_toml}`.", "",
        "| | |", "|---|---|",
        f"| file | `{out / 'model.pt'}` (committee, `potentials.committee` format, loads with `weights_only=True`; "
        f"`--model` of `mlmm run` / `mlmm client ml`) |",
        f"| network | {len(members)} members of `potentials.network.EmbeddedAIMNet2`, preset `{t.preset}`, elements "
        f"{d.get('elements')}; {n_par:,} parameters each; the ML client returns their mean and the spread "
        "(`ml.committee`, `ml.uncertainty`) |",
        f"| level of theory | **{lvl.xc}/{lvl.basis}** (PySCF RKS, density fitting {lvl.auxbasis}, grid level "
        f"{lvl.grid_level}, "
        f"conv_tol {lvl.conv_tol:g} Eh), point-charge embedding (`potentials.qmmm_reference.label_frame`); "
        + ("no dispersion correction in the labels; the model adds D3(BJ) within the ML zone analytically (taken "
           "from the network it was fine-tuned from) |" if members and members[0]["config"].get("d3") else
           "no dispersion correction in the labels or the model |"),
        f"| records | `metadata[\"embedding\"]`: {emb.get('scheme')}, cutoff {emb.get('cutoff_nm')} nm, switch "
        f"{emb.get('switch_nm')} nm, long range {emb.get('long_range')}, {emb.get('mm_charges')} (the ML client "
        "refuses "
        "another cutoff); `metadata[\"domain\"]` |",
        f"| domain | {mols or learner.formula} as the ML zone (zones of {dom.get('zone_atoms')} atoms, at most "
        f"{dom.get('ml_molecules')} molecule(s)) in the MM environment of `{learner.system_toml.name}`, sampled at "
        f"{', '.join(f'{x:g}' for x in cfg.seed.temperatures_K)} K (MM) and "
        f"{', '.join(f'{x:g}' for x in cfg.explore.temperatures_K)} K (ML/MM). Not validated for other molecules, "
        "other solvents or reactions. |", "",
        "## Data", "", f"`{learner.dataset}` ({result['frames']} frames; median {secs:.1f} s per label, median "
        f"{n_charges:.0f} embedded point charges). Round 0: OpenMM MD of the prepared system with an elastic ML zone "
        "(sampling only, `driver/learn_sample.py`) plus displaced copies; rounds ≥ 1: ML/MM MD with the previous "
        "committee, frames selected by committee disagreement. Split **by trajectory** (MD segment or ML/MM run): "
        "test trajectories are never trained on.", ""] + table + [
        "", "## Training", "",
        _training_text(cfg, result, fin_init), "",
        "## Held-out test errors", "",
        f"Committee mean, electrostatic embedding, all {err.get('n', 0)} test frames "
        f"({len(err.get('test_trajectories', []))} trajectories). MAEs; forces per Cartesian component.", "",
        "| quantity | target | reached | |", "|---|---|---|---|"]
    from driver.learn_validate import report_lines
    lines += _error_lines(cfg, states, result, err) + [""] + report_lines(cfg, result.get("validation")) + [
        "See `report.md` for the rounds."]
    path = out / "model.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _training_text(cfg, result: dict, fin_init: str) -> str:
    """The card's training paragraph: the rounds' schedule and, after a ``[final]`` training, its own."""
    t, f = cfg.train, cfg.final
    text = (f"Per round, {t.committee} members (seeds {t.seed}…{t.seed + t.committee - 1}, member k > 0 re-splits "
            f"train/val by trajectory), loss {t.w_energy:g}·MSE(ΔE/N) + {t.w_forces:g}·MSE(ΔF_ML) + "
            f"{t.w_mm_forces:g}·MSE(ΔF_MM) + {t.w_dipole:g}·MSE(Δμ), AdamW lr {t.lr:g} (warm-started rounds "
            f"{t.warm_lr:g}), batch {t.batch_size}, at most {t.epochs} epochs ({t.warm_epochs} when warm-started), "
            f"{t.max_minutes:g} min per member, early stopping {t.early_stopping}; best validation state kept. ")
    if not result.get("final"):
        return text + f"Curves: `round_{result['round']:03d}/committee.member<k>_curve.png`."
    return text + (f"After the loop (`[final]`) the members were trained once more "
                   + (f"starting from `{fin_init}`" if fin_init else "from scratch") + " on all its train/val "
                   f"frames: at most {f.epochs} epochs, lr {f.lr:g} on a plateau schedule (patience "
                   f"{f.plateau_patience}, down to {f.min_lr:g}), force weight {f.w_forces:g}, early stopping "
                   f"{f.early_stopping}, {f.max_minutes:g} min per member. Curves: "
                   "`final/committee.member<k>_curve.png`.")


def _which(result: dict) -> str:
    """What DIR/model.pt is, in words."""
    if result.get("final"):
        return f"the final committee (trained after round {result['round']}, `[final]`)"
    return f"the committee of round {result['round']}"


def _error_lines(cfg, states: list[dict], result: dict, err: dict) -> list[str]:
    """The card's held-out error table (against the targets) and the in-run uncertainty of the final committee."""
    lines, tg = [], cfg.targets
    for key, label, target in (("energy", "energy MAE (kcal/mol)", tg.energy_kcalmol),
                               ("forces", "ML-atom force MAE (kcal/mol/Å)", tg.forces_kcalmol_A),
                               ("mm_forces", "MM-atom force MAE (kcal/mol/Å)", tg.mm_forces_kcalmol_A)):
        v = err.get(key)
        met = "met" if v is not None and v <= target else "not met"
        lines.append(f"| {label} | ≤ {target:g} | {_fmt(v)} | {met} |")
    lines.append(f"| dipole MAE (e·Å) | – | {_fmt(err.get('dipole'))} | |")
    ex = next((s["explore"] for s in states if s["round"] == result["round"] + 1 and "explore" in s), None)
    if ex:
        lines += ["", f"In-run uncertainty (ML/MM MD with this committee): {100 * ex['uncertain_fraction']:.1f}% of "
                  f"{ex['n_candidates']} frames above the floor {cfg.explore.floor_kjmol_nm:g} kJ/mol/nm (target ≤ "
                  f"{100 * tg.uncertain_fraction:g}%), median force_std_max {_fmt(ex['force_std_median'], 1)} kJ/mol/nm"
                  + (f"; {len(ex['stopped_runs'])} run(s) ended early" if ex["stopped_runs"] else "") + "."]
    return lines

"""``mlmm learn SYSTEM.toml --out DIR``: active learning of a committee of the embedding-aware network for the
user's own prepared system, from nothing to ``DIR/model.pt`` (usable as ``--model`` by ``mlmm run`` and
``mlmm client ml``).

Rounds (``DIR/round_NNN/``, each with its ``state.json``; every stage is recorded when it is complete, so a
killed run continues where it stopped when the same command is run again):

* round 0: MM seed sampling at ``[seed] temperatures_K`` with an elastic ML zone
  (:mod:`driver.learn_sample`) plus displaced copies (:func:`potentials.sampling.displace`);
* round r >= 1: ML/MM Langevin MD with the committee of round r-1 at ``[explore] temperatures_K``, a candidate
  every ``stride`` steps, and the selection of the candidates whose committee force spread (force_std_max)
  lies between ``floor`` and ``ceiling`` (largest first);
* then, every round: QM/MM labels of the selected frames (:func:`potentials.qmmm_reference.label_frame`, the
  level of ``[level]``, the embedded MM charges of :mod:`coupling.schemes`, appended to ``DIR/data.nc`` in
  ``mlmm label``'s record format), the committee trained on the train/val frames (members warm-started from the
  previous round's), and its held-out errors on every test frame so far.

Frames are split by trajectory (a seed MD segment, or one ML/MM run): ``split_pattern[t % len]`` over the
trajectories in the order they are made, so test trajectories are never trained on. The loop stops when the
held-out MAEs and the in-run uncertainty (fraction of explored frames above the floor) meet ``[targets]``, or a
``[budget]`` is used up; it then writes ``DIR/model.pt``, the model card ``DIR/model.md`` and ``DIR/report.md``
with its PNGs (:mod:`driver.learn_report`).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np

from driver.learn_config import LearnConfig
from potentials.core.errors import SetupError
from potentials.core.units import ANGSTROM_PER_NM

log = logging.getLogger(__name__)


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=float))
    os.replace(tmp, path)


def _atomic_savez(path: Path, **arrays) -> None:
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


class Learner:
    """The active-learning loop of one system into one folder (see the module docstring)."""

    def __init__(self, system_toml: str | Path, out: str | Path, cfg: LearnConfig, config_text: str = ""):
        from coupling.mmsystem import mm_environment
        from coupling.schemes import SCHEMES, scheme_family
        from coupling.zones import ZONES
        from potentials.core.spec import SystemSpec
        from potentials.domain import formula
        from potentials.openmm_system import load_system

        self.cfg, self.config_text = cfg, config_text
        self.system_toml = Path(system_toml).resolve()
        self.spec = SystemSpec.load(self.system_toml)
        if not self.spec.ml.indices and not self.spec.ml.selection:
            raise SetupError(f"{system_toml} has no ML zone; prepare the system with `mlmm prepare PDB --ml SEL`")
        family = scheme_family(self.spec.coupling.embedding)
        if family not in ("electrostatic", "mechanical"):
            raise SetupError(f"{system_toml}: [coupling] embedding = {self.spec.coupling.embedding!r}: mlmm learn "
                             "trains the embedding-aware network, for electrostatic, electrostatic-lr or mechanical "
                             "runs")
        self.topology, system, self.positions = load_system(self.spec)
        self.ml = np.asarray(self.spec.ml.indices, dtype=int)
        # the ML-zone mapping (link atoms: the QM zone is the model's atoms, caps included, and the point charges
        # are the zone's boundary charges, as in a run)
        self.zone = ZONES.get(self.spec.ml.zone).from_topology(self.topology, self.ml)
        self.env = mm_environment(system, self.topology, self.ml, self.spec, zone=self.zone)
        self.mm_system = system
        self.numbers = np.asarray(self.zone.numbers, dtype=int)
        self.charge = int(self.spec.ml.charge)
        self.formula = formula(self.numbers)
        self.box = None
        if self.spec.structure.periodic:
            from openmm import unit
            self.box = np.asarray(self.topology.getPeriodicBoxVectors().value_in_unit(unit.nanometer))
        self.environment = "periodic" if self.box is not None else "droplet"
        self._check_inputs()
        self.out = Path(out)
        self._claim_folder()
        self.point_charges = SCHEMES.get("electrostatic").point_charges(
            self.env.charges, self.env.residue, self.ml, self.spec.coupling.cutoff_nm,
            self.spec.coupling.switch_width_nm, zone=self.zone, ml_charge=self.charge)
        self.dataset = self.out / "data.nc"
        self.device = self._train_device()
        self.qm_device = self._qm_device()

    # ------------------------------------------------------------------------------------------ folder and state
    def _claim_folder(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        meta = self.out / "learn.json"
        cfg_dict = dataclasses.asdict(self.cfg)
        if meta.exists():
            old = json.loads(meta.read_text())
            if old.get("system") != str(self.system_toml):
                raise SetupError(f"{self.out} holds an active-learning run of {old.get('system')}; give another --out "
                                 f"for {self.system_toml}")
            if json.dumps(old.get("config"), default=str) != json.dumps(json.loads(json.dumps(cfg_dict, default=str))):
                log.warning("the configuration differs from the one %s was started with: finished stages keep what "
                            "they did, the rest uses the new one", self.out)
            self.meta = old
        else:
            self.meta = {"system": str(self.system_toml), "started": time.strftime("%Y-%m-%d %H:%M:%S UTC",
                                                                                  time.gmtime()), "elapsed_s": 0.0}
        self.meta["config"] = json.loads(json.dumps(cfg_dict, default=str))
        _write_json(meta, self.meta)
        self._t0, self._elapsed0 = time.time(), float(self.meta.get("elapsed_s", 0.0))

    def _save_meta(self, **extra) -> None:
        self.meta.update(extra, elapsed_s=self._elapsed0 + time.time() - self._t0)
        _write_json(self.out / "learn.json", self.meta)

    def round_dir(self, r: int) -> Path:
        d = self.out / f"round_{r:03d}"
        d.mkdir(exist_ok=True)
        return d

    def state(self, r: int) -> dict:
        path = self.round_dir(r) / "state.json"
        return json.loads(path.read_text()) if path.exists() else {"round": r, "stages": []}

    def save_state(self, r: int, st: dict, stage: str | None = None) -> None:
        if stage and stage not in st["stages"]:
            st["stages"].append(stage)
        _write_json(self.round_dir(r) / "state.json", st)
        self._save_meta()

    def states(self) -> list[dict]:
        return [json.loads(p.read_text()) for p in sorted(self.out.glob("round_*/state.json"))]

    def split(self, t: int) -> str:
        return self.cfg.split_pattern[t % len(self.cfg.split_pattern)]

    def _check_inputs(self) -> None:
        """The preset and the level of theory, before anything runs (one SetupError line each)."""
        from pyscf import dft, gto

        from potentials.train_config import _load_preset
        _load_preset(self.cfg.train.preset, Path.cwd())
        if self.cfg.train.init_model:
            from driver.learn_train import init_model_config
            init_model_config(self, self.cfg.train.init_model)
        if self.cfg.final.init_model not in ("auto", "none", ""):
            from driver.learn_train import init_model_config
            init_model_config(self, self.cfg.final.init_model, "[final] init_model")
        if self.cfg.seed.model and not Path(self.cfg.seed.model).is_file():
            raise SetupError(f"[seed] model = {self.cfg.seed.model!r}: no such file; give a model file (ours, a "
                             "committee, MACE, AIMNet2 or ANI) or leave it empty to seed by MM")
        lvl = self.cfg.level
        try:
            dft.libxc.parse_xc(lvl.xc)
        except Exception as exc:                       # PySCF raises KeyError / ValueError for unknown names
            raise SetupError(f"[level] xc = {lvl.xc!r}: PySCF does not know it ({exc})") from None
        try:
            model = self.zone.extend(np.asarray(self.positions, dtype=np.float64), self.box)[self.zone.model_indices]
            gto.M(atom=[(int(z), tuple(r)) for z, r in zip(self.numbers, model * ANGSTROM_PER_NM)],
                  basis=lvl.basis, charge=self.charge, spin=0, verbose=0)
        except Exception as exc:                       # unknown basis (KeyError, RuntimeError), odd electron count
            msg = " ".join(str(exc).split()) or type(exc).__name__
            raise SetupError(f"[level] basis = {lvl.basis!r} for the ML zone {self.formula} (charge {self.charge:+d}): "
                             f"PySCF refuses it ({msg})") from None

    def _train_device(self) -> str:
        import torch
        d = self.cfg.train.device
        if d == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        if d.startswith("cuda") and not torch.cuda.is_available():
            raise SetupError(f"[train] device = {d!r} but torch sees no GPU; use device = \"auto\" or \"cpu\"")
        return d

    def _qm_device(self) -> str:
        """Where the labels are computed: "gpu" (gpu4pyscf) or "cpu" (PySCF), from ``qm_device``
        (:func:`potentials.qmmm_reference.qm_backend`; "gpu" without gpu4pyscf and a CUDA device is a SetupError)."""
        from potentials.qmmm_reference import qm_backend
        backend = qm_backend(self.cfg.qm_device)
        log.info("QM labels on the %s (%s)", backend.upper(), "gpu4pyscf" if backend == "gpu" else "PySCF")
        return backend

    # ------------------------------------------------------------------------------------------ the loop
    def run(self, seed_only: bool = False, export_jobs: str | None = None) -> dict:
        if export_jobs and not seed_only:
            raise SetupError("--export-jobs goes with --seed-only (later rounds need the committee trained on the "
                             "labels)")
        r = 0
        while True:
            st = self.state(r)
            if r == 0:
                # --seed-only into a dataset that already holds the frame budget (a shipped one, copied into a
                # fresh checkout): nothing left to label, so no seed MD either (a protein's costs ~half an hour)
                full = (seed_only and not export_jobs and "selected" not in st["stages"]
                        and bool(self.cfg.budget.max_frames) and self.n_labelled() >= self.cfg.budget.max_frames)
                if not full:
                    self.seed(st)
                if export_jobs:
                    from driver.learn_label import export_round
                    n = export_round(self, 0, export_jobs)
                    return {"reason": "seed only, exported (--export-jobs)", "round": 0, "jobs": n}
                if seed_only:
                    if not full:
                        self.label(0, st)
                    done = ("the dataset held the frame budget already, nothing sampled" if full else
                            "sampled and labelled, not trained")
                    result = {"reason": f"seed only (--seed-only): {done}", "round": 0,
                              "frames": self.n_labelled(), "data": str(self.dataset)}
                    self._save_meta(seed_only=result)
                    log.info("done (seed only): %d labelled frames in %s, usable as [data] path or extra of "
                             "`mlmm train`", result["frames"], self.dataset)
                    return result
            elif "selected" not in st["stages"]:          # a round that went on before is not stopped again
                if self.cfg.budget.max_hours and self.elapsed_h() >= self.cfg.budget.max_hours:
                    return self.finish(r - 1, f"time budget of {self.cfg.budget.max_hours:g} h used up")
                self.explore(r, st)
                reason = self.stop_reason(r, st)
                if reason:
                    return self.finish(r - 1, reason)
                self.select(r, st)
            if r > 0 and not st["n_selected"]:
                return self.finish(r - 1, self._empty_window(st["explore"]))
            self.label(r, st)
            self.train(r, st)
            self.evaluate(r, st)
            r += 1

    def _empty_window(self, ex: dict) -> str:
        e = self.cfg.explore
        n, high = ex["n_candidates"], ex["above_ceiling"]
        hint = ("raise [explore] ceiling_kjmol_nm or train longer ([train] epochs)" if high else
                "the committee agrees everywhere it went: lower [explore] floor_kjmol_nm to go on")
        return (f"no explored frame lies between the floor {e.floor_kjmol_nm:g} and the ceiling "
                f"{e.ceiling_kjmol_nm:g} kJ/mol/nm ({high} of {n} above the ceiling; {hint})")

    def elapsed_h(self) -> float:
        return (self._elapsed0 + time.time() - self._t0) / 3600.0

    def n_labelled(self) -> int:
        from potentials.dataset import DatasetWriter
        return len(DatasetWriter(self.dataset).frame_ids()) if self.dataset.exists() else 0

    def errors_met(self, err: dict) -> bool:
        """Whether held-out errors ``err`` (a round's ``errors``) meet ``[targets]``."""
        t = self.cfg.targets
        return (err.get("energy", np.inf) <= t.energy_kcalmol and err.get("forces", np.inf) <= t.forces_kcalmol_A
                and err.get("mm_forces", 0.0) <= t.mm_forces_kcalmol_A)

    def stop_reason(self, r: int, st: dict) -> str:
        prev = self.state(r - 1)
        err, t = prev.get("errors", {}), self.cfg.targets
        ex = st["explore"]
        met = (self.errors_met(err) and ex["uncertain_fraction"] <= t.uncertain_fraction and not ex["stopped_runs"])
        if met:
            return "converged: held-out errors and in-run uncertainty meet the targets"
        b = self.cfg.budget
        if b.max_frames and self.n_labelled() >= b.max_frames:
            return f"frame budget of {b.max_frames} frames used up"
        if b.max_rounds and r > b.max_rounds:
            return f"round budget of {b.max_rounds} rounds used up"
        return ""

    # ------------------------------------------------------------------------------------------ round 0: seed
    def seed(self, st: dict) -> None:
        if "selected" in st["stages"]:
            return
        from driver.learn_sample import model_segments, sampling_system, seed_segments
        from potentials.sampling import displace

        c = self.cfg.seed
        if c.model:
            model = Path(c.model).resolve()
            record = {"model": str(model)}
            log.info("round 0: ML/MM seed sampling with %s (%g fs, friction %g/ps)", model,
                     self.cfg.explore.timestep_fs, self.cfg.explore.friction_per_ps)

            def segments(temp, seed, folder):
                return model_segments(self.system_toml, model, self.positions, temp, seed, c, self.cfg.explore,
                                      folder, self.device)
            kind = "ml"
        else:
            system, record = sampling_system(self.topology, self.mm_system, self.positions, self.ml, self.charge, c)
            log.info("round 0: MM seed sampling with an elastic ML zone (%d bonds, %d angles, %d impropers; "
                     "charges: %s)", record["bonds"], record["angles"], record["impropers"], record["charges"])

            def segments(temp, seed, folder):
                return seed_segments(system, self.positions, self.box, temp, seed, c, folder)
            kind = "mm"
        rows: list[tuple] = []
        t = 0
        for it, temp in enumerate(c.temperatures_K):
            segs = segments(temp, self.cfg.random_seed * 1000 + it + 1,
                            self.round_dir(0) / "seed" / (f"T{temp:g}" if kind == "mm" else f"ml-T{temp:g}"))
            for s, frames in enumerate(segs):
                traj = f"r000/{kind}-{temp:g}K/s{s:02d}"
                for k, pos in enumerate(frames):
                    for copy in range(1 + c.displaced_copies):
                        x = pos.astype(np.float64)
                        if copy:
                            rng = np.random.default_rng([self.cfg.random_seed, it, s, k, copy])
                            x = displace(x, self.ml, rng, *c.displacement_A)
                        rows.append((k, copy, t, f"{traj}/f{k:02d}/c{copy}", traj, self.split(t), temp, copy, s, x))
                t += 1
        rows.sort(key=lambda row: (row[0], row[1], row[2]))        # round robin: a cut keeps every trajectory
        if self.cfg.budget.max_frames:
            rows = rows[:self.cfg.budget.max_frames]
        self._save_frames(0, rows)
        st.update(record=record, n_trajectories=t, n_selected=len(rows))
        self.save_state(0, st, "selected")

    def _save_frames(self, r: int, rows: list[tuple]) -> None:
        _atomic_savez(self.round_dir(r) / "frames.npz", frame_id=np.array([x[3] for x in rows]),
                      trajectory=np.array([x[4] for x in rows]), split=np.array([x[5] for x in rows]),
                      temperature=np.array([x[6] for x in rows], float), displaced=np.array([x[7] for x in rows], int),
                      block=np.array([x[8] for x in rows], int), index=np.array([x[0] for x in rows], int),
                      positions=np.array([x[9] for x in rows], np.float32))

    # ------------------------------------------------------------------------------------------ rounds >= 1
    def explore(self, r: int, st: dict) -> None:
        if "explored" in st["stages"]:
            return
        import torch

        from driver.learn_sample import explore_run
        e = self.cfg.explore
        torch.set_num_threads(self.cfg.train.threads)
        model = self.round_dir(r - 1) / "committee.pt"
        starts = np.load(self.round_dir(0) / "frames.npz")
        pool = np.flatnonzero((starts["split"] == "train") & (starts["displaced"] == 0))
        pool = pool if len(pool) else np.arange(len(starts["split"]))        # a seed cut short by max_frames
        runs = []
        for it, temp in enumerate(e.temperatures_K):
            for k in range(e.runs_per_temperature):
                i = len(runs)
                path = self.round_dir(r) / "explore" / f"run_{i:02d}.npz"
                path.parent.mkdir(exist_ok=True)
                if not path.exists():
                    rng = np.random.default_rng([self.cfg.random_seed, r, i])
                    start = starts["positions"][int(rng.choice(pool))]
                    log.info("round %d: ML/MM exploration %d/%d at %g K (%d steps of %g fs)", r, i + 1,
                             len(e.temperatures_K) * e.runs_per_temperature, temp, e.steps, e.timestep_fs)
                    res = explore_run(self.system_toml, model, start, temp, int(rng.integers(2 ** 31)), e, self.device)
                    _atomic_savez(path, **{k2: np.asarray(v) for k2, v in res.items()}, temperature=temp)
                runs.append(path)
        f_std = np.concatenate([np.load(p)["force_std_max"] for p in runs])
        stopped = [str(np.load(p)["stopped"]) for p in runs if str(np.load(p)["stopped"])]
        st["explore"] = {"n_candidates": int(len(f_std)),
                         "uncertain_fraction": float(np.mean(f_std > e.floor_kjmol_nm)) if len(f_std) else 1.0,
                         "above_ceiling": int(np.sum(f_std > e.ceiling_kjmol_nm)),
                         "force_std_median": float(np.median(f_std)) if len(f_std) else None,
                         "force_std_mean": float(np.mean(f_std)) if len(f_std) else None,
                         "force_std_p95": float(np.percentile(f_std, 95)) if len(f_std) else None,
                         "stopped_runs": stopped, "model": str(model)}
        log.info("round %d: %d candidates, %.0f%% above the floor %g kJ/mol/nm, %d above the ceiling, median spread "
                 "%.1f kJ/mol/nm%s", r, len(f_std), 100 * st["explore"]["uncertain_fraction"], e.floor_kjmol_nm,
                 st["explore"]["above_ceiling"], st["explore"]["force_std_median"] or 0.0,
                 f", {len(stopped)} run(s) stopped early" if stopped else "")
        self.save_state(r, st, "explored")

    def select(self, r: int, st: dict) -> None:
        if "selected" in st["stages"]:
            return
        from driver.learn_sample import select
        e = self.cfg.explore
        n_runs = len(e.temperatures_K) * e.runs_per_temperature
        t0 = self.state(0)["n_trajectories"] + (r - 1) * n_runs
        runs = [np.load(self.round_dir(r) / "explore" / f"run_{i:02d}.npz") for i in range(n_runs)]
        f_std = np.concatenate([z["force_std_max"] for z in runs])
        run = np.concatenate([np.full(len(z["force_std_max"]), i) for i, z in enumerate(runs)])
        left = self.cfg.budget.max_frames - self.n_labelled() if self.cfg.budget.max_frames else e.frames_per_round
        n = min(e.frames_per_round, max(left, 0))
        # while the held-out errors miss the targets, a window with too few candidates is filled with the most
        # uncertain frames below the floor: the committee is confident there, but still wrong on average
        fill = 0.0 if not self.errors_met(self.state(r - 1).get("errors", {})) else None
        chosen = select(f_std, run, e.floor_kjmol_nm, e.ceiling_kjmol_nm, n, e.min_separation,
                        per_run=-(-n // n_runs), fill_floor=fill)
        rows = []
        for i in chosen:
            k = int(run[i])
            z = runs[k]
            j = i - int(np.flatnonzero(run == k)[0])
            traj = f"r{r:03d}/md-{float(z['temperature']):g}K/run{k:02d}"
            rows.append((j, 0, t0 + k, f"{traj}/c{j:04d}", traj, self.split(t0 + k), float(z["temperature"]), 0, r,
                         z["positions"][j]))
        self._save_frames(r, rows)
        rnd = np.random.default_rng([self.cfg.random_seed, r, 7]).permutation(len(f_std))[:max(len(chosen), 1)]
        below = int(np.sum(f_std[chosen] < e.floor_kjmol_nm)) if len(chosen) else 0
        if below:
            log.info("round %d: the held-out errors miss the targets and only %d candidates lie in the window: %d "
                     "more below the floor (the most uncertain of them)", r, len(chosen) - below, below)
        st.update(n_selected=len(rows), selected_force_std=[float(f_std[i]) for i in chosen], below_floor=below,
                  random_force_std=[float(f_std[i]) for i in rnd],
                  selected_splits={s: sum(row[5] == s for row in rows) for s in ("train", "val", "test")})
        log.info("round %d: selected %d frames (spread %.1f-%.1f kJ/mol/nm; mean %.1f vs %.1f of random candidates)",
                 r, len(rows), min(st["selected_force_std"], default=0.0), max(st["selected_force_std"], default=0.0),
                 float(np.mean(st["selected_force_std"])) if rows else 0.0, float(np.mean(st["random_force_std"])))
        self.save_state(r, st, "selected")

    # ------------------------------------------------------------------------------------------ labelling
    def label(self, r: int, st: dict) -> None:
        if "labelled" in st["stages"]:
            return
        from driver.learn_label import label_round
        st["labelled_new"] = label_round(self, r)
        st["frames_total"] = self.n_labelled()
        self.save_state(r, st, "labelled")

    # ------------------------------------------------------------------------------------------ training
    def train(self, r: int, st: dict) -> None:
        if "trained" in st["stages"]:
            return
        from driver.learn_train import train_round
        path, ids = train_round(self, r)
        st.update(model=str(path), **ids)
        self.save_state(r, st, "trained")

    def evaluate(self, r: int, st: dict) -> None:
        if "evaluated" in st["stages"]:
            return
        from driver.learn_train import held_out_errors
        st["errors"] = held_out_errors(self, r, st)
        self.save_state(r, st, "evaluated")

    # ------------------------------------------------------------------------------------------ the end
    def finish(self, r: int, reason: str) -> dict:
        from driver.learn_report import write_card, write_report

        model = self.round_dir(r) / "committee.pt"
        result = {"reason": reason, "round": r, "model": str(self.out / "model.pt"), "frames": self.n_labelled()}
        if self.cfg.final.epochs:
            fin = self.final(r)
            model = Path(fin["model"])
            result["final"] = {k: fin.get(k) for k in ("model", "errors", "n_train", "n_val", "init_model")}
        shutil.copyfile(model, self.out / "model.pt")
        if self.cfg.validate.frames:
            from driver.learn_validate import validate
            result["validation"] = validate(self, r, final=bool(self.cfg.final.epochs))
        self._save_meta(finished=result)
        states = self.states()
        write_report(self, states, result)
        write_card(self, states, result)
        log.info("done (%s): %s from %s, %d frames; report %s, card %s", reason, self.out / "model.pt",
                 f"the final training after round {r}" if "final" in result else f"round {r}", result["frames"],
                 self.out / "report.md", self.out / "model.md")
        return result

    def final(self, r: int) -> dict:
        """``[final]``: train (or keep) the final committee on the loop's frames up to round ``r`` and its held-out
        errors; the record is ``DIR/final/state.json`` (redone when the loop went on past its round)."""
        from driver.learn_train import held_out_errors, train_final

        path = self.out / "final" / "state.json"
        st = json.loads(path.read_text()) if path.exists() else {}
        if st.get("round") != r or st.get("epochs") != self.cfg.final.epochs:
            st = {"round": r, "epochs": self.cfg.final.epochs, "stages": []}
        if "trained" not in st["stages"]:
            model, ids = train_final(self, r)
            st.update(model=str(model), **ids)
            st["stages"].append("trained")
            _write_json(path, st)
        if "evaluated" not in st["stages"]:
            st["errors"] = held_out_errors(self, -1, st)
            st["stages"].append("evaluated")
            _write_json(path, st)
        return st

def main(args: argparse.Namespace) -> int:
    """``mlmm learn SYSTEM.toml --out DIR [--config TOML] [--max-frames N] [--validate N] [--seed-only
    [--export-jobs JOBS.npz]] [--print-config]``."""
    from potentials.core.config import describe

    cfg = LearnConfig.from_toml(args.config)
    if getattr(args, "validate", None) is not None:
        if args.validate < 0:
            raise SetupError(f"--validate {args.validate}: give 0 (none) or more frames")
        cfg = dataclasses.replace(cfg, validate=dataclasses.replace(cfg.validate, frames=args.validate))
    if args.max_frames is not None:
        if args.max_frames < 1:
            raise SetupError(f"--max-frames {args.max_frames}: give at least 1 frame")
        cfg = dataclasses.replace(cfg, budget=dataclasses.replace(cfg.budget, max_frames=args.max_frames))
    if getattr(args, "seed_model", None):
        cfg = dataclasses.replace(cfg, seed=dataclasses.replace(cfg.seed, model=args.seed_model))
    if getattr(args, "print_config", False):
        print(describe(cfg, title=f"mlmm learn configuration ({args.config or 'defaults'})"))
        return 0
    text = Path(args.config).read_text() if args.config else ""
    learner = Learner(args.system, args.out, cfg, config_text=text)
    handler = logging.FileHandler(learner.out / "learn.log")
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    level = root.level
    root.setLevel(min(level, logging.INFO) if level else logging.INFO)    # the log file gets the progress lines
    root.addHandler(handler)
    try:
        log.info("mlmm learn %s --out %s (%s)", args.system, args.out, args.config or "default config")
        learner.run(seed_only=bool(getattr(args, "seed_only", False)), export_jobs=getattr(args, "export_jobs", None))
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
        handler.close()
    return 0

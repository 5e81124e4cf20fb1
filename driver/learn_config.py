"""The configuration of ``mlmm learn`` (:mod:`driver.learn`): :class:`LearnConfig`, read from TOML by the
project's one loader (:func:`potentials.core.config.build`: unknown keys and wrong types are errors naming the
file and the key). Every key is optional; the defaults fit a small molecule (a few hundred B3LYP/def2-SVP frames)
on a 2-core CPU machine. Units are in the names (K, ps, fs, Å, kJ/mol/nm, kcal/mol).

Sections::

    [seed]     sampling of the starting data (round 0): temperatures, MD segments, displaced copies; MM with an
               elastic stand-in of the ML zone's bonded terms, or ML/MM MD with a given model (``model``)
    [explore]  ML/MM MD with the committee (rounds >= 1) and the selection of frames by committee disagreement
    [level]    the QM level of theory (potentials.qmmm_reference.LevelOfTheory: xc, basis, auxbasis, ...)
    [train]    committee training (preset, members, epochs, loss weights, warm start)
    [final]    after the loop: the committee trained once more from scratch, longer (DIR/model.pt)
    [targets]  when to stop: held-out errors and the in-run uncertainty
    [budget]   frames, rounds, hours
    [validate] after the loop: errors of the final committee on frames sampled independently of the loop
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from potentials.core.config import build, read_toml
from potentials.core.errors import SetupError
from potentials.qmmm_reference import LevelOfTheory

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class SeedConfig:
    """[seed]: round 0, MM sampling (OpenMM, the prepared system) with an elastic ML zone (sampling only)."""

    temperatures_K: tuple[float, ...] = (300.0, 450.0)
    trajectories: int = 5                # MD segments per temperature (the unit of the train/val/test split)
    frames_per_trajectory: int = 8
    displaced_copies: int = 1            # displaced copies per MD frame (ML atoms moved by displacement_A)
    displacement_A: tuple[float, float] = (0.05, 0.15)
    equil_ps: float = 2.0
    gap_ps: float = 1.0                  # MD between two segments
    spacing_ps: float = 0.25             # between frames of a segment
    timestep_fs: float = 1.0
    friction_per_ps: float = 1.0
    bond_k: float = 2.5e5                # kJ/mol/nm^2, elastic bonds of the ML zone (r0: prepared geometry)
    angle_k: float = 400.0               # kJ/mol/rad^2, elastic angles (theta0: prepared geometry)
    improper_k: float = 100.0            # kJ/mol/rad^2, keeps planar centres (3 neighbours) planar
    droplet_k: float = 500.0             # kJ/mol/nm^2, flat-bottom restraint of a cluster's MM residues
    model: str = ""                      # sample with this model instead (ML/MM MD, [explore] timestep and friction):
                                         # ours, a committee, or a file the model seam loads; "": MM (elastic zone)


@dataclass(frozen=True)
class ExploreConfig:
    """[explore]: rounds >= 1, ML/MM MD with the committee (ASE Langevin, coupling.ase_calculator) and selection."""

    temperatures_K: tuple[float, ...] = (300.0, 450.0)
    runs_per_temperature: int = 1
    steps: int = 2000
    timestep_fs: float = 0.5
    friction_per_ps: float = 10.0
    stride: int = 10                     # a candidate frame every `stride` steps
    floor_kjmol_nm: float = 100.0        # force_std_max below this (~0.1 eV/Å): the committee agrees, not selected
    ceiling_kjmol_nm: float = 300.0      # above this (~0.3 eV/Å): likely unphysical, not labelled
    stop_after: int = 10                 # consecutive candidates above the ceiling end a run
    frames_per_round: int = 40
    min_separation: int = 3              # selected frames of one run are at least this many candidates apart


@dataclass(frozen=True)
class TrainSection:
    """[train]: the committee (potentials.committee_train), one model preset, warm-started from round to round."""

    preset: str = "small"                # inputs/models/configs/NAME.toml or a path
    committee: int = 3
    epochs: int = 150                    # round 0 (from scratch)
    warm_epochs: int = 60                # rounds that start from the previous round's members
    early_stopping: int = 25
    batch_size: int = 8
    lr: float = 1e-3
    warm_lr: float = 3e-4                # learning rate of rounds that start from the previous round's members
    warm_start: bool = True
    init_model: str = ""                 # round 0's members start from this model's weights (fine-tuning, e.g.
                                         # inputs/models/small_b3lyp_svp.pt; its architecture); "": from scratch
    max_minutes: float = 10.0            # per member and round (0: no limit); the best state so far is kept
    w_energy: float = 30.0
    w_forces: float = 1.0
    w_mm_forces: float = 10.0
    w_dipole: float = 0.1
    threads: int = 1
    device: str = "auto"                 # auto: cuda when torch sees a GPU, else cpu
    seed: int = 0


@dataclass(frozen=True)
class FinalConfig:
    """[final]: after the loop, the committee is trained once more from scratch on every train/val frame the loop
    labelled, with a longer schedule and more weight on the forces (the rounds train briefly, to move on); it
    becomes DIR/model.pt. The test trajectories stay held out. epochs = 0: the last round's committee instead."""

    epochs: int = 400                    # 0: no final training
    init_model: str = "auto"             # auto: [train] init_model if set, else the shipped network when [train] preset
                                         # is "small" and [level] is its B3LYP/def2-SVP; "none": from scratch; a path
    lr: float = 1e-3                     # from scratch; a fine-tuned start uses min(lr, [train] warm_lr)
    w_forces: float = 4.0                # [train] w_energy, w_mm_forces and w_dipole are kept
    plateau_patience: int = 20
    min_lr: float = 1e-6
    early_stopping: int = 60
    max_minutes: float = 20.0            # per member (0: no limit)


@dataclass(frozen=True)
class Targets:
    """[targets]: the loop stops when all of them are met (held-out MAEs of the committee mean, and the fraction
    of explored frames whose force_std_max exceeds [explore] floor)."""

    energy_kcalmol: float = 0.5
    forces_kcalmol_A: float = 1.0
    mm_forces_kcalmol_A: float = 0.2
    uncertain_fraction: float = 0.05


@dataclass(frozen=True)
class Budget:
    """[budget]: the loop stops when one is used up (0: no limit)."""

    max_frames: int = 400
    max_rounds: int = 8
    max_hours: float = 0.0


@dataclass(frozen=True)
class ValidateConfig:
    """[validate]: after the loop, the final committee's errors on QM/MM clusters sampled independently of
    everything the loop did (driver/learn_validate.py): a fresh MM chain (new seed) and ML/MM MD with the final
    committee, frames taken at fixed intervals (not selected by disagreement), labelled like the rest."""

    frames: int = 40                     # 0: no validation
    temperature_K: float = 300.0
    ml_fraction: float = 0.5             # share of the frames from ML/MM MD with the final committee
    stride: int = 100                    # ML/MM steps ([explore] timestep_fs) between two frames
    spacing_ps: float = 0.5              # MM MD between two frames
    equil_ps: float = 5.0                # MM equilibration from the prepared structure
    random_seed: int = 7919              # MD seeds (independent of the loop's random_seed)


@dataclass(frozen=True)
class LearnConfig:
    """Everything ``mlmm learn`` needs besides the system file (see the module docstring)."""

    seed: SeedConfig = field(default_factory=SeedConfig)
    explore: ExploreConfig = field(default_factory=ExploreConfig)
    level: LevelOfTheory = field(default_factory=LevelOfTheory)
    train: TrainSection = field(default_factory=TrainSection)
    final: FinalConfig = field(default_factory=FinalConfig)
    targets: Targets = field(default_factory=Targets)
    budget: Budget = field(default_factory=Budget)
    validate: ValidateConfig = field(default_factory=ValidateConfig)
    split_pattern: tuple[str, ...] = ("train", "test", "val", "train", "train")
    qm_device: str = "auto"              # auto | cpu | gpu (gpu4pyscf; see the README)
    random_seed: int = 0

    @classmethod
    def from_toml(cls, path: str | Path | None) -> "LearnConfig":
        if path is None:
            return cls().validated("defaults")
        return build(cls, read_toml(path, "learn config"), where=str(path)).validated(str(path))

    @classmethod
    def from_dict(cls, raw: dict, where: str = "learn config") -> "LearnConfig":
        return build(cls, raw, where=where).validated(where)

    def validated(self, where: str) -> "LearnConfig":
        """Self, after the checks the types cannot express; SetupError naming the key otherwise."""
        def need(ok: bool, text: str) -> None:
            if not ok:
                raise SetupError(f"{where}: {text}")

        s, e, t = self.seed, self.explore, self.train
        need(bool(self.split_pattern) and all(x in SPLITS for x in self.split_pattern),
             f"split_pattern {list(self.split_pattern)}: entries must be train, val or test")
        need({"train", "val", "test"} <= set(self.split_pattern),
             "split_pattern needs at least one train, one val and one test entry (held-out errors need a test set)")
        need(len(s.temperatures_K) > 0 and all(x > 0 for x in s.temperatures_K),
             "[seed] temperatures_K must be a non-empty list of positive temperatures")
        need(s.trajectories * len(s.temperatures_K) >= len(self.split_pattern),
             f"[seed] trajectories x temperatures = {s.trajectories * len(s.temperatures_K)} segments, fewer than "
             f"split_pattern's {len(self.split_pattern)} entries: some split would get no seed data; "
             "raise [seed] trajectories")
        need(s.frames_per_trajectory >= 1 and s.displaced_copies >= 0, "[seed] frames_per_trajectory must be >= 1 "
             "and displaced_copies >= 0")
        need(0 <= s.displacement_A[0] <= s.displacement_A[1],
             "[seed] displacement_A = [low, high] with 0 <= low <= high")
        need(min(s.timestep_fs, s.spacing_ps, e.timestep_fs) > 0 and min(s.equil_ps, s.gap_ps) >= 0,
             "timesteps and spacing_ps must be > 0, equil_ps and gap_ps >= 0")
        need(len(e.temperatures_K) > 0 and all(x > 0 for x in e.temperatures_K),
             "[explore] temperatures_K must be a non-empty list of positive temperatures")
        need(e.runs_per_temperature >= 1 and e.steps >= 1 and e.stride >= 1 and e.frames_per_round >= 1,
             "[explore] runs_per_temperature, steps, stride and frames_per_round must be >= 1")
        need(0 <= e.floor_kjmol_nm < e.ceiling_kjmol_nm,
             f"[explore] floor_kjmol_nm = {e.floor_kjmol_nm} must be >= 0 and below ceiling_kjmol_nm = "
             f"{e.ceiling_kjmol_nm}")
        need(e.min_separation >= 1 and e.stop_after >= 1, "[explore] min_separation and stop_after must be >= 1")
        need(t.committee >= 2, f"[train] committee = {t.committee}: active learning needs a committee of at least "
                               "2 members (their disagreement selects the frames)")
        need(min(t.epochs, t.warm_epochs, t.batch_size, t.threads) >= 1 and t.lr > 0 and t.warm_lr > 0,
             "[train] epochs, warm_epochs, batch_size, threads must be >= 1 and lr, warm_lr > 0")
        need(t.device == "auto" or t.device == "cpu" or t.device.startswith("cuda"),
             f"[train] device = {t.device!r}: choose auto, cpu, cuda or cuda:N")
        f = self.final
        need(f.epochs >= 0 and f.lr > 0 and f.w_forces >= 0 and f.plateau_patience >= 1 and f.early_stopping >= 1
             and f.min_lr > 0 and f.max_minutes >= 0, "[final] epochs >= 0 (0: none), lr > 0, w_forces >= 0, "
             "plateau_patience and early_stopping >= 1, min_lr > 0, max_minutes >= 0")
        need(self.qm_device in ("auto", "cpu", "gpu"), f"qm_device = {self.qm_device!r}: choose auto, cpu or gpu")
        need(self.budget.max_frames >= 0 and self.budget.max_rounds >= 0 and self.budget.max_hours >= 0,
             "[budget] values must be >= 0 (0: no limit)")
        need(min(self.targets.energy_kcalmol, self.targets.forces_kcalmol_A, self.targets.mm_forces_kcalmol_A) > 0
             and 0 <= self.targets.uncertain_fraction <= 1,
             "[targets] MAE targets must be > 0 and uncertain_fraction within [0, 1]")
        v = self.validate
        need(v.frames >= 0 and 0.0 <= v.ml_fraction <= 1.0 and v.stride >= 1 and v.temperature_K > 0
             and v.spacing_ps > 0 and v.equil_ps >= 0,
             "[validate] frames must be >= 0 (0: none), ml_fraction within [0, 1], stride >= 1, temperature_K and "
             "spacing_ps > 0, equil_ps >= 0")
        return self

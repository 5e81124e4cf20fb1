"""QM/MM reference labels with PySCF: B3LYP/def2-SVP (density fitting) in the field of TIP3P point charges.

:func:`label_frame` computes one frame: energy, forces on the QM atoms, forces on the point charges, dipole
and quadrupole of the QM charge density. :func:`run` is the work of ``mlmm label`` (:mod:`driver.pipeline`):
it plans the frames from a TOML config (solutes x MD settings x trajectories), samples configurations with
:mod:`potentials.sampling`, takes the embedded charges from the ``point_charges`` factory it is handed (the
coupling layer's embedding, the same selection the ML client uses) and appends each labelled frame to a
NetCDF4 dataset (:mod:`potentials.dataset`). It is resumable: frames already in the file (by id) are
skipped, and MD blocks are cached next to the dataset.

Physics and conventions:

* Energy = electrons + QM nuclei + their Coulomb interaction with the point charges (``pyscf.qmmm``);
  the MM-MM interaction is not included (the MM engine owns it).
* Point charges, not Gaussian smeared; all coordinates go to PySCF in Bohr converted with
  :mod:`potentials.core.units`, so the unit factors are the project's, not PySCF's.
* ``xc = 'b3lypg'``: B3LYP with VWN1-RPA correlation (libxc HYB_GGA_XC_B3LYP, id 402, as in Gaussian).
  PySCF's plain 'b3lyp' means the same in 2.14 but can be switched to the VWN5 flavour by a config flag, so the
  explicit name is used and recorded.
* Forces on the charges: ``-(d hcore/dR_mm . D + d E_nuc-mm/dR_mm)`` from PySCF's QM/MM gradient object
  (exact for the variational SCF energy; density fitting and the XC grid do not depend on R_mm).
* The XC grid moves with the atoms but its response is not included in the QM forces (PySCF's default);
  the resulting error at grid level 3 is ~1e-4 eV/Å.

Units at the API: Å, eV, eV/Å, e, e·Å (converted from PySCF's Bohr/Hartree here and only here).
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import signal
import subprocess
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from potentials.core.config import build, read_toml
from potentials.core.errors import CalculationFailed, SetupError
from potentials.core.spec import CouplingSpec
from potentials.core.units import ANGSTROM_PER_NM, BOHR_PER_ANGSTROM, EV_PER_HARTREE

log = logging.getLogger(__name__)

EV_PER_ANGSTROM_PER_HARTREE_PER_BOHR = EV_PER_HARTREE * BOHR_PER_ANGSTROM
REPO = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO / "inputs" / "data" / "label_config.toml"
_COUPLING = CouplingSpec()              # the embedding cutoff and switch a simulation uses by default


@dataclass(frozen=True)
class LevelOfTheory:
    """PySCF settings of the reference calculation (energies in Hartree inside PySCF)."""

    xc: str = "b3lypg"
    basis: str = "def2-svp"
    auxbasis: str = "def2-universal-jkfit"
    grid_level: int = 3
    conv_tol: float = 1e-9          # Hartree
    max_cycle: int = 100

    def provenance(self) -> dict[str, object]:
        from pyscf import dft
        out = {f"qm_{k}": v for k, v in asdict(self).items()}
        out["qm_method"] = "RKS, density fitting (pyscf.df), point-charge embedding (pyscf.qmmm.mm_charge)"
        out["qm_xc_libxc"] = json.dumps(dft.libxc.parse_xc(self.xc)[1])
        out["qm_xc_note"] = "B3LYP with VWN1-RPA local correlation (libxc HYB_GGA_XC_B3LYP, id 402; Gaussian's)"
        out["qm_grid"] = f"PySCF grids level {self.grid_level}, nwchem pruning, no grid response in gradients"
        return out


@dataclass
class Label:
    """Result of one frame. energy eV; forces (n,3) eV/Å; mm_forces (m,3) eV/Å on each point charge;
    dipole (3,) e·Å and quadrupole (6,) e·Å² about the QM-atom centroid; scf_cycles; seconds; note."""

    energy: float
    forces: np.ndarray
    mm_forces: np.ndarray
    dipole: np.ndarray
    quadrupole: np.ndarray
    scf_cycles: int
    seconds: float
    note: str = ""


def qm_backend(request: str = "auto") -> str:
    """The QM backend a label runs on: ``"gpu"`` (gpu4pyscf, the CUDA port of PySCF, same API and numbers) or
    ``"cpu"`` (PySCF). ``request``: ``"auto"`` (the GPU when gpu4pyscf imports and CUDA shows a device),
    ``"cpu"`` or ``"gpu"`` (SetupError naming what is missing when it cannot run)."""
    if request not in ("auto", "cpu", "gpu"):
        raise SetupError(f"QM device {request!r}: choose auto, cpu or gpu")
    if request == "cpu":
        return "cpu"
    why = _gpu_missing()
    if not why:
        return "gpu"
    if request == "gpu":
        raise SetupError(f"QM device \"gpu\": {why}; install gpu4pyscf (pip install gpu4pyscf-cuda12x) on a CUDA "
                         "machine, or label on the CPU (qm_device = \"cpu\" or \"auto\")")
    return "cpu"


def _gpu_missing() -> str:
    """Why gpu4pyscf cannot run here ("" when it can)."""
    import importlib.util
    if importlib.util.find_spec("gpu4pyscf") is None or importlib.util.find_spec("cupy") is None:
        return "gpu4pyscf (and cupy) are not installed"
    try:
        import cupy
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:                               # no driver, no runtime: cupy raises its own types
        return f"cupy sees no CUDA device ({' '.join(str(exc).split())[:120]})"
    return "" if n > 0 else "cupy sees no CUDA device"


def _host(x) -> np.ndarray:
    """A numpy array from a numpy or cupy array (gpu4pyscf returns cupy arrays)."""
    if type(x).__module__.split(".")[0] == "cupy":
        return x.get()
    return np.asarray(x)


def _scf(numbers, positions, charge, mm_positions, mm_charges, level: LevelOfTheory, attempt: int,
         backend: str = "cpu"):
    from pyscf import gto
    if backend == "gpu":                 # gpu4pyscf mirrors pyscf.dft and pyscf.qmmm.add_mm_charges
        from gpu4pyscf import dft, qmmm
    else:
        from pyscf import dft, qmmm
    mol = gto.M(atom=[(int(z), tuple(r)) for z, r in zip(numbers, positions * BOHR_PER_ANGSTROM)],
                unit="Bohr", basis=level.basis, charge=int(charge), spin=0, verbose=0)
    mf = dft.RKS(mol).density_fit(auxbasis=level.auxbasis)
    mf.xc = level.xc
    mf.grids.level = level.grid_level
    mf.conv_tol = level.conv_tol
    mf.max_cycle = level.max_cycle
    if mm_charges is not None and len(mm_charges):
        mf = qmmm.add_mm_charges(mf, np.asarray(mm_positions, dtype=np.float64) * BOHR_PER_ANGSTROM,
                            np.asarray(mm_charges, dtype=np.float64), unit="Bohr")
    if attempt == 1:            # damping + level shift for oscillating SCF
        mf.damp, mf.level_shift, mf.diis_start_cycle, mf.max_cycle = 0.5, 0.3, 4, 2 * level.max_cycle
    elif attempt == 2:          # second-order SCF
        mf = mf.newton()
    mf.kernel()
    return mol, mf


def label_frame(numbers, positions, charge: int = 0, mm_positions=None, mm_charges=None,
                level: LevelOfTheory = LevelOfTheory(), backend: str = "cpu") -> Label:
    """Label one QM/MM frame.

    Parameters
    ----------
    numbers : (n,) atomic numbers of the QM atoms
    positions : (n,3) Å
    charge : total charge of the QM zone (e); closed shell
    mm_positions : (m,3) Å or None (gas phase)
    mm_charges : (m,) e or None
    backend : "cpu" (PySCF) or "gpu" (gpu4pyscf; :func:`qm_backend` resolves a request)

    Raises CalculationFailed when the SCF does not converge with DIIS, damping/level shift or SOSCF.
    """
    t0 = time.perf_counter()
    numbers = np.asarray(numbers, dtype=int)
    positions = np.asarray(positions, dtype=np.float64).reshape(-1, 3)
    has_mm = mm_charges is not None and len(mm_charges) > 0
    notes = []
    for attempt in range(3):
        try:
            mol, mf = _scf(numbers, positions, charge, mm_positions, mm_charges, level, attempt, backend)
        except (np.linalg.LinAlgError, FloatingPointError, RuntimeError) as exc:   # numerical breakdown
            notes.append(f"SCF attempt {attempt} failed: {exc}")
            continue
        if mf.converged and np.isfinite(mf.e_tot):
            break
        notes.append(f"SCF attempt {attempt} not converged")
    else:
        raise CalculationFailed("SCF did not converge (DIIS, damping + level shift, SOSCF): " + "; ".join(notes))
    grad = mf.nuc_grad_method()
    grad.verbose = 0
    g_qm = _host(grad.kernel())
    dm = mf.make_rdm1()
    if has_mm:
        g_mm = _host(grad.grad_hcore_mm(dm)) + _host(grad.grad_nuc_mm())
    else:
        g_mm = np.zeros((0, 3))
    dm = _host(dm)
    dipole, quadrupole = _moments(mol, dm, positions)
    return Label(energy=float(_host(mf.e_tot)) * EV_PER_HARTREE,
                 forces=-np.asarray(g_qm) * EV_PER_ANGSTROM_PER_HARTREE_PER_BOHR,
                 mm_forces=-np.asarray(g_mm) * EV_PER_ANGSTROM_PER_HARTREE_PER_BOHR,
                 dipole=dipole, quadrupole=quadrupole, scf_cycles=int(getattr(mf, "cycles", -1)),
                 seconds=time.perf_counter() - t0, note="; ".join(notes))


def _moments(mol, dm, positions) -> tuple[np.ndarray, np.ndarray]:
    """Dipole (e·Å) and traceless quadrupole [xx,yy,zz,xy,yz,zx] (e·Å²) about the centroid of the atoms."""
    centre = positions.mean(axis=0) * BOHR_PER_ANGSTROM
    with mol.with_common_orig(centre):
        r = mol.intor_symmetric("int1e_r", comp=3)
        rr = mol.intor_symmetric("int1e_rr", comp=9).reshape(3, 3, *dm.shape)
    z = mol.atom_charges()
    x = mol.atom_coords() - centre
    dip = -np.einsum("xij,ji->x", r, dm) + z @ x
    quad = -np.einsum("xyij,ji->xy", rr, dm) + np.einsum("a,ax,ay->xy", z, x, x)
    quad -= np.eye(3) * np.trace(quad) / 3.0
    quad6 = np.array([quad[0, 0], quad[1, 1], quad[2, 2], quad[0, 1], quad[1, 2], quad[2, 0]])
    return dip / BOHR_PER_ANGSTROM, quad6 / BOHR_PER_ANGSTROM ** 2


# ----------------------------------------------------------------------------------------------------------
# production: config -> plan -> sampled frames -> labels -> dataset


@dataclass(frozen=True)
class LabelConfig:
    """The ``mlmm label`` config (TOML; every key optional, unknown keys are errors). Units in the names."""

    solutes: tuple[str, ...] = ("HOH", "MOH", "ACT", "MAM")
    solvated_kinds: tuple[str, ...] = ("periodic", "droplet")
    temperatures_K: tuple[float, ...] = (300.0, 400.0)
    gas: bool = True
    gas_temperature_K: float = 400.0
    displaced_copies: int = 1            # displaced copies labelled per solvated MD frame
    displacement_A: tuple[float, float] = (0.05, 0.15)
    trajectories: int = 20               # blocks per MD chain
    frames_per_trajectory: int = 5
    split_pattern: tuple[str, ...] = ("train", "test", "val", "train", "train", "train", "train", "train",
                                      "train", "train")
    seed: int = 20240611
    timestep_fs: float = 1.0
    equil_ps: float = 3.0
    gap_ps: float = 1.0
    spacing_ps: float = 0.5
    droplet_radius_nm: float = 1.6
    cluster_waters: int = 80             # waters of the 'cluster' kind (a droplet of exactly this many)
    ml_waters: int | tuple[int, ...] = 0  # waters in the QM zone of solvated frames: the solute's nearest, per
    #                                      frame; a list cycles over the frames of a block (frame f: [f % len])

    @property
    def water_counts(self) -> tuple[int, ...]:
        """``ml_waters`` as a tuple (one entry per frame position in a block, cycled)."""
        return tuple(self.ml_waters) if isinstance(self.ml_waters, tuple) else (self.ml_waters,)
    embedding_cutoff_nm: float = _COUPLING.cutoff_nm
    embedding_switch_nm: float = _COUPLING.switch_width_nm
    cache: str = ""                      # MD cache folder; default: <out>.samples next to the dataset
    qm_device: str = "auto"              # auto | cpu | gpu: PySCF or gpu4pyscf (qm_backend)
    level: LevelOfTheory = field(default_factory=LevelOfTheory)

    @classmethod
    def from_toml(cls, path: str | os.PathLike | None) -> "LabelConfig":
        """Read the config (:func:`potentials.core.config.build`: unknown keys and wrong types are errors
        naming the file and the key); None: the defaults."""
        if path is None:
            return cls()
        cfg = build(cls, read_toml(path, "label config"), where=str(path))
        for s in cfg.split_pattern:
            if s not in ("train", "val", "test"):
                raise SetupError(f"{path}: split_pattern entry {s!r} must be train, val or test")
        if cfg.qm_device not in ("auto", "cpu", "gpu"):
            raise SetupError(f"{path}: qm_device = {cfg.qm_device!r}: choose auto, cpu or gpu")
        if not cfg.water_counts or min(cfg.water_counts) < 0:
            raise SetupError(f"{path}: ml_waters must be >= 0 (a number or a non-empty list), not {cfg.ml_waters}")
        if "cluster" in cfg.solvated_kinds and cfg.cluster_waters < max(1, *cfg.water_counts):
            raise SetupError(f"{path}: cluster_waters ({cfg.cluster_waters}) must be at least 1 and at least "
                             f"ml_waters ({max(cfg.water_counts)})")
        return cfg


@dataclass(frozen=True)
class Task:
    """One frame to label: which chain/block/frame, whether displaced, the QM zone, its dataset metadata."""

    frame_id: str
    chain: object          # sampling.ChainSpec
    block: int
    index: int
    copy: int              # 0: the MD frame itself; >0: displaced copy number
    split: str
    ml_waters: int = 0     # nearest waters in the QM zone besides the solute

    @property
    def series(self) -> str:
        """The chain id, with ``-w<n>`` appended when the QM zone holds ``n`` > 0 waters (the frame ids of
        configs without ml_waters are unchanged; the MD chain and its cache are the same for every n)."""
        return self.chain.chain_id + (f"-w{self.ml_waters}" if self.ml_waters else "")

    @property
    def trajectory(self) -> str:
        return f"{self.series}/b{self.block:03d}"

    @property
    def zone_name(self) -> str:
        """The dataset's ``solute`` field: the solute, or e.g. 'MOH+3HOH' with waters in the QM zone."""
        return self.chain.solute + (f"+{self.ml_waters}HOH" if self.ml_waters else "")


def only_solutes(cfg: LabelConfig, names: str | None) -> LabelConfig:
    """``cfg`` restricted to some of its solutes (``names``: comma-separated, e.g. ``"ACT"``; None: all).

    Chain seeds, frame ids, splits and shards depend on (solute, kind, temperature, block, frame) only, so the
    restricted plan is the full plan's frames of those solutes, in the same order and shards: a job may label the
    solute whose held-out error lags, and a later job with the full config fills in the rest of the same plan."""
    if names is None:
        return cfg
    wanted = tuple(dict.fromkeys(n.strip() for n in names.split(",") if n.strip()))
    missing = [n for n in wanted if n not in cfg.solutes]
    if not wanted or missing:
        raise SetupError(f"--solutes {names!r}: give a comma-separated subset of the config's solutes "
                         f"({','.join(cfg.solutes)})" + (f"; {','.join(missing)} is not one" if missing else ""))
    return dataclasses.replace(cfg, solutes=tuple(s for s in cfg.solutes if s in wanted))


def plan(cfg: LabelConfig) -> list[Task]:
    """All frames of the config in balanced round-robin order.

    Order (outer to inner): trajectory block, frame in block, copy (MD frame, displaced copies), MD setting,
    solute. Stopping at any point therefore leaves every solute and setting equally represented.

    Frame ids are ``<chain id>[-w<ml_waters>]/bBBB/fFF/cC``; chain ids and seeds depend on (solute, kind,
    temperature) only, plus the cluster size for the 'cluster' kind (``MOH-cluster80-300K-s...``). Gas-phase
    frames never hold waters (their ids do not carry ``-w``).
    """
    from .sampling import ChainSpec, solute_parts
    for s in cfg.solutes:
        try:
            solute_parts(s)
        except SetupError as exc:
            raise SetupError(f"config: {exc}") from None
    settings = [(k, t) for k in cfg.solvated_kinds for t in cfg.temperatures_K]
    if cfg.gas:
        settings.append(("gas", cfg.gas_temperature_K))
    common = dict(timestep_fs=cfg.timestep_fs, equil_ps=cfg.equil_ps, gap_ps=cfg.gap_ps,
                  spacing_ps=cfg.spacing_ps, droplet_radius_nm=cfg.droplet_radius_nm)
    # the seed depends on (solute, kind, temperature) only, so a config with a subset of the settings reuses
    # the same cached MD chains
    chains = {}
    for s in cfg.solutes:
        for (k, t) in settings:
            extra = dict(cluster_waters=cfg.cluster_waters) if k == "cluster" else {}
            label = ChainSpec(s, k, t, seed=0, **extra).kind_label        # 'cluster80' for clusters
            chains[(s, k, t)] = ChainSpec(s, k, t, seed=cfg.seed + zlib.crc32(f"{s}/{label}/{t:g}".encode())
                                          % 1000003, **common, **extra)
    tasks = []
    for b in range(cfg.trajectories):
        split = cfg.split_pattern[b % len(cfg.split_pattern)]
        for f in range(cfg.frames_per_trajectory):
            for c in range(1 + cfg.displaced_copies):
                for (k, t) in settings:
                    # gas frames are always displaced (a single copy); solvated frames: MD frame + copies
                    if k == "gas" and c > 0:
                        continue
                    for s in cfg.solutes:
                        spec = chains[(s, k, t)]
                        copy = 1 if k == "gas" else c
                        waters = cfg.water_counts[f % len(cfg.water_counts)]
                        task = Task("", spec, b, f, copy, split, 0 if k == "gas" else waters)
                        tasks.append(dataclasses.replace(task, frame_id=f"{task.trajectory}/f{f:02d}/c{copy}"))
    return tasks


# point_charges(charges, residue, ml_indices, cutoff_nm, switch_nm) -> an object whose
# .frame(positions_nm, box_nm or None) gives (ML positions made whole (n_ml,3) nm, embedded MM positions (M,3) nm,
# their switched charges (M,) e): the embedding's selection, provided by the coupling layer
# (coupling.schemes: SCHEMES.get("electrostatic").point_charges)
PointChargesFactory = Callable[..., object]


class Labeller:
    """Turns tasks into dataset frames (owns the MD chains and the embedded point charges of each QM zone).

    The point-charge object depends on the QM zone (its atoms are no charges): one per chain when the zone is
    the solute, one per distinct set of waters (the last ``MAX_ZONES`` kept) when it holds waters."""

    MAX_ZONES = 256

    def __init__(self, cfg: LabelConfig, cache: Path, point_charges: PointChargesFactory | None = None):
        self.cfg, self.cache = cfg, cache
        self.point_charges = point_charges
        self.backend = qm_backend(cfg.qm_device)
        self._chains: dict[str, object] = {}
        self._envs: dict[tuple, object] = {}

    def _chain(self, spec):
        from .sampling import Chain
        if spec.chain_id not in self._chains:
            self._chains[spec.chain_id] = Chain(spec, self.cache)
        return self._chains[spec.chain_id]

    def _embedding(self, chain_id: str, data, zone: np.ndarray | None = None):
        """The point charges of a chain's frames whose QM zone is ``zone`` (atom indices; default: the
        solute). The returned object's ``.frame`` gives the zone's positions in the order of ``zone``."""
        zone = np.asarray(data.ml_indices if zone is None else zone)
        key = (chain_id, zone.tobytes())
        env = self._envs.get(key)
        if env is None:
            if self.point_charges is None:
                raise SetupError("labelling solvated frames needs the embedding's point charges "
                                 "(Labeller(..., point_charges=...); `mlmm label` passes the coupling layer's)")
            if len(self._envs) >= self.MAX_ZONES:
                self._envs.pop(next(iter(self._envs)))
            env = self._envs[key] = self.point_charges(data.charges, data.residue, zone,
                                                       self.cfg.embedding_cutoff_nm, self.cfg.embedding_switch_nm)
        return env

    def inputs(self, task: Task) -> dict[str, object]:
        """QM inputs of a task: numbers, positions (Å), charge, mm_positions (Å, float32), mm_charges (float32),
        zone (atom indices of the QM zone in the MD system).

        With ``task.ml_waters`` the zone is chosen on the MD frame (:func:`potentials.sampling.qm_zone`), so a
        displaced copy has the zone of its MD frame; displaced copies move every atom of the zone."""
        from .sampling import displace, qm_zone
        chain = self._chain(task.chain)
        data = chain.data
        pos = chain.block(task.block, self.cfg.frames_per_trajectory)[task.index].astype(np.float64)
        zone, numbers = qm_zone(data, pos, task.ml_waters if task.chain.kind != "gas" else 0)
        if task.copy > 0:
            rng = np.random.default_rng([task.chain.seed, task.block, task.index, task.copy])
            lo, hi = self.cfg.displacement_A
            pos = displace(pos, zone, rng, lo, hi)
        out = dict(numbers=numbers, positions=pos[zone] * ANGSTROM_PER_NM, charge=data.solute_charge,
                   mm_positions=np.zeros((0, 3), np.float32), mm_charges=np.zeros(0, np.float32), zone=zone)
        if task.chain.kind != "gas":
            # the ML zone as the network sees it (whole across the box edge) and the embedded charges
            ml, mm_pos, q = self._embedding(task.chain.chain_id, data, zone).frame(pos, data.box)
            out["positions"] = np.asarray(ml) * ANGSTROM_PER_NM
            out["mm_positions"] = (np.asarray(mm_pos) * ANGSTROM_PER_NM).astype(np.float32)
            out["mm_charges"] = np.asarray(q).astype(np.float32)
        return out

    def frame(self, task: Task) -> dict[str, object]:
        """Label a task; returns the dataset record (see :class:`potentials.dataset.DatasetWriter`)."""
        x = self.inputs(task)
        lab = label_frame(x["numbers"], x["positions"], x["charge"], x["mm_positions"], x["mm_charges"],
                          self.cfg.level, self.backend)
        return record(frame_meta(task, x), x, lab)


def frame_meta(task: Task, x: dict[str, object]) -> dict[str, object]:
    """The dataset fields of a task that do not come from the QM calculation (scalars and strings)."""
    spec = task.chain
    kind = "displaced" if (task.copy > 0 and spec.kind != "gas") else spec.kind
    return dict(frame_id=task.frame_id, trajectory=task.trajectory, solute=task.zone_name, kind=kind,
                environment=spec.kind, split=task.split, total_charge=int(x["charge"]),
                temperature=float(spec.temperature), displaced=int(task.copy > 0), block=task.block,
                index_in_block=task.index)


def record(meta: dict[str, object], x: dict[str, object], lab: Label) -> dict[str, object]:
    """A dataset record: a frame's metadata (:func:`frame_meta`), its QM inputs (numbers, positions,
    mm_positions, mm_charges) and its label."""
    return dict(meta, energy=lab.energy, dipole=lab.dipole, quadrupole=lab.quadrupole, scf_cycles=lab.scf_cycles,
                seconds=lab.seconds, numbers=x["numbers"], positions=x["positions"], forces=lab.forces,
                mm_positions=x["mm_positions"], mm_charges=x["mm_charges"], mm_forces=lab.mm_forces)


def provenance(cfg: LabelConfig, config_text: str) -> dict[str, object]:
    import netCDF4
    import openmm
    import pyscf
    import torch
    try:
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    out = dict(cfg.level.provenance())
    out.update(
        title="QM/MM reference data (electrostatic embedding) for ipi-mlmm",
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        git_commit=commit, pyscf_version=pyscf.__version__, openmm_version=openmm.__version__,
        numpy_version=np.__version__, netcdf4_version=netCDF4.__version__, torch_version=torch.__version__,
        seed=cfg.seed, embedding="coupling.embedding (residue-based, quintic switch)",
        embedding_cutoff_nm=cfg.embedding_cutoff_nm, embedding_switch_nm=cfg.embedding_switch_nm,
        mm_model="flexible TIP3P (amber14/tip3p.xml), Joung-Cheatham ions; solutes: inputs/forcefields/"
                 "solutes.xml (sampling only)",
        sampling="OpenMM LangevinMiddle, see potentials/sampling.py and the config attribute",
        split_rule="by trajectory (MD block): split_pattern[block % len(split_pattern)]",
        config=config_text or json.dumps(asdict(cfg), default=str),
    )
    return out


def _check_level(path: Path, cfg: LabelConfig) -> None:
    from .dataset import Dataset
    with Dataset.open(path) as ds:
        for key, value in cfg.level.provenance().items():
            if key in ds.attrs and str(ds.attrs[key]) != str(value):
                raise SetupError(f"{path} was labelled with {key}={ds.attrs[key]!r}, the config asks for "
                                 f"{value!r}; write to a new --out file")
        if "embedding_cutoff_nm" in ds.attrs and float(ds.attrs["embedding_cutoff_nm"]) != cfg.embedding_cutoff_nm:
            raise SetupError(f"{path} uses embedding cutoff {ds.attrs['embedding_cutoff_nm']} nm, the config "
                             f"{cfg.embedding_cutoff_nm} nm; write to a new --out file")


def shard_of(plan_: list[Task], shard: tuple[int, int]) -> list[Task]:
    """Shard ``k`` of ``n`` (``shard = (k, n)``, 1 <= k <= n): the planned frames whose id hashes to k (CRC-32
    mod n), in plan order. n labellers, one per shard, share a plan without overlap, and the hash spreads every
    solute, setting and copy over all shards (every n-th frame would give each shard one solute)."""
    k, n = shard
    if not 1 <= k <= n:
        raise SetupError(f"shard {k}/{n} does not exist; shards are 1/{n} to {n}/{n}")
    return [t for t in plan_ if zlib.crc32(t.frame_id.encode()) % n == k - 1]


def pending(cfg: LabelConfig, out: Path, shard: tuple[int, int] = (1, 1)) -> tuple[list[Task], list[Task], Path]:
    """(the planned tasks of shard k of n, those that dataset ``out`` neither holds nor lists as skipped, the MD
    cache folder); checks that an existing ``out`` has the config's level of theory."""
    from .dataset import frame_ids
    tasks = shard_of(plan(cfg), shard)
    cache = Path(cfg.cache) if cfg.cache else out.with_suffix(".samples")
    if shard[1] > 1:
        cache = cache.with_name(f"{cache.name}-shard{shard[0]}of{shard[1]}")
    done: set[str] = set()
    if out.exists():
        _check_level(out, cfg)
        done = frame_ids(out)
    done |= skipped_ids(skipped_path(out))
    return tasks, [t for t in tasks if t.frame_id not in done], cache


def skipped_path(dataset: Path) -> Path:
    """The skipped-frames list of dataset ``dataset`` (``data.nc`` -> ``data.skipped.txt``), kept by `mlmm label`,
    ``--import-labels`` and `mlmm learn` alike."""
    return Path(dataset).with_suffix(".skipped.txt")


def skipped_ids(path: Path) -> set[str]:
    """Frame ids of a skipped-frames list (``<frame id>\\t<why>`` per line; none if there is no file)."""
    if not path.exists():
        return set()
    return {line.split("\t")[0] for line in path.read_text().splitlines() if line}


def add_skipped(path: Path, items) -> None:
    """Append (frame id, why) pairs to a skipped-frames list: frames whose SCF failed, not labelled again."""
    with open(path, "a") as fh:
        fh.writelines(f"{fid}\t{why}\n" for fid, why in items)


def run(cfg: LabelConfig, out: str | Path, point_charges: PointChargesFactory | None, frames: int | None = None,
        config_text: str = "", threads: int = 1, shard: tuple[int, int] = (1, 1)) -> int:
    """Label the planned frames of ``cfg`` that dataset ``out`` does not hold yet (at most ``frames`` new
    ones), appending each to ``out``; ``point_charges`` gives the embedded MM charges (see :class:`Labeller`).
    ``config_text`` is stored in the dataset's provenance. With ``shard = (k, n)`` only shard k of n of the plan
    (:func:`shard_of`) is labelled: n such jobs may append to the same ``out`` at once (each append holds the
    file's lock), each sampling MD into its own cache folder. Returns the number of new frames."""
    from .dataset import DatasetWriter
    out = Path(out)
    qm_backend(cfg.qm_device)                       # a GPU asked for but not there: refused before any file is made
    tasks, todo, cache = pending(cfg, out, shard)
    prov = provenance(cfg, config_text)
    writer = DatasetWriter(out, prov)
    writer.add_history(f"{prov['created']} mlmm label session: git {prov['git_commit']}, pyscf "
                       f"{prov['pyscf_version']}, openmm {prov['openmm_version']}, {threads} thread(s), "
                       f"solutes {','.join(cfg.solutes)}")
    skipped = skipped_path(out)
    limit = frames if frames is not None else len(todo)
    log.info("labelling %d of %d planned frames%s into %s (%d done, %d thread(s), MD cache %s)",
             min(limit, len(todo)), len(tasks), f" (shard {shard[0]}/{shard[1]})" if shard[1] > 1 else "", out,
             len(tasks) - len(todo), threads, cache)
    labeller = Labeller(cfg, cache, point_charges)
    log.info("QM on the %s (%s)", labeller.backend.upper(), "gpu4pyscf" if labeller.backend == "gpu" else "PySCF")
    t_start, n_new = time.perf_counter(), 0
    for task in todo[:limit]:
        t0 = time.perf_counter()
        try:
            rec = labeller.frame(task)
        except CalculationFailed as exc:
            log.warning("skip %s: %s", task.frame_id, exc)
            add_skipped(skipped, [(task.frame_id, exc)])
            continue
        append_frame(writer, rec)
        n_new += 1
        elapsed = time.perf_counter() - t_start
        rate = n_new / elapsed * 3600.0
        left = min(limit, len(todo)) - n_new
        log.info("[%d/%d] %s E=%.4f eV |F|max=%.2f eV/A m=%d cyc=%d qm=%.1fs total=%.1fs | %.0f frames/h, "
                 "ETA %.1f h", n_new, min(limit, len(todo)), task.frame_id, rec["energy"],
                 float(np.abs(rec["forces"]).max()), len(rec["mm_charges"]), rec["scf_cycles"], rec["seconds"],
                 time.perf_counter() - t0, rate, left / max(rate, 1e-9))
    log.info("done: %d new frames in %.1f min", n_new, (time.perf_counter() - t_start) / 60.0)
    return n_new


def append_frame(writer, rec: dict) -> None:
    """Append one frame; a kill signal arriving during the write is held until the frame is complete (HDF5
    files can be corrupted by dying mid-write); outside the write the default handlers stop the job at once."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT, signal.SIGHUP})
    try:
        writer.append(rec)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)

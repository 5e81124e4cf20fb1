"""`mlmm analyze RUN_DIR`: figures (PNG) and a short text summary of a run folder written by `mlmm run`.

Reads what i-PI wrote, as described by the run's own ``input.xml``: the properties table (units from its
header, converted with i-PI's unit table to kJ/mol, K, ps), the ML client's extras trajectory if the input
asked for one (``<trajectory filename='xtr' extra_type='ml.charges,ml.dipole'> extras </trajectory>``), the
AMBER NetCDF trajectories ``mlmm run`` made from i-PI's positions, and i-PI's log for the speed.

Writes into ``RUN_DIR/analysis`` (or ``--out``):

==========================  ==========================================================================
``energy.png``              potential per component (MM, ML), kinetic and conserved energy (+ linear fit)
``temperature.png``         temperature, its running mean and the thermostat target
``quantum_kinetic.png``     centroid-virial kinetic energy (``kinetic_cv``, PIMD) vs the classical value
``ml_charges.png``          ML-zone atomic charges and dipole over time (from the ML client's extras)
``uncertainty.png``         a committee model's spread over time (``ml.uncertainty`` extras), largest over beads
``rdf.png``                 g(r) of water oxygens around the ML zone's heavy atoms
``summary.txt``             the numbers (drift, mean temperature, ns/day, ...) and what was skipped
``summary.json``            the same numbers for scripts
==========================  ==========================================================================

A figure whose data the run does not have is skipped with a line in the summary, never an error.
"""
from __future__ import annotations

import json
import logging
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import trajectory, xmlinput
from potentials.core.errors import SetupError

log = logging.getLogger(__name__)

BULK_WATER_O_PER_NM3 = 33.4     # number density of water at 300 K, 1 bar: g(r) reference for clusters
RDF_BIN_NM = 0.01
RDF_MAX_CLUSTER_NM = 1.2
MAX_PAIR_VALUES = 20_000_000    # distances held in memory at once by the RDF (frames x pairs)
EXTRA_WIDTHS = {"ml.dipole": 3, "ml.n_embedded": 1, "ml.uncertainty": 2}   # ml.charges: the rest of the row
WATER_NAMES = {"HOH", "WAT", "SOL", "TIP3", "TIP4", "TIP5", "SPC", "T3P", "T4P", "H2O"}


@dataclass
class Summary:
    """Numbers (name -> (value, unit)) and the lines of what was skipped or noted."""

    values: dict[str, tuple[float | int | str, str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    figures: list[Path] = field(default_factory=list)

    def add(self, name: str, value, unit: str = "") -> None:
        self.values[name] = (value, unit)

    def skip(self, figure: str, why: str) -> None:
        self.notes.append(f"skipped {figure}: {why}")
        log.info("skipped %s: %s", figure, why)

    def text(self, run_dir: Path) -> str:
        lines = [f"mlmm analyze: {run_dir}", ""]
        for name, (value, unit) in self.values.items():
            v = f"{value:.6g}" if isinstance(value, float) else str(value)
            lines.append(f"{name}: {v}{' ' + unit if unit else ''}")
        lines += [""] + [f"figure: {p.name}" for p in self.figures] + [""] + self.notes
        return "\n".join(lines).rstrip() + "\n"


# ------------------------------------------------------------------------------------------------- CLI
def main(args) -> int:
    """``mlmm analyze RUN_DIR [--system TOML] [--out DIR] [--skip PS]``."""
    summary = analyze(args.run_dir, system=args.system, out=args.out, skip_ps=args.skip)
    print(summary.text(Path(args.run_dir)), end="")
    return 0


def analyze(run_dir: str | Path, *, system: str | Path | None = None, out: str | Path | None = None,
            skip_ps: float = 0.0) -> Summary:
    """Analyse ``run_dir``; returns the :class:`Summary` also written to ``OUT/summary.txt``.

    Parameters
    ----------
    run_dir : a folder written by ``mlmm run`` (needs ``input.xml`` and i-PI's properties file).
    system : system.toml of the run; needed for the RDF (which atoms are water, which are the ML zone).
        Default: the one recorded in ``run_dir/run.json`` by ``mlmm run``.
    out : output folder, default ``run_dir/analysis``.
    skip_ps : float, ps
        Equilibration left out of averages, drift and RDF.
    """
    import matplotlib
    matplotlib.use("Agg")

    run_dir = Path(run_dir)
    run = _Run(run_dir)
    if system is None and (run_dir / "run.json").is_file():      # written by `mlmm run`
        system = json.loads((run_dir / "run.json").read_text()).get("system")
        if system is not None and not Path(system).is_file():
            system = None
    out = Path(out) if out is not None else run_dir / "analysis"
    out.mkdir(parents=True, exist_ok=True)
    s = Summary()
    props = run.properties()
    t = props["time"]
    if skip_ps >= t[-1]:
        raise SetupError(f"--skip {skip_ps} ps leaves nothing: the run ends at {t[-1]:g} ps")
    keep = t >= skip_ps
    s.add("steps", int(props["step"][-1]))
    s.add("simulated time", float(t[-1]), "ps")
    s.add("atoms", run.natoms)
    s.add("beads", run.nbeads)
    s.add("time step", run.dt_ps * 1e3, "fs")
    if skip_ps > 0:
        s.add("averages from", float(skip_ps), "ps")

    _energy_plot(out, props, keep, run, s)
    _temperature_plot(out, props, keep, run, s)
    _quantum_kinetic_plot(out, props, keep, run, s)
    _extras_plot(out, run, skip_ps, s)
    _uncertainty_plot(out, run, skip_ps, s)
    _rdf_plot(out, run, system, skip_ps, s)
    _speed(run, s)

    (out / "summary.txt").write_text(s.text(run_dir))
    (out / "summary.json").write_text(json.dumps(
        {"values": {k: {"value": v, "unit": u} for k, (v, u) in s.values.items()}, "notes": s.notes,
         "figures": [p.name for p in s.figures]}, indent=1))
    return s


# ------------------------------------------------------------------------------------------------- inputs
class _Run:
    """What the run folder holds, located through its ``input.xml``."""

    def __init__(self, folder: Path):
        if not folder.is_dir():
            raise SetupError(f"run folder {folder} not found; give the --out folder of `mlmm run`")
        xml = folder / "input.xml"
        if not xml.is_file():
            raise SetupError(f"{folder} has no input.xml: not a run folder written by `mlmm run`")
        self.folder = folder
        self.root = xmlinput.load(xml).getroot()
        self.prefix = xmlinput.output_prefix(self.root)
        self.components = xmlinput.force_components(self.root, str(xml))
        self.dt_ps = xmlinput.timestep_ps(self.root) or 0.0
        init = self.root.find("system/initialize")
        self.nbeads = int(init.get("nbeads", "1")) if init is not None else 1
        self.target_K = _target_temperature(self.root)
        self.natoms = _count_atoms(folder / "init.extxyz")

    def properties(self) -> dict[str, np.ndarray]:
        """Columns in kJ/mol, K, ps; keys: i-PI labels (``pot_component_raw(0)`` renamed ``pot_mm``)."""
        from ipi.utils.units import unit_to_internal, unit_to_user

        name = xmlinput.properties_file(self.root)
        path = self.folder / name if name else None
        if path is None or not path.is_file():
            raise SetupError(f"{self.folder}: no i-PI properties file ({name or 'no <properties> in input.xml'}); "
                             "the run wrote no energies to analyse")
        values, units = trajectory.read_properties(path)
        if len(values.get("step", [])) < 2:
            raise SetupError(f"{path} has fewer than 2 rows; run longer (or a smaller properties stride)")
        family = {"time": ("time", "picosecond"), "temperature": ("temperature", "kelvin")}
        out: dict[str, np.ndarray] = {"step": values["step"]}
        for label, v in values.items():
            base = label.split("(")[0]
            if label == "step" or np.ndim(v) != 1:
                continue
            if base in family:
                dim, to = family[base]
            elif base in ("conserved", "potential") or base.startswith(("kinetic", "pot_component")):
                dim, to = "energy", "kiloj/mol"
            else:
                continue
            conv = unit_to_user(dim, to, unit_to_internal(dim, units[label] or "atomic_unit", 1.0))
            m = re.fullmatch(r"pot_component(_raw)?\((\d+)\)", label)
            if m and int(m.group(2)) < len(self.components):
                label = f"pot_{self.components[int(m.group(2))]}"
            out[label] = np.asarray(v, dtype=float) * conv
        if "time" not in out:
            out["time"] = out["step"] * self.dt_ps
        return out

    def trajectories(self) -> list[Path]:
        """NetCDF position files: the centroid if written, else every bead's."""
        specs = xmlinput.position_trajectories(self.root)
        centroid = [self.folder / f"{self.prefix}.{t.filename}.nc" for t in specs if t.what == "x_centroid"]
        if centroid and centroid[0].is_file():
            return centroid[:1]
        files = []
        for t in specs:
            if t.what == "positions":
                files += sorted(self.folder.glob(f"{self.prefix}.{t.filename}_*.nc"))
        return files

    def extras(self) -> list[tuple[list[str], list[Path]]]:
        """(keys, bead files) of each ``extras`` trajectory output."""
        found = []
        for el in self.root.findall("output/trajectory"):
            if (el.text or "").strip().split("{")[0] != "extras":
                continue
            keys = [k.strip() for k in el.get("extra_type", "raw").split(",")]
            name = el.get("filename", xmlinput.DEFAULT_TRAJECTORY)
            files = sorted(p for p in self.folder.glob(f"{self.prefix}.{name}_*") if re.fullmatch(
                rf"{re.escape(self.prefix)}\.{re.escape(name)}_\d+", p.name))
            found.append((keys, files))
        return found


def _target_temperature(root: ET.Element) -> float | None:
    from ipi.utils.units import unit_to_internal, unit_to_user

    el = root.find("system/ensemble/temperature")
    if el is None or not (el.text or "").strip():
        return None
    return float(unit_to_user("temperature", "kelvin",
                              unit_to_internal("temperature", el.get("units", "atomic_unit"), float(el.text))))


def _count_atoms(path: Path) -> int:
    try:
        with open(path) as fh:
            return int(fh.readline())
    except (OSError, ValueError):
        return 0


def read_extras(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """An i-PI extras trajectory with a numeric ``extra_type``: (steps (F,), rows (F, width))."""
    steps, rows, cur = [], [], None
    with open(path) as fh:
        for line in fh:
            m = re.match(r"\s*#EXTRAS[^#]*#\s*Step:\s*(\d+)", line)
            if m:
                if cur is not None:
                    rows.append(cur)
                steps.append(int(m.group(1)))
                cur = []
            elif line.strip() and cur is not None:
                cur += [float(x) for x in line.split()]
    if cur:
        rows.append(cur)
    width = min((len(r) for r in rows), default=0)
    n = min(len(steps), len(rows))
    return np.asarray(steps[:n]), np.array([r[:width] for r in rows[:n]], dtype=float).reshape(n, width)


# ------------------------------------------------------------------------------------------------- figures
def _figure(nrows: int, height: float = 2.4):
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 11, "axes.grid": True, "grid.alpha": 0.3, "legend.fontsize": 9})
    fig, axes = plt.subplots(nrows, 1, figsize=(8, 0.8 + height * nrows), sharex=True, squeeze=False)
    return fig, axes[:, 0]


def _save(fig, path: Path, s: Summary) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    s.figures.append(path)


def drift(t_ps: np.ndarray, e: np.ndarray) -> tuple[float, float]:
    """Least-squares slope (kJ/mol/ps) and intercept of the conserved energy."""
    slope, icpt = np.polyfit(t_ps, e, 1)
    return float(slope), float(icpt)


def _energy_plot(out: Path, p: dict, keep: np.ndarray, run: _Run, s: Summary) -> None:
    t = p["time"]
    panels = [(k, f"{k.removeprefix('pot_').upper()} potential") for k in p if k.startswith("pot_")]
    if not panels and "potential" in p:
        panels = [("potential", "potential")]
    for k in ("kinetic_md", "conserved"):
        if k in p:
            panels.append((k, {"kinetic_md": "kinetic energy", "conserved": "conserved energy"}[k]))
    if not panels:
        s.skip("energy.png", "no energy columns (potential, pot_component_raw, kinetic_md, conserved) in the "
                             "properties output")
        return
    fig, axes = _figure(len(panels))
    for ax, (k, title) in zip(axes, panels):
        ax.plot(t, p[k], lw=1.0, label=title)
        ax.set_ylabel(f"{title.replace(' energy', '')}\n(kJ/mol)")
        s.add(f"mean {title}", float(p[k][keep].mean()), "kJ/mol")
        if k == "conserved" and keep.sum() >= 2:
            slope, icpt = drift(t[keep], p[k][keep])
            ax.plot(t[keep], slope * t[keep] + icpt, "k--", lw=1.0,
                    label=f"fit: drift {slope:.3g} kJ/mol/ps")
            s.add("conserved-energy drift", slope, "kJ/mol/ps")
            if run.natoms:
                s.add("conserved-energy drift per atom", slope / run.natoms, "kJ/mol/ps/atom")
            s.add("conserved-energy fluctuation (std)", float(np.std(p[k][keep])), "kJ/mol")
        ax.legend(loc="best")
    axes[-1].set_xlabel("time (ps)")
    axes[0].set_title("energies")
    _save(fig, out / "energy.png", s)


def _temperature_plot(out: Path, p: dict, keep: np.ndarray, run: _Run, s: Summary) -> None:
    if "temperature" not in p:
        s.skip("temperature.png", "no temperature column in the properties output")
        return
    t, T = p["time"], p["temperature"]
    s.add("mean temperature", float(T[keep].mean()), "K")
    s.add("temperature std", float(T[keep].std()), "K")
    if run.target_K is not None:
        s.add("target temperature", run.target_K, "K")
    fig, (ax,) = _figure(1, 3.5)
    ax.plot(t, T, lw=0.8, alpha=0.7, label="instantaneous")
    ax.plot(t, np.cumsum(T) / np.arange(1, len(T) + 1), lw=1.5, label="running mean")
    if run.target_K is not None:
        ax.axhline(run.target_K, color="k", ls="--", lw=1.0, label=f"target {run.target_K:g} K")
    ax.set_xlabel("time (ps)")
    ax.set_ylabel("temperature (K)")
    ax.legend(loc="best")
    _save(fig, out / "temperature.png", s)


def _quantum_kinetic_plot(out: Path, p: dict, keep: np.ndarray, run: _Run, s: Summary) -> None:
    from scipy.constants import R

    if "kinetic_cv" not in p:
        s.skip("quantum_kinetic.png", "no kinetic_cv column (a classical run, or the PIMD input did not print "
                                      "kinetic_cv{kiloj/mol})")
        return
    t, k = p["time"], p["kinetic_cv"]
    s.add("mean centroid-virial kinetic energy", float(k[keep].mean()), "kJ/mol")
    fig, (ax,) = _figure(1, 3.5)
    ax.plot(t, k, lw=0.8, label=f"kinetic_cv ({run.nbeads} bead{'s' * (run.nbeads > 1)})")
    ax.axhline(k[keep].mean(), color="C1", lw=1.2, label=f"mean {k[keep].mean():.4g} kJ/mol")
    if run.target_K is not None and run.natoms:
        classical = 1.5 * run.natoms * R * 1e-3 * run.target_K
        s.add("classical kinetic energy 3/2 N k_B T", classical, "kJ/mol")
        ax.axhline(classical, color="k", ls="--", lw=1.0, label=f"classical 3/2 N k_B T = {classical:.4g} kJ/mol")
    ax.set_xlabel("time (ps)")
    ax.set_ylabel("kinetic energy (kJ/mol)")
    ax.set_title("quantum kinetic energy (centroid-virial estimator)")
    ax.legend(loc="best")
    _save(fig, out / "quantum_kinetic.png", s)


def _extras_plot(out: Path, run: _Run, skip_ps: float, s: Summary) -> None:
    hint = ("add <trajectory filename='xtr' stride='10' extra_type='ml.charges,ml.dipole'> extras </trajectory> "
            "to the <output> of the input XML")
    outputs = [(k, f) for k, f in run.extras() if {"ml.charges", "ml.dipole"} & set(k)]
    if not outputs:
        s.skip("ml_charges.png", f"the run wrote no ML extras; {hint}")
        return
    keys, files = outputs[0]
    if not files:
        s.skip("ml_charges.png", f"the input asks for extras ({','.join(keys)}) but no file was written")
        return
    unknown = [k for k in keys if k not in EXTRA_WIDTHS and k != "ml.charges"]
    if unknown:
        s.skip("ml_charges.png", f"extra_type '{','.join(keys)}' has keys of unknown width ({unknown}); {hint}")
        return
    per_bead = [read_extras(f) for f in files]
    n = min(len(st) for st, _ in per_bead)
    if n == 0:
        s.skip("ml_charges.png", f"{files[0].name} holds no frames")
        return
    steps = per_bead[0][0][:n]
    rows = np.mean([r[:n] for _, r in per_bead], axis=0)          # bead average (the centroid's view)
    width = rows.shape[1]
    n_charges = width - sum(EXTRA_WIDTHS[k] for k in keys if k != "ml.charges")
    cols, start = {}, 0
    for k in keys:
        w = n_charges if k == "ml.charges" else EXTRA_WIDTHS[k]
        cols[k] = rows[:, start:start + w]
        start += w
    t = steps * run.dt_ps
    keep = t >= skip_ps
    panels = [k for k in ("ml.charges", "ml.dipole") if k in cols]
    fig, axes = _figure(len(panels), 3.0)
    for ax, k in zip(axes, panels):
        if k == "ml.charges":
            q = cols[k]
            for j in range(q.shape[1]):
                ax.plot(t, q[:, j], lw=0.9, label=f"ML atom {j}" if q.shape[1] <= 12 else None)
            ax.set_ylabel("charge (e)")
            ax.set_title(f"ML-zone atomic charges (total {round(float(q[0].sum()), 3) + 0.0:+.3f} e)")
            if q.shape[1] <= 12:
                ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5))
            s.add("ML charges: largest std over time", float(q[keep].std(axis=0).max()), "e")
        else:
            mu = cols[k]
            for j, c in enumerate("xyz"):
                ax.plot(t, mu[:, j], lw=0.9, label=f"μ_{c}")
            norm = np.linalg.norm(mu, axis=1)
            ax.plot(t, norm, "k", lw=1.2, label="|μ|")
            ax.set_ylabel("dipole (e·Å)")
            ax.set_title("ML-zone dipole (about its centroid)")
            ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5))
            s.add("mean ML dipole |mu|", float(norm[keep].mean()), "e·Å")
    axes[-1].set_xlabel("time (ps)")
    if len(files) > 1:
        s.notes.append(f"ML extras averaged over {len(files)} beads")
    _save(fig, out / "ml_charges.png", s)


def _uncertainty_plot(out: Path, run: _Run, skip_ps: float, s: Summary) -> None:
    """The committee's energy and force spread (``ml.uncertainty``: kJ/mol, kJ/mol/nm), largest over beads, with
    the run's ``--max-force-uncertainty`` (run.json) as a line."""
    outputs = [(k, f) for k, f in run.extras() if "ml.uncertainty" in k and f]
    if not outputs:
        s.skip("uncertainty.png", "the run wrote no ml.uncertainty extras (committee models: add <trajectory "
                                  "filename='unc' stride='10' extra_type='ml.uncertainty'> extras </trajectory>)")
        return
    keys, files = outputs[0]
    if any(k not in EXTRA_WIDTHS for k in keys):
        s.skip("uncertainty.png", f"extra_type '{','.join(keys)}': give ml.uncertainty in a trajectory of its own")
        return
    start = sum(EXTRA_WIDTHS[k] for k in keys[:keys.index("ml.uncertainty")])
    per_bead = [read_extras(f) for f in files]
    n = min(len(st) for st, _ in per_bead)
    if n == 0:
        s.skip("uncertainty.png", f"{files[0].name} holds no frames")
        return
    rows = np.max([r[:n, start:start + 2] for _, r in per_bead], axis=0)
    t = per_bead[0][0][:n] * run.dt_ps
    keep = t >= skip_ps if (t >= skip_ps).any() else np.ones(n, bool)
    info = run.folder / "run.json"
    limit = (json.loads(info.read_text()).get("model_options") or {}).get("max_force_uncertainty") \
        if info.is_file() else None
    fig, axes = _figure(2)
    for ax, col, label in zip(axes, (0, 1), ("energy spread (kJ/mol)", "largest force spread (kJ/mol/nm)")):
        ax.plot(t, rows[:, col], lw=1.0)
        ax.set_ylabel(label)
    if limit:
        axes[1].axhline(float(limit), color="r", ls="--", lw=1.0, label=f"--max-force-uncertainty {limit:g}")
        axes[1].legend(loc="best")
    axes[0].set_title("committee spread (ml.uncertainty" + (f", largest of {len(files)} beads)" if len(files) > 1
                                                            else ")"))
    axes[-1].set_xlabel("time (ps)")
    s.add("mean committee energy spread", float(rows[keep, 0].mean()), "kJ/mol")
    s.add("largest committee force spread", float(rows[keep, 1].max()), "kJ/mol/nm")
    _save(fig, out / "uncertainty.png", s)


def _rdf_plot(out: Path, run: _Run, system, skip_ps: float, s: Summary) -> None:
    files = [f for f in run.trajectories() if f.is_file()]
    if not files:
        s.skip("rdf.png", "no NetCDF position trajectory in the run folder (a <trajectory> of positions in "
                          "format xyz or ase is converted by `mlmm run`)")
        return
    if system is None:
        s.skip("rdf.png", "which atoms are water and ML zone comes from the system file: pass --system "
                          "path/to/system.toml")
        return
    from potentials.core.spec import SystemSpec
    from potentials.openmm_system import read_structure

    spec = SystemSpec.load(system)
    topology, _ = read_structure(spec.structure_path)
    if topology.getNumAtoms() != run.natoms and run.natoms:
        raise SetupError(f"{system} has {topology.getNumAtoms()} atoms, the run {run.natoms}: not this run's system")
    ml = set(int(i) for i in spec.ml.indices)
    atoms = list(topology.atoms())
    ref = [i for i in sorted(ml) if atoms[i].element.symbol != "H"] or sorted(ml)
    water_o = [a.index for a in atoms if a.residue.name.upper() in WATER_NAMES and a.element is not None
               and a.element.symbol == "O" and a.index not in ml]
    if not ref or not water_o:
        s.skip("rdf.png", "no ML zone" if not ref else "no water oxygens outside the ML zone")
        return
    r_edges, hist, n_frames, rho = _rdf_histogram(files, topology, ref, water_o, skip_ps, spec.structure.periodic)
    if n_frames == 0:
        s.skip("rdf.png", f"no trajectory frame after {skip_ps:g} ps")
        return
    shell = 4.0 / 3.0 * np.pi * (r_edges[1:] ** 3 - r_edges[:-1] ** 3)
    g = hist / (n_frames * len(ref) * rho * shell)
    r = 0.5 * (r_edges[1:] + r_edges[:-1])
    smooth = np.convolve(g, np.ones(5) / 5, mode="same")        # the highest peak, not the noisiest bin
    top = int(np.argmax(smooth))
    s.add("RDF frames", n_frames)
    s.add("RDF highest peak (water O around the ML zone)", float(r[top]), "nm")
    s.add("RDF highest peak height (5-bin mean)", float(smooth[top]))
    fig, (ax,) = _figure(1, 3.5)
    ax.plot(r, g, lw=1.5)
    ax.axhline(1.0, color="k", ls=":", lw=1.0)
    ax.set_xlabel("r (nm)")
    ax.set_ylabel("g(r) (dimensionless)")
    ax.set_title(f"water O around {len(ref)} ML {'heavy ' if len(ref) < len(ml) else ''}atoms "
                 f"({n_frames} frames{'' if spec.structure.periodic else ', bulk-density reference'})")
    _save(fig, out / "rdf.png", s)


def _rdf_histogram(files: list[Path], topology, ref: list[int], targets: list[int], skip_ps: float,
                   periodic: bool) -> tuple[np.ndarray, np.ndarray, int, float]:
    """Pair-distance histogram over all frames at t >= skip_ps: (edges nm, counts, frames, density nm^-3).

    Periodic: minimum-image distances (MDTraj, triclinic too), r up to half the shortest box height, density
    = targets / box volume. Clusters: r up to RDF_MAX_CLUSTER_NM, bulk-water density as reference.
    """
    import mdtraj

    top = mdtraj.Topology.from_openmm(topology)
    pairs = np.array([(i, j) for i in ref for j in targets], dtype=np.int64)
    chunk = max(1, MAX_PAIR_VALUES // len(pairs))
    hist, edges, frames, inv_vol, r_max = None, None, 0, [], None
    for f in files:
        for tr in mdtraj.iterload(str(f), top=top, chunk=chunk):
            tr = tr[tr.time >= skip_ps - 1e-9]
            if tr.n_frames == 0:
                continue
            if r_max is None:
                if periodic and tr.unitcell_vectors is not None:
                    v = tr.unitcell_vectors[0]
                    heights = abs(np.linalg.det(v)) / np.linalg.norm(np.cross(v[[1, 2, 0]], v[[2, 0, 1]]), axis=1)
                    r_max = 0.5 * heights.min()
                else:
                    r_max = RDF_MAX_CLUSTER_NM
                edges = np.arange(0.0, r_max + 1e-9, RDF_BIN_NM)
                hist = np.zeros(len(edges) - 1)
            d = mdtraj.compute_distances(tr, pairs, periodic=periodic)
            hist += np.histogram(d.ravel(), bins=edges)[0]
            frames += tr.n_frames
            if periodic and tr.unitcell_volumes is not None:
                inv_vol += list(1.0 / tr.unitcell_volumes)
    rho = len(targets) * float(np.mean(inv_vol)) if inv_vol else BULK_WATER_O_PER_NM3
    return edges, hist, frames, rho


# ------------------------------------------------------------------------------------------------- speed
def _speed(run: _Run, s: Summary) -> None:
    """ns/day from i-PI's "Average timings at MD step" lines (each averages the steps since the previous one;
    the step-0 line holds the first, slow step and is left out)."""
    log_file = run.folder / "ipi.log"
    if not log_file.is_file() or not run.dt_ps:
        s.notes.append("speed not known: no ipi.log or no time step in input.xml")
        return
    marks = [(int(m.group(1)), float(m.group(2))) for m in re.finditer(
        r"Average timings at MD step\s+(\d+)\. t/step:\s*([0-9.eE+-]+)", log_file.read_text(errors="replace"))]
    steps, times = [], []
    for (s0, _), (s1, t1) in zip(marks, marks[1:]):
        if s1 > s0:
            steps.append(s1 - s0)
            times.append(t1)
    if steps:
        sec_per_step = float(np.average(times, weights=steps))
        s.add("wall time per step", sec_per_step * 1e3, "ms")
        s.add("speed", run.dt_ps * 1e-3 * 86400.0 / sec_per_step, "ns/day")
        return
    # a short run (i-PI times every 100 steps at verbosity medium): the files' clock, start-up included
    props = run.folder / (xmlinput.properties_file(run.root) or "")
    start = run.folder / "input.xml"
    if props.is_file() and start.is_file():
        wall = props.stat().st_mtime - start.stat().st_mtime
        values, _ = trajectory.read_properties(props)
        n = float(values["step"][-1]) if len(values.get("step", [])) else 0.0
        if wall > 0 and n > 0:
            s.add("speed", n * run.dt_ps * 1e-3 * 86400.0 / wall, "ns/day (from file times, start-up included)")
            return
    s.notes.append("speed not known: ipi.log has no timing lines after step 0")

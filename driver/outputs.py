"""The run folder's outputs after (and between) i-PI processes: cut i-PI's text outputs back to a RESTART's step,
convert trajectories to AMBER NetCDF and the properties to CSV, and save the last good frame of a stopped run.

i-PI appends to its outputs when it continues from RESTART, whose step lags the last written one by up to
``safe_stride``; :func:`trim_outputs` first cuts the properties, trajectories and extras back to that step, so
each step appears once, and :func:`trim_converted` does the same to the NetCDF files and ``properties.csv``.
Conversion appends what is new to them; all of it reads the files from their ends (:mod:`driver.tails`), so
continuing a run costs what the continuation adds, not what the run already wrote.
"""
from __future__ import annotations

import logging
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from . import tails, trajectory, xmlinput
from potentials.core.errors import SetupError
from potentials.core.spec import SystemSpec

log = logging.getLogger(__name__)

PROPERTIES_CSV = "properties.csv"
LAST_GOOD = "last_good.pdb"


def trim_outputs(folder: Path, root: ET.Element, step: int) -> None:
    """Cut i-PI's text outputs in ``folder`` (properties, trajectories, extras; as listed in ``root``'s
    ``<output>``) back to ``step``, the step of the RESTART a run is resumed from: i-PI appends to them."""
    prefix = xmlinput.output_prefix(root)
    for el in root.findall("output/properties"):
        f = folder / f"{prefix}.{el.get('filename', xmlinput.DEFAULT_PROPERTIES)}"
        if f.is_file():
            tails.trim_properties(f, step)
    for el in root.findall("output/trajectory"):
        name = re.escape(f"{prefix}.{el.get('filename', xmlinput.DEFAULT_TRAJECTORY)}")
        pattern = re.compile(rf"{name}(_\d+)?(\.[A-Za-z]+)?")
        for f in sorted(folder.iterdir()):
            if pattern.fullmatch(f.name) and f.suffix != ".nc" and f.is_file():
                tails.trim_trajectory(f, step)


def trim_converted(folder: Path, root: ET.Element, step: int) -> None:
    """Cut the NetCDF trajectories and ``properties.csv`` in ``folder`` back to ``step`` (a continued run redoes
    the steps after it and appends them)."""
    dt = _timestep(root)
    for _, dst in _netcdf_pairs(folder, root):
        if not dst.is_file():
            continue
        try:
            n, later = trajectory.netcdf_times_after(dst, step * dt + _tolerance(step * dt, dt))
            if later:
                trajectory.netcdf_truncate(dst, n - later)
                log.info("%s: removed %d frame(s) after step %d (redone by the resumed run)", dst.name, later, step)
        except (OSError, ValueError, RuntimeError, KeyError) as exc:
            log.warning("%s cannot be cut back (%s): it will be written anew", dst, exc)
            dst.unlink()
    csv = folder / PROPERTIES_CSV
    if csv.is_file():
        tails.trim_csv(csv, step)


def _timestep(root: ET.Element) -> float:
    dt = xmlinput.timestep_ps(root)
    if not dt:
        log.warning("no <timestep> in the input: NetCDF time is the step number")
        dt = 1.0
    return dt


def _tolerance(t_ps: float, dt: float) -> float:
    """Times are float32 in the NetCDF files: at 10 ns their spacing is already ~2 time steps of 0.5 fs."""
    return max(0.5 * dt, 2.0 * float(np.spacing(np.float32(t_ps))))


def _netcdf_pairs(folder: Path, root: ET.Element) -> list[tuple[Path, Path]]:
    """(i-PI position trajectory in xyz/ase format, its NetCDF file) of the run in ``folder``."""
    prefix = xmlinput.output_prefix(root)
    pairs = []
    for t in xmlinput.position_trajectories(root):
        if t.format not in ("xyz", "ase"):
            log.info("trajectory '%s' is in format '%s': not converted to NetCDF", t.filename, t.format)
            continue
        ext = "extxyz" if t.format == "ase" else "xyz"
        pattern = f"{prefix}.{t.filename}_*.{ext}" if t.what == "positions" else f"{prefix}.{t.filename}.{ext}"
        pairs += [(src, src.with_suffix(".nc")) for src in sorted(folder.glob(pattern))]
    return pairs


def convert_trajectories(folder: Path, root: ET.Element, periodic: bool) -> list[Path]:
    """AMBER NetCDF next to each i-PI position trajectory in xyz/ase format (``sim.pos_0.xyz`` ->
    ``sim.pos_0.nc``); an existing NetCDF file (a continued run) gets only the frames after its last one."""
    dt = _timestep(root)
    made = []
    for src, dst in _netcdf_pairs(folder, root):
        n = None
        if dst.is_file():
            try:
                t_last = _last_time(dst)
                if t_last is not None:
                    start = tails.frame_offset(src, int(np.floor((t_last + _tolerance(t_last, dt)) / dt)))
                    n = trajectory.ipi_to_netcdf(src, dst, timestep_ps=dt, periodic=periodic, append=True,
                                                 start=start)
                    log.info("appended %d frames to %s", n, dst.name)
            except (OSError, ValueError, RuntimeError, KeyError, SetupError) as exc:
                log.warning("%s cannot be appended to (%s): writing it anew", dst, exc)
        if n is None:
            n = trajectory.ipi_to_netcdf(src, dst, timestep_ps=dt, periodic=periodic)
            log.info("wrote %s (%d frames)", dst.name, n)
        made.append(dst)
    return made


def _last_time(path: Path) -> float | None:
    """Time (ps) of the last frame of a NetCDF trajectory, None if it has none."""
    import netCDF4

    with netCDF4.Dataset(path) as ds:
        time = ds.variables["time"]
        return float(time[len(time) - 1]) if len(time) else None


def convert_outputs(folder: Path, root: ET.Element, periodic: bool,
                    components: list[str]) -> tuple[list[Path], Path | None]:
    """The NetCDF trajectories (:func:`convert_trajectories`) and ``properties.csv`` (i-PI's properties with plain
    column names; ``components``: the forcefield of each ``pot_component_raw(i)``) of the run in ``folder``, both
    appended to if they exist (a continued run). Returns (NetCDF files, the CSV or None if i-PI wrote no
    properties). Raises OSError, ValueError or RuntimeError when a file cannot be converted."""
    made = convert_trajectories(folder, root, periodic)
    props = xmlinput.properties_file(root)
    if not (props and (folder / props).is_file()):
        return made, None
    csv = folder / PROPERTIES_CSV
    last = tails.last_csv_step(csv) if csv.is_file() else None
    if last is not None:
        try:
            trajectory.write_properties_csv(folder / props, csv, components,
                                            rows=tails.properties_rows_after(folder / props, last))
            return made, csv
        except ValueError as exc:
            log.warning("%s cannot be appended to (%s): writing it anew", csv, exc)
    trajectory.write_properties_csv(folder / props, csv, components)
    return made, csv


def save_last_good(folder: Path, spec: SystemSpec) -> tuple[Path, int] | None:
    """Write the state of i-PI's RESTART (the last step whose forces were all accepted; the centroid for a ring
    polymer) as ``last_good.pdb`` in ``folder`` with the system's topology. Returns (path, step), or None if
    there is no usable RESTART (nothing is written then)."""
    from openmm import app, unit

    try:
        q = xmlinput.restart_centroid_nm(folder / "RESTART")
        top = app.PDBFile(str(spec.structure_path)).topology
        step = xmlinput.restart_step(folder / "RESTART")
    except (OSError, ET.ParseError, AttributeError, TypeError, ValueError) as exc:
        log.warning("could not save the last good frame from %s: %s", folder / "RESTART", exc)
        return None
    if len(q) != top.getNumAtoms() or not np.isfinite(q).all():
        return None
    out = folder / LAST_GOOD
    with open(out, "w") as fh:
        app.PDBFile.writeFile(top, q * unit.nanometer, fh)
    return out, step if step is not None else 0          # i-PI writes no <step> before the first one

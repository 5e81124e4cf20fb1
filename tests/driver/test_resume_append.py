"""A resume appends to the outputs instead of rewriting them (issue 20): the NetCDF trajectory and properties.csv
are cut back to the restart step and extended, and the cost does not grow with the run already written."""
from __future__ import annotations

import csv
import os
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

from driver import launch, outputs, tails, trajectory

REPO = Path(__file__).resolve().parents[2]
TEMPLATES = REPO / "inputs" / "templates"

pytestmark = pytest.mark.timeout(240)

ROOT = ("<simulation><output prefix='sim'><properties filename='out' stride='1'> [ step, time{picosecond} ] "
        "</properties><trajectory filename='pos' stride='1' format='xyz'> positions{angstrom} </trajectory>"
        "</output><system><motion><dynamics><timestep units='femtosecond'> 0.5 </timestep></dynamics></motion>"
        "</system></simulation>")
HEADER = ("# column   1     --> step : The current simulation time step.\n"
          "# column   2     --> time{picosecond} : The elapsed simulation time.\n")


def _row(s: int) -> str:
    return f"{s:16.8e} {s * 5e-4:16.8e}\n"


def _frame(s: int) -> str:
    return (f"3\n# CELL(abcABC):   20.00000    20.00000    20.00000    90.00000    90.00000    90.00000  Step: {s:10d}"
            f"  Bead:       0 positions{{angstrom}} cell{{angstrom}}\n"
            f"       O  {1e-3 * s:12.5e}  0.00000e+00  0.00000e+00\n       H  9.00000e-01  {1e-3 * s:12.5e}  "
            f"0.00000e+00\n       H  0.00000e+00  9.00000e-01  {1e-3 * s:12.5e}\n")


def _history(folder: Path, n: int) -> None:
    """A run folder as a stopped run leaves it: i-PI's outputs up to step n, the NetCDF and CSV converted (written
    in bulk here: converting a long history is the cost a resume must not pay again)."""
    import netCDF4

    folder.mkdir()
    (folder / "sim.out").write_text(HEADER + "".join(_row(s) for s in range(n + 1)))
    (folder / "sim.pos_0.xyz").write_text("".join(_frame(s) for s in range(n + 1)))
    with open(folder / "properties.csv", "w") as fh:
        fh.write("step,time_ps\n" + "".join(f"{s},{s * 5e-4:.10g}\n" for s in range(n + 1)))
    steps = np.arange(n + 1)
    with trajectory.AmberNetCDFWriter(folder / "sim.pos_0.nc", 3, periodic=False):
        pass
    with netCDF4.Dataset(folder / "sim.pos_0.nc", "a") as ds:
        x = np.zeros((n + 1, 3, 3))
        x[:, 0, 0], x[:, 1, 0], x[:, 1, 1], x[:, 2, 1], x[:, 2, 2] = 1e-3 * steps, 0.9, 1e-3 * steps, 0.9, 1e-3 * steps
        ds["coordinates"][0:n + 1] = x
        ds["time"][0:n + 1] = steps * 5e-4


def _resume(folder: Path, restart: int, new_until: int) -> float:
    """What a resume does to the outputs: cut back to ``restart``, (i-PI appends steps restart+1..new_until), and
    convert; returns the seconds the output handling took."""
    root = ET.fromstring(ROOT)
    t0 = time.perf_counter()
    outputs.trim_outputs(folder, root, restart)
    outputs.trim_converted(folder, root, restart)
    t_trim = time.perf_counter() - t0
    with open(folder / "sim.out", "a") as fh:
        fh.write("".join(_row(s) for s in range(restart + 1, new_until + 1)))
    with open(folder / "sim.pos_0.xyz", "a") as fh:
        fh.write("".join(_frame(s) for s in range(restart + 1, new_until + 1)))
    t0 = time.perf_counter()
    outputs.convert_outputs(folder, root, periodic=False, components=[])
    return t_trim + time.perf_counter() - t0


def test_resume_cost_does_not_grow_with_the_run(tmp_path):
    """Cutting back and converting after a resume: the same cost after 200 steps and after 100 000 (the old
    full rewrite took seconds for the long run); the outputs hold every step once, the NetCDF file and the CSV
    were extended in place."""
    times = {}
    for n in (200, 100_000):
        folder = tmp_path / f"run{n}"
        _history(folder, n)
        inode = {f: (folder / f).stat().st_ino for f in ("sim.pos_0.nc", "properties.csv")}
        times[n] = _resume(folder, n - 7, n + 20)
        assert {f: (folder / f).stat().st_ino for f in inode} == inode            # appended, not replaced
        rows = list(csv.reader((folder / "properties.csv").open()))
        np.testing.assert_array_equal([int(r[0]) for r in rows[1:]], np.arange(n + 21))
        n_frames, later = trajectory.netcdf_times_after(folder / "sim.pos_0.nc", (n - 7.5) * 5e-4)
        assert n_frames == n + 21 and later == 28
        import netCDF4

        with netCDF4.Dataset(folder / "sim.pos_0.nc") as ds:
            t = np.asarray(ds["time"][n - 10:])
            x = np.asarray(ds["coordinates"][n - 10:])
        np.testing.assert_allclose(t, np.arange(n - 10, n + 21) * 5e-4, rtol=1e-6)
        np.testing.assert_allclose(x[:, 0, 0], 1e-3 * np.arange(n - 10, n + 21), rtol=1e-5)
    assert times[100_000] < 3 * times[200] + 0.3, times


def test_tails_cut_and_find(tmp_path):
    """The backward readers agree with a forward reading on a file longer than their block: cut points, the
    frame to start reading from, the rows after a step; a half-written row or frame is cut."""
    tails_block = tails.BLOCK
    tails.BLOCK = 512                                              # many blocks on a small file
    try:
        xyz = tmp_path / "t.xyz"
        xyz.write_text("".join(_frame(s) for s in range(0, 400, 2)) + "3\n# CELL(abcABC): 1 1")
        assert tails.frame_offset(xyz, 101) == len("".join(_frame(s) for s in range(0, 100, 2)))
        assert tails.frame_offset(xyz, -1) == 0
        assert tails.trim_trajectory(xyz, 301) == 49 and xyz.read_text() == "".join(_frame(s) for s in range(0, 302, 2))
        props = tmp_path / "sim.out"
        props.write_text(HEADER + "".join(_row(s) for s in range(300)) + "  301 0.1")
        assert tails.properties_rows_after(props, 290) == [_row(s).encode() for s in range(291, 300)]
        assert tails.trim_properties(props, 250) == 50 and props.read_text() == HEADER + "".join(
            _row(s) for s in range(251))
        assert tails.trim_properties(props, 250) == 0
        c = tmp_path / "p.csv"
        c.write_text("time_ps,step\n" + "".join(f"{s * 5e-4},{s}\n" for s in range(300)) + "1,30")
        assert tails.last_csv_step(c) == 299
        assert tails.trim_csv(c, 120) == 180 and tails.last_csv_step(c) == 120
    finally:
        tails.BLOCK = tails_block


def test_netcdf_truncate(tmp_path):
    """Cutting an AMBER NetCDF back keeps the first frames exactly, readable by netCDF4 and MDTraj, and it can be
    appended to again."""
    import netCDF4

    path = tmp_path / "a.nc"
    x = np.random.default_rng(1).normal(size=(10, 4, 3))
    for periodic in (True, False):
        trajectory.write_netcdf(path, x, np.full((10, 3), 20.0) if periodic else None,
                                np.full((10, 3), 90.0) if periodic else None, np.arange(10) * 0.1)
        size = path.stat().st_size
        trajectory.netcdf_truncate(path, 6)
        assert path.stat().st_size < size
        with netCDF4.Dataset(path) as ds:
            assert len(ds.dimensions["frame"]) == 6
            np.testing.assert_allclose(ds["coordinates"][:], x[:6], rtol=1e-6)
            np.testing.assert_allclose(ds["time"][:], np.arange(6) * 0.1, rtol=1e-6)
        with trajectory.AmberNetCDFWriter(path, 4, periodic=periodic, append=True) as w:
            w.write_frame(x[9], 0.9, *((np.full(3, 20.0), np.full(3, 90.0)) if periodic else ()))
        with netCDF4.Dataset(path) as ds:
            np.testing.assert_allclose(ds["coordinates"][:], x[[0, 1, 2, 3, 4, 5, 9]], rtol=1e-6)


@pytest.mark.slow
def test_resume_appends_in_place(tmp_path, caplog):
    """A real run stopped at step 40 and resumed to 80: the NetCDF file and properties.csv are the same files,
    extended (their first frames and rows untouched), every step once."""
    import netCDF4
    from potentials.core.spec import MMSpec, StructureSpec, SystemSpec

    from run_helpers import write_water_cluster

    write_water_cluster(tmp_path)
    SystemSpec(StructureSpec(file="water.pdb", forcefield=["amber14/tip3p.xml"], periodic=False),
               mm=MMSpec(nonbonded_method="NoCutoff", rigid_water=False)).save(tmp_path / "system.toml")
    tree = ET.parse(TEMPLATES / "nvt_bussi_mm.xml")
    tree.getroot().set("safe_stride", "10")
    tree.getroot().find("output/properties").set("stride", "2")
    tree.getroot().find("output/trajectory").set("stride", "4")
    tree.write(tmp_path / "nvt.xml")

    out = tmp_path / "run"
    launch.run_simulation(tmp_path / "nvt.xml", tmp_path / "system.toml", out=out, steps=40, seed=3, progress=False)
    nc, table = out / "sim.pos_0.nc", out / "properties.csv"
    inode = (nc.stat().st_ino, table.stat().st_ino)
    with netCDF4.Dataset(nc) as ds:
        first = np.asarray(ds["coordinates"][:])
    rows = table.read_text().splitlines()
    with caplog.at_level("INFO"):
        result = launch.resume_simulation(out, steps=80, progress=False)
    assert result.steps_done == 80 and (nc.stat().st_ino, table.stat().st_ino) == inode
    assert any("appended 10 frames to sim.pos_0.nc" in r.getMessage() for r in caplog.records)
    with netCDF4.Dataset(nc) as ds:
        np.testing.assert_array_equal(np.asarray(ds["coordinates"][:len(first)]), first)
        np.testing.assert_allclose(ds["time"][:], np.arange(0, 81, 4) * 0.5e-3, atol=1e-6)
    new = table.read_text().splitlines()
    assert new[:len(rows)] == rows
    np.testing.assert_array_equal([float(r.split(",")[0]) for r in new[1:]], np.arange(0, 81, 2))

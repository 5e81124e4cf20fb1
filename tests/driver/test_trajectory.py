"""driver/trajectory.py: AMBER NetCDF files that netCDF4 and MDTraj read back exactly, conversion of i-PI
trajectories written by i-PI's own writer, and the properties table."""
from __future__ import annotations

import csv

import numpy as np
import pytest

from driver import trajectory
from potentials.core.errors import SetupError

N_ATOMS = 6


@pytest.fixture
def pdb(tmp_path):
    """Two waters as a PDB topology for MDTraj."""
    path = tmp_path / "top.pdb"
    lines = []
    for i, (name, res) in enumerate([("O", 1), ("H1", 1), ("H2", 1), ("O", 2), ("H1", 2), ("H2", 2)]):
        lines.append(f"HETATM{i + 1:5d}  {name:<3s} HOH A{res:4d}    {0.0:8.3f}{0.0:8.3f}{float(i):8.3f}"
                     f"  1.00  0.00           {name[0]}")
    path.write_text("\n".join(lines) + "\nEND\n")
    return path


def _frames(n, seed=0):
    rng = np.random.default_rng(seed)
    pos = rng.uniform(-5, 15, size=(n, N_ATOMS, 3))
    lengths = np.tile([20.0, 21.0, 22.0], (n, 1)) + rng.uniform(0, 0.1, (n, 3))
    angles = np.tile([90.0, 80.0, 70.0], (n, 1))
    return pos, lengths, angles, np.arange(n) * 0.05


def test_write_netcdf_amber_convention(tmp_path, pdb):
    import mdtraj
    import netCDF4

    pos, lengths, angles, t = _frames(4)
    path = tmp_path / "t.nc"
    trajectory.write_netcdf(path, pos, lengths, angles, t)
    assert not list(tmp_path.glob(".*tmp"))                  # the temporary file was renamed
    with netCDF4.Dataset(path) as ds:
        assert ds.data_model == "NETCDF3_64BIT_OFFSET"
        assert ds.Conventions == "AMBER" and ds.ConventionVersion == "1.0"
        assert {d: len(v) for d, v in ds.dimensions.items()} == {
            "frame": 4, "spatial": 3, "atom": N_ATOMS, "cell_spatial": 3, "cell_angular": 3, "label": 5}
        assert ds.dimensions["frame"].isunlimited()
        v = ds.variables
        assert v["coordinates"].dtype == np.float32 and v["coordinates"].units == "angstrom"
        assert v["time"].dtype == np.float32 and v["time"].units == "picosecond"
        assert v["cell_lengths"].dtype == np.float64 and v["cell_angles"].units == "degree"
        assert b"".join(v["spatial"][:]) == b"xyz"
        assert [b"".join(r).decode().strip() for r in v["cell_angular"][:]] == ["alpha", "beta", "gamma"]
        np.testing.assert_allclose(v["coordinates"][:], pos, rtol=1e-6)
    traj = mdtraj.load(str(path), top=str(pdb))
    assert traj.n_frames == 4 and traj.n_atoms == N_ATOMS
    np.testing.assert_allclose(traj.xyz, pos / 10.0, rtol=1e-6, atol=1e-6)        # MDTraj works in nm
    np.testing.assert_allclose(traj.unitcell_lengths, lengths / 10.0, rtol=1e-6)
    np.testing.assert_allclose(traj.unitcell_angles, angles, rtol=1e-6)
    np.testing.assert_allclose(traj.time, t, atol=1e-6)


def test_nonperiodic_has_no_cell(tmp_path, pdb):
    import mdtraj

    pos, _, _, t = _frames(3)
    path = tmp_path / "c.nc"
    trajectory.write_netcdf(path, pos, None, None, t)
    traj = mdtraj.load(str(path), top=str(pdb))
    assert traj.unitcell_lengths is None and traj.n_frames == 3


def test_appending_writer(tmp_path, pdb):
    import mdtraj

    pos, lengths, angles, t = _frames(5)
    path = tmp_path / "a.nc"
    with trajectory.AmberNetCDFWriter(path, N_ATOMS) as w:
        for i in range(3):
            w.write_frame(pos[i], t[i], lengths[i], angles[i])
        # synced per frame: another reader sees the frames while the file is still open
        assert mdtraj.load(str(path), top=str(pdb)).n_frames == 3
    with trajectory.AmberNetCDFWriter(path, N_ATOMS, append=True) as w:
        assert len(w) == 3 and w.last_time == pytest.approx(t[2])
        for i in range(3, 5):
            w.write_frame(pos[i], t[i], lengths[i], angles[i])
    traj = mdtraj.load(str(path), top=str(pdb))
    np.testing.assert_allclose(traj.xyz, pos / 10.0, rtol=1e-6, atol=1e-6)
    with pytest.raises(SetupError, match="has 6 atoms"):
        trajectory.AmberNetCDFWriter(path, N_ATOMS + 1, append=True)
    with pytest.raises(SetupError, match="periodic"):
        trajectory.AmberNetCDFWriter(path, N_ATOMS, periodic=False, append=True)
    with trajectory.AmberNetCDFWriter(path, N_ATOMS, append=True) as w:
        with pytest.raises(ValueError, match="cell_lengths"):
            w.write_frame(pos[0], 1.0)
        with pytest.raises(ValueError, match="non-finite"):
            w.write_frame(pos[0] * np.nan, 1.0, lengths[0], angles[0])


def _ipi_trajectory(path, pos_ang, h_ang, steps, mode="xyz"):
    """Write frames with i-PI's own writer (positions in Å, cell vectors as columns of h in Å)."""
    from ipi.engine.atoms import Atoms
    from ipi.engine.cell import Cell
    from ipi.utils.io import print_file
    from ipi.utils.units import unit_to_internal

    with open(path, "w") as fh:
        for step, x in zip(steps, pos_ang):
            atoms = Atoms(len(x))
            atoms.q[:] = unit_to_internal("length", "angstrom", x.ravel())
            atoms.names[:] = ["O", "H", "H"] * (len(x) // 3)
            cell = Cell(unit_to_internal("length", "angstrom", h_ang))
            if mode == "xyz":
                print_file("xyz", atoms, cell, fh, title=f"Step: {step:10d}  Bead: 0 ", key="positions",
                           units="angstrom", cell_units="angstrom")
            else:
                print_file("ase", atoms, cell, fh, title=f"Step: {step:10d}  Bead: 0 ", key="positions")


@pytest.mark.parametrize("mode", ["xyz", "ase"])
def test_ipi_to_netcdf(tmp_path, pdb, mode):
    import mdtraj
    from ase.geometry import cellpar_to_cell

    pos = _frames(3)[0]
    cellpar = [20.0, 21.0, 22.0, 90.0, 80.0, 70.0]
    h = cellpar_to_cell(cellpar).T                       # i-PI: vectors as columns, upper triangular
    src = tmp_path / ("sim.pos_0.xyz" if mode == "xyz" else "sim.pos_0.extxyz")
    _ipi_trajectory(src, pos, h, [0, 20, 40], mode)
    dst = tmp_path / "sim.pos_0.nc"
    assert trajectory.ipi_to_netcdf(src, dst, timestep_ps=5e-4, periodic=True) == 3
    traj = mdtraj.load(str(dst), top=str(pdb))
    tol = 2e-4 if mode == "xyz" else 1e-5                # i-PI's xyz writes 6 significant digits
    np.testing.assert_allclose(traj.xyz * 10.0, pos, rtol=tol, atol=tol)
    np.testing.assert_allclose(traj.unitcell_lengths[0] * 10.0, cellpar[:3], rtol=1e-5)
    np.testing.assert_allclose(traj.unitcell_angles[0], cellpar[3:], rtol=1e-5)
    np.testing.assert_allclose(traj.time, [0.0, 0.01, 0.02], atol=1e-7)

    # a crash mid-write leaves a truncated last frame: the complete frames still convert
    text = src.read_text().splitlines(keepends=True)
    src.write_text("".join(text[:-2]))
    assert trajectory.ipi_to_netcdf(src, dst, timestep_ps=5e-4, periodic=True) == 2
    # a resumed run appends only the frames after the last one stored (time is float32 in the file)
    _ipi_trajectory(src, pos, h, [20, 40, 60], mode)
    assert trajectory.ipi_to_netcdf(src, dst, timestep_ps=5e-4, periodic=True, append=True) == 2
    np.testing.assert_allclose(mdtraj.load(str(dst), top=str(pdb)).time, [0.0, 0.01, 0.02, 0.03], atol=1e-7)
    _ipi_trajectory(src, pos, h, [40, 60, 2_000_000_060], mode)         # t = 1e6 ps: float32 spacing 0.06 ps
    assert trajectory.ipi_to_netcdf(src, dst, timestep_ps=5e-4, periodic=True, append=True) == 1
    assert trajectory.ipi_to_netcdf(src, dst, timestep_ps=5e-4, periodic=True, append=True) == 0


PROPS = """# column   1     --> step : The current simulation time step.
# column   2     --> time{picosecond} : The elapsed simulation time.
# column   3     --> conserved{kiloj/mol} : The value of the conserved energy quantity per bead.
# column   4     --> temperature{kelvin} : The current temperature.
# column   5     --> pot_component_raw(0){kiloj/mol} : The contribution to the system potential.
# column   6     --> pot_component_raw(1){kiloj/mol} : The contribution to the system potential.
# cols.  7-9     --> dipole{eang} : a vector
    0.0  0.0   -10.5  300.0  -1.0  -2.0  0.1 0.2 0.3
    10.0  0.005  -10.4  310.0  -1.5  -2.5  0.1 0.2 0.3
    20.0  0.01  -10.6  2"""


def test_properties_table(tmp_path):
    src = tmp_path / "sim.out"
    src.write_text(PROPS)                                # last line still being written: skipped
    values, units = trajectory.read_properties(src)
    np.testing.assert_array_equal(values["step"], [0, 10])
    assert units["conserved"] == "kiloj/mol" and units["pot_component_raw(1)"] == "kiloj/mol"
    assert values["dipole"].shape == (2, 3)
    dst = tmp_path / "properties.csv"
    assert trajectory.write_properties_csv(src, dst, ["mm", "ml"]) == 2
    rows = list(csv.reader(dst.open()))
    assert rows[0] == ["step", "time_ps", "conserved_kjmol", "temperature_K", "pot_mm_kjmol", "pot_ml_kjmol",
                       "dipole_eang_0", "dipole_eang_1", "dipole_eang_2"]
    assert [float(x) for x in rows[2][:6]] == [10.0, 0.005, -10.4, 310.0, -1.5, -2.5]
    assert trajectory.csv_column("pot_component(0)", "electronvolt", ["mm"]) == "pot_mm_weighted_eV"

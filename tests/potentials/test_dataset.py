"""Dataset format: write/read round trip, units, torn-frame recovery, compaction, split by trajectory."""
from __future__ import annotations

from pathlib import Path

import netCDF4
import numpy as np
import pytest

from potentials.core.errors import SetupError
from potentials.dataset import Dataset, DatasetWriter, compact
from potentials.qmmm_reference import LabelConfig, plan

TINY = Path(__file__).resolve().parent.parent / "data" / "tiny_qmmm.nc"


def _frame(i: int, rng: np.random.Generator) -> dict:
    n, m = 3 + i % 3, 6 * i          # frame 0 has no charges (gas phase)
    return dict(frame_id=f"HOH-gas/b{i:03d}/f00/c1", trajectory=f"HOH-gas/b{i // 2:03d}", solute="HOH",
                kind="gas" if m == 0 else "periodic", environment="gas" if m == 0 else "periodic",
                split=["train", "val", "test"][i % 3], total_charge=-1 + i % 3, temperature=300.0 + i,
                displaced=i % 2, block=i // 2, index_in_block=i % 2, energy=-2078.123456789 - i,
                dipole=rng.normal(size=3), quadrupole=rng.normal(size=6), scf_cycles=9 + i, seconds=0.5 * i,
                numbers=rng.integers(1, 9, size=n), positions=rng.normal(size=(n, 3)),
                forces=rng.normal(size=(n, 3)), mm_positions=rng.normal(size=(m, 3)) * 10.0,
                mm_charges=rng.normal(size=m), mm_forces=rng.normal(size=(m, 3)))


def test_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    frames = [_frame(i, rng) for i in range(7)]
    path = tmp_path / "d.nc"
    w = DatasetWriter(path, {"qm_basis": "def2-svp", "seed": 5})
    for f in frames:
        w.append(f)
    assert w.frame_ids() == {f["frame_id"] for f in frames}
    with Dataset.open(path) as ds:
        assert len(ds) == 7
        assert ds.attrs["qm_basis"] == "def2-svp" and int(ds.attrs["seed"]) == 5
        assert ds.units["positions"] == "angstrom" and ds.units["energy"] == "eV"
        assert ds.units["forces"] == ds.units["mm_forces"] == "eV/angstrom"
        assert ds.units["mm_charges"] == "e" and ds.units["dipole"] == "e*angstrom"
        for i, f in enumerate(frames):
            r = ds.frame(i)
            for key in ("numbers", "positions", "forces", "dipole", "quadrupole"):
                np.testing.assert_array_equal(r[key], f[key])
            for key in ("mm_positions", "mm_charges", "mm_forces"):      # stored as float32
                np.testing.assert_array_equal(r[key], np.asarray(f[key], np.float32).reshape(r[key].shape))
            for key in ("frame_id", "trajectory", "solute", "kind", "split"):
                assert r[key] == f[key]
            assert r["energy"] == f["energy"] and r["total_charge"] == f["total_charge"]
        assert ds.solute(3) == "HOH"
        assert list(ds.indices("val")) == [1, 4]
        assert ds.frame(-1)["frame_id"] == frames[-1]["frame_id"]
        with pytest.raises(IndexError):
            ds.frame(7)
        with pytest.raises(SetupError):
            ds.indices("training")


def test_torn_frame_is_overwritten(tmp_path):
    """A frame whose `complete` flag was never set (job killed mid-write) is invisible and gets replaced."""
    rng = np.random.default_rng(2)
    path = tmp_path / "d.nc"
    w = DatasetWriter(path)
    for i in range(3):
        w.append(_frame(i, rng))
    with netCDF4.Dataset(path, "a") as nc:
        nc["complete"][2] = 0
    with Dataset.open(path) as ds:
        assert len(ds) == 2
    new = _frame(5, rng)
    assert w.append(new) == 2
    with Dataset.open(path) as ds:
        assert len(ds) == 3
        np.testing.assert_array_equal(ds.frame(2)["forces"], new["forces"])
        assert ds.frame(2)["charge_start"] == 0 + 6          # frames 0 (0 charges) and 1 (6 charges)


def test_compact_copy(tmp_path):
    rng = np.random.default_rng(3)
    src, dst = tmp_path / "a.nc", tmp_path / "b.nc"
    w = DatasetWriter(src, {"title": "x"})
    for i in range(4):
        w.append(_frame(i, rng))
    with netCDF4.Dataset(src, "a") as nc:        # an extra per-frame variable (as a trainer may add) is kept
        v = nc.createVariable("gas_energy", "f8", ("frame",), fill_value=np.nan)
        v.units = "eV"
        v[:4] = np.arange(4.0)
    compact(src, dst)
    with Dataset.open(src) as a, Dataset.open(dst) as b:
        assert len(a) == len(b) == 4 and b.attrs["title"] == "x" and b.units == a.units
        np.testing.assert_array_equal(b.meta["gas_energy"], np.arange(4.0))
        for i in range(4):
            fa, fb = a.frame(i), b.frame(i)
            for k in fa:
                np.testing.assert_array_equal(fa[k], fb[k])


def test_labelling_continues_in_a_compacted_copy(tmp_path):
    """A shipped (compacted, fixed-size) file is made appendable on first use: old frames kept, new ones added."""
    rng = np.random.default_rng(4)
    src, dst = tmp_path / "a.nc", tmp_path / "b.nc"
    w = DatasetWriter(src, {"title": "x"})
    frames = [_frame(i, rng) for i in range(5)]
    for f in frames[:4]:
        w.append(f)
    with netCDF4.Dataset(src, "a") as nc:
        v = nc.createVariable("gas_energy", "f8", ("frame",), fill_value=np.nan)
        v.units = "eV"
        v[:4] = np.arange(4.0)
    compact(src, dst)
    w = DatasetWriter(dst)
    assert w.frame_ids() == {str(f["frame_id"]) for f in frames[:4]}
    assert w.append(frames[4]) == 4
    with Dataset.open(src) as a, Dataset.open(dst) as b:
        assert len(b) == 5 and b.attrs["title"] == "x" and b.units["gas_energy"] == "eV"
        np.testing.assert_array_equal(b.meta["gas_energy"][:4], np.arange(4.0))
        for i in range(4):
            fa, fb = a.frame(i), b.frame(i)
            for k in fa:
                np.testing.assert_array_equal(fa[k], fb[k])
        np.testing.assert_array_equal(b.frame(4)["forces"], frames[4]["forces"])


def test_bad_files(tmp_path):
    with pytest.raises(SetupError, match="does not exist"):
        Dataset.open(tmp_path / "none.nc")
    junk = tmp_path / "junk.nc"
    junk.write_text("not netcdf")
    with pytest.raises(SetupError):
        DatasetWriter(junk)


def test_split_by_trajectory_is_disjoint():
    """The production plan: every trajectory has one split; each solute x setting has val and test data."""
    cfg = LabelConfig.from_toml(Path(__file__).resolve().parents[2] / "inputs" / "data" / "label_config.toml")
    tasks = plan(cfg)
    by_split = {s: {t.trajectory for t in tasks if t.split == s} for s in ("train", "val", "test")}
    assert not (by_split["train"] & by_split["val"]) and not (by_split["train"] & by_split["test"])
    assert not (by_split["val"] & by_split["test"])
    assert len({t.frame_id for t in tasks}) == len(tasks)
    for chain in {t.chain.chain_id for t in tasks}:
        assert {t.split for t in tasks if t.chain.chain_id == chain} == {"train", "val", "test"}
    # round robin: the first block already covers every chain, and its frames alternate solutes
    first = tasks[:len({t.chain.chain_id for t in tasks})]
    assert len({t.chain.chain_id for t in first}) == len(first)


@pytest.mark.skipif(not TINY.exists(), reason="tests/data/tiny_qmmm.nc not generated")
def test_shipped_tiny_dataset():
    with Dataset.open(TINY) as ds:
        assert len(ds) >= 8 and set(ds.meta["solute"]) == {"HOH", "MOH", "ACT", "MAM"}
        assert {"train", "val", "test"} <= set(ds.meta["split"])
        assert ds.attrs["qm_basis"] == "def2-svp"
        for i in range(len(ds)):
            f = ds.frame(i)
            assert np.all(np.isfinite(f["forces"])) and f["positions"].shape == f["forces"].shape
            # net force on QM atoms + charges ~ 0 (translation invariance of the QM/MM energy)
            tot = f["forces"].sum(0) + f["mm_forces"].sum(0)
            assert np.abs(tot).max() < 5e-3


def test_writer_waits_for_a_reader_lock(tmp_path):
    """A process holding the file open (HDF5 lock) delays an append instead of crashing the labeller."""
    import subprocess
    import sys
    import time
    rng = np.random.default_rng(4)
    path = tmp_path / "d.nc"
    w = DatasetWriter(path, wait_s=30.0)
    w.append(_frame(0, rng))
    holder = subprocess.Popen([sys.executable, "-c", f"import netCDF4, time\nnc = netCDF4.Dataset({str(path)!r})\n"
                               "print('open', flush=True)\ntime.sleep(2.0)\nnc.close()"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "open"
        t0 = time.monotonic()
        w.append(_frame(1, rng))
        assert time.monotonic() - t0 > 0.5           # it really had to wait for the lock
    finally:
        holder.wait(timeout=30)
    with Dataset.open(path) as ds:
        assert len(ds) == 2


def _append_one(path: str, i: int) -> None:
    w = DatasetWriter(path)
    w.append(_frame(i, np.random.default_rng(i)))


def test_jobs_starting_at_once_on_a_compacted_copy_keep_every_frame(tmp_path):
    """Four processes open the same compacted file at once and each appends a frame: the file is rewritten
    appendable once (under a folder lock), so no job's rewrite drops a frame another job appended."""
    import multiprocessing as mp
    src, dst = tmp_path / "a.nc", tmp_path / "b.nc"
    w = DatasetWriter(src, {"title": "x"})
    for i in range(3):
        w.append(_frame(i, np.random.default_rng(i)))
    compact(src, dst)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_append_one, args=(str(dst), 10 + k)) for k in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0] * 4
    with Dataset.open(dst) as b:
        assert len(b) == 7 and {str(b.frame(i)["frame_id"]) for i in range(7)} == \
            {str(_frame(i, np.random.default_rng(i))["frame_id"]) for i in (0, 1, 2, 10, 11, 12, 13)}
    assert not list(tmp_path.glob("*.tmp"))

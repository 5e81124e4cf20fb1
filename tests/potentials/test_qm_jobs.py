"""Labelling split over two machines (potentials.qm_jobs): export the QM inputs here, label them in worker
processes with numpy and PySCF only, import the labels. Checked against `mlmm label` doing all three in one
process (real OpenMM sampling, real PySCF STO-3G, real NetCDF4 files)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from label_configs import cluster_toml

REPO = Path(__file__).resolve().parents[2]

CONFIG = cluster_toml(cluster_waters=6, frames=2, spacing_ps=0.05)


def _mlmm(*args, cwd=REPO):
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "driver.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=900)


@pytest.mark.slow
def test_exported_jobs_labelled_elsewhere_equal_mlmm_label(tmp_path):
    """export -> `python -m potentials.qm_jobs` (2 worker processes, stopped and resumed) -> import gives the
    frames `mlmm label` writes itself: same ids, inputs, energies and forces (to SCF tolerance)."""
    from potentials.dataset import Dataset
    cfg = tmp_path / "c.toml"
    cfg.write_text(CONFIG)
    direct, split = tmp_path / "direct.nc", tmp_path / "split.nc"
    r = _mlmm("label", "--out", str(direct), "--config", str(cfg))
    assert r.returncode == 0, r.stderr
    jobs, results = tmp_path / "jobs.npz", tmp_path / "labels.npz"
    r = _mlmm("label", "--out", str(split), "--config", str(cfg), "--export-jobs", str(jobs))
    assert r.returncode == 0, r.stderr
    assert not split.exists()                          # exporting writes no dataset
    worker = [sys.executable, "-m", "potentials.qm_jobs", str(jobs), str(results), "--qm-device", "cpu"]
    r = subprocess.run([*worker, "--workers", "2", "--deadline-s", "0"], cwd=REPO, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0 and "deadline reached" in r.stderr, r.stderr
    r = subprocess.run([*worker, "--workers", "2"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    r = _mlmm("label", "--out", str(split), "--import-labels", str(results))
    assert r.returncode == 0, r.stderr
    r = _mlmm("label", "--out", str(split), "--import-labels", str(results))          # twice: nothing new
    assert r.returncode == 0 and "appended 0" in r.stderr, r.stderr
    a, b = Dataset.open(direct), Dataset.open(split)
    assert len(a) == len(b) == 4
    fb = {str(b.frame(i)["frame_id"]): b.frame(i) for i in range(len(b))}
    for i in range(len(a)):
        x = a.frame(i)
        y = fb[str(x["frame_id"])]
        for key in ("solute", "kind", "split", "trajectory"):
            assert str(x[key]) == str(y[key])
        for key in ("numbers", "positions", "mm_positions", "mm_charges"):
            np.testing.assert_array_equal(x[key], y[key])
        assert abs(float(x["energy"]) - float(y["energy"])) < 1e-6          # eV; SCF converged to 1e-8 Ha
        np.testing.assert_allclose(x["forces"], y["forces"], atol=1e-4)
        np.testing.assert_allclose(x["mm_forces"], y["mm_forces"], atol=1e-4)
    r = _mlmm("label", "--out", str(split), "--config", str(cfg), "--export-jobs", str(jobs))
    assert r.returncode != 0 and "nothing to export" in r.stderr and "Traceback" not in r.stderr


def test_a_wrong_file_is_one_line(tmp_path):
    """A results file that is not one, or a jobs file given where results are expected: one clear line."""
    bad = tmp_path / "x.npz"
    np.savez(bad, a=np.zeros(3))
    r = _mlmm("label", "--out", str(tmp_path / "d.nc"), "--import-labels", str(bad))
    assert r.returncode != 0 and "not an mlmm-qm-labels/1 file" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "potentials.qm_jobs", str(tmp_path / "none.npz"), str(bad)],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "does not exist" in r.stdout
    assert not (tmp_path / "d.nc").exists()


def test_a_worker_that_dies_stops_the_run_instead_of_hanging(tmp_path, monkeypatch):
    """A worker killed mid-frame loses that frame; the parent notices no progress within stall_s, saves what it
    has and stops with one line (it never waits forever)."""
    from potentials import qm_jobs
    from potentials.core.errors import SetupError
    from potentials.qmmm_reference import LevelOfTheory
    z = np.array([8, 1, 1])
    x = np.array([[0.0, 0.0, 0.1173], [0.0, 0.7572, -0.4692], [0.0, -0.7572, -0.4692]])
    metas = [dict(frame_id=f"w/b000/f0{k}/c0", total_charge=0) for k in range(2)]
    inputs = [dict(numbers=z, positions=x, mm_positions=np.zeros((0, 3)), mm_charges=np.zeros(0))] * 2
    jobs = tmp_path / "j.npz"
    qm_jobs.write_jobs(jobs, metas, inputs, LevelOfTheory(basis="sto-3g", grid_level=1), {}, "d.nc")
    monkeypatch.setattr(qm_jobs, "_label_one", _die)
    with pytest.raises(SetupError, match="no frame finished in 5 s"):
        qm_jobs.label_jobs(jobs, tmp_path / "r.npz", "cpu", workers=1, stall_s=5.0)
    assert (tmp_path / "r.npz").exists()


def _die(i):
    import os
    os._exit(1)

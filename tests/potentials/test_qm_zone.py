"""QM zones of several molecules in the reference data (issue #17): the solute + its nearest waters chosen per
frame (`ml_waters`), the per-zone embedding, water clusters of a fixed size (`cluster` kind), and unchanged
frame ids for the configs written before."""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np
import openmm
import pytest
from label_configs import cluster_toml

from potentials.qmmm_reference import LabelConfig, Labeller, Task, plan, shard_of
from potentials.sampling import (Chain, ChainSpec, ChainSystem, TIP3P_CHARGES, build, nearest_waters, qm_zone,
                                 system_data, water_residues)

REPO = Path(__file__).resolve().parents[2]
BOX = np.eye(3) * 2.0                   # nm
H_OFFSETS = np.array([[0.0, 0.0957, 0.0], [0.0, -0.024, 0.0927]])


def _point_charges():
    from coupling.schemes import SCHEMES
    return SCHEMES.get("electrostatic").point_charges


def _synthetic(box=BOX):
    """A two-atom 'solute' at the x = 0 face of a 2 nm box, a Na+ ion and four waters (O positions nm):
    W0 across the boundary (min-image 0.10 nm from solute atom 0, 1.80 nm without the box), W1 0.30 nm,
    W2 0.85 nm (1.05 without the box), W3 0.35 nm (from atom 1). The ion is nearest of all but is no water."""
    solute = np.array([[0.05, 1.0, 1.0], [0.15, 1.0, 1.0]])
    oxygens = np.array([[1.95, 1.0, 1.0], [0.45, 1.0, 1.0], [1.2, 1.0, 1.0], [0.15, 1.35, 1.0]])
    ion = np.array([[0.10, 0.95, 1.0]])
    pos = [solute, ion] + [np.vstack([o, o + H_OFFSETS]) for o in oxygens]
    pos = np.vstack(pos)
    charges = np.r_[[0.3, -0.3], [1.0], np.tile(TIP3P_CHARGES, 4)]
    residue = np.r_[[0, 0], [1], np.repeat(np.arange(2, 6), 3)]
    data = ChainSystem(numbers=np.array([6, 8]), ml_indices=np.array([0, 1]), charges=charges, residue=residue,
                       box=None if box is None else np.asarray(box, float), solute_charge=0)
    return data, pos


def _water_atoms(w):      # atom indices of synthetic water w
    return list(range(3 + 3 * w, 6 + 3 * w))


def test_nearest_waters_across_periodic_boundary():
    """Min-image O–solute distance picks the water across the box face; ions are not waters; zone order."""
    data, pos = _synthetic()
    oxygens, atoms = water_residues(data)
    assert list(oxygens) == [3, 6, 9, 12] and atoms.tolist() == [_water_atoms(w) for w in range(4)]
    assert nearest_waters(data, pos, 2).tolist() == [_water_atoms(0), _water_atoms(1)]
    assert nearest_waters(data, pos, 3).tolist() == [_water_atoms(0), _water_atoms(1), _water_atoms(3)]
    zone, numbers = qm_zone(data, pos, 3)
    assert zone.tolist() == [0, 1] + _water_atoms(0) + _water_atoms(1) + _water_atoms(3)
    assert numbers.tolist() == [6, 8] + [8, 1, 1] * 3
    zone0, numbers0 = qm_zone(data, pos, 0)
    assert zone0.tolist() == [0, 1] and numbers0.tolist() == [6, 8]
    # without the box W0 is far away: W1, W3, W2 in that order
    gas, _ = _synthetic(box=None)
    assert nearest_waters(gas, pos, 3).tolist() == [_water_atoms(1), _water_atoms(3), _water_atoms(2)]
    with pytest.raises(Exception, match="asks for 5 waters"):
        nearest_waters(data, pos, 5)


class _FakeChain:
    def __init__(self, data, pos):
        self.data, self.pos = data, pos

    def block(self, b, n):
        return np.repeat(self.pos[None], n, axis=0)


def test_per_frame_embedding_excludes_qm_waters():
    """Labeller.inputs with ml_waters: the QM waters (made whole across the box face) are QM atoms and no
    point charges; every other residue within the cutoff (ion, other waters) is; each zone its own embedding."""
    data, pos = _synthetic()
    cfg = LabelConfig(embedding_cutoff_nm=0.6, embedding_switch_nm=0.1, frames_per_trajectory=1)
    spec = ChainSpec("MOH", "periodic", 300.0, seed=1)                    # only its kind and seed are used
    lab = Labeller(cfg, Path("/nonexistent"), _point_charges())
    lab._chains[spec.chain_id] = _FakeChain(data, pos)
    x = lab.inputs(Task("t", spec, 0, 0, 0, "train", ml_waters=2))
    assert x["numbers"].tolist() == [6, 8, 8, 1, 1, 8, 1, 1]
    qm = x["positions"] / 10.0                                             # nm
    # W0 is whole and next to the solute (x = -0.05 nm, not 1.95 nm); the other atoms are where they were
    np.testing.assert_allclose(qm[2], [-0.05, 1.0, 1.0], atol=1e-12)
    np.testing.assert_allclose(qm[[0, 1, 5, 6, 7]], pos[[0, 1, 6, 7, 8]], atol=1e-12)
    np.testing.assert_allclose(qm[3:5], qm[2] + H_OFFSETS, atol=1e-12)
    mm = x["mm_positions"] / 10.0
    # in the charges: the ion and W3 (W2 is 0.75 nm from the nearest QM atom: beyond the 0.6 nm cutoff)
    expect = pos[[2] + _water_atoms(3)]
    assert len(mm) == 4
    for r in expect:
        assert np.abs(mm - r).max(axis=1).min() < 1e-6
    for w in (0, 1):                       # the QM waters are no charges (as is or as their image)
        for a in _water_atoms(w):
            d = mm - pos[a]
            d -= np.round(d / 2.0) * 2.0
            assert np.abs(d).max(axis=1).min() > 0.05
    np.testing.assert_allclose(np.sort(x["mm_charges"]), np.sort(np.r_[1.0, TIP3P_CHARGES]), atol=1e-6)
    # the solute alone: waters W0, W1, W3 and the ion are charges; a separate embedding object
    x0 = lab.inputs(Task("t", spec, 0, 0, 0, "train"))
    assert x0["numbers"].tolist() == [6, 8] and len(x0["mm_charges"]) == 1 + 3 * 3
    assert len(lab._envs) == 2
    # a displaced copy keeps its MD frame's zone and moves every atom of it, nothing else
    x1 = lab.inputs(Task("t", spec, 0, 0, 1, "train", ml_waters=2))
    assert x1["zone"].tolist() == x["zone"].tolist()
    moved = np.linalg.norm(x1["positions"] - x["positions"], axis=1)
    assert np.all((moved >= 0.05 - 1e-9) & (moved <= 0.15 + 1e-9))
    np.testing.assert_array_equal(x1["mm_positions"], x["mm_positions"])


def test_cluster_has_requested_waters(tmp_path):
    """A cluster of exactly N waters (solute excluded, no counter-ion), non-periodic, every oxygen
    restrained; its MD at 400 K keeps the waters together; chain ids and MD-cache reprs of the other kinds
    are as before."""
    spec = ChainSpec("ACT", "cluster", 400.0, seed=5, cluster_waters=20, equil_ps=0.3, spacing_ps=0.1)
    top, system, _ = build(spec)
    d = system_data(top, system, -1)
    assert sum(1 for r in top.residues() if r.name == "HOH") == 20 and d.box is None
    assert len(water_residues(d)[0]) == 20 and d.charges.sum() == pytest.approx(-1.0, abs=1e-6)
    restraint = next(f for f in system.getForces() if isinstance(f, openmm.CustomCentroidBondForce))
    assert restraint.getNumBonds() == 20
    r0 = restraint.getGlobalParameterDefaultValue(1)
    assert 0.45 < r0 < 0.8                                   # ~ radius of 20 waters + the solute
    # a water solute is not counted among the cluster's waters
    top_w, _, _ = build(ChainSpec("HOH", "cluster", 300.0, seed=5, cluster_waters=7))
    assert sum(1 for r in top_w.residues() if r.name == "HOH") == 1 + 7
    chain = Chain(spec, tmp_path)
    frames = chain.block(0, 2)
    ox = water_residues(chain.data)[0]
    for f in frames:
        assert np.linalg.norm(f[ox] - f[:7].mean(axis=0), axis=1).max() < r0 + 0.3
    assert spec.chain_id == "ACT-cluster20-400K-s5" and "cluster_waters=20" in repr(spec)
    old = ChainSpec("MOH", "droplet", 300.0, seed=3)
    assert old.chain_id == "MOH-droplet-300K-s3" and "cluster" not in repr(old)
    assert repr(old) == ("ChainSpec(solute='MOH', kind='droplet', temperature=300.0, seed=3, timestep_fs=1.0, "
                         "friction_per_ps=1.0, equil_ps=3.0, gap_ps=1.0, spacing_ps=0.5, droplet_radius_nm=1.6)")


def test_old_config_frame_ids_unchanged():
    """The production config still plans exactly the ids of the shipped dataset (in order), and the cluster
    config's ids are new ones that name the cluster size and the waters in the zone."""
    from potentials.dataset import Dataset
    with Dataset.open(REPO / "inputs" / "data" / "qmmm_b3lyp_svp.nc") as ds:
        ids = [str(i) for i in ds.meta["frame_id"]]
        solutes = {str(s) for s in ds.meta["solute"]}
    old = plan(LabelConfig.from_toml(REPO / "inputs" / "data" / "label_config.toml"))
    assert [t.frame_id for t in old[:len(ids)]] == ids
    assert ids[:2] == ["HOH-periodic-300K-s20340856/b000/f00/c0", "MOH-periodic-300K-s20849029/b000/f00/c0"]
    assert "HOH-droplet-300K-s20915262/b011/f00/c0" in ids
    assert solutes == {t.zone_name for t in old} == {"HOH", "MOH", "ACT", "MAM"}
    clusters = LabelConfig.from_toml(REPO / "inputs" / "data" / "label_config_clusters.toml")
    new = plan(clusters)
    assert len(new) == 2 * 2 * 140 * 5 * 2 and len({t.frame_id for t in new}) == len(new)
    # more blocks only append: the 60- and 100-block plans (ids, splits, MD chains) are the head of the 140-block
    # one, and so is each shard's task list, so labelling resumes where a shorter plan stopped
    for blocks in (60, 100):
        shorter = plan(dataclasses.replace(clusters, trajectories=blocks))
        assert len(shorter) == 2 * 2 * blocks * 5 * 2 and new[:len(shorter)] == shorter
        for k in (1, 2):
            head = shard_of(shorter, (k, 2))
            assert head and shard_of(new, (k, 2))[:len(head)] == head
    # shipped partial datasets: frames (ids, zones, splits) of their configs' plans; the clusters' of the 140-block one
    for name in ("zones", "ionpairs", "clusters"):
        planned = {t.frame_id: t for t in plan(LabelConfig.from_toml(REPO / "inputs" / "data" /
                                                                     f"label_config_{name}.toml"))}
        with Dataset.open(REPO / "inputs" / "data" / f"qmmm_{name}_b3lyp_svp.nc") as ds:
            ids, zones = [str(i) for i in ds.meta["frame_id"]], [str(z) for z in ds.meta["solute"]]
            splits = [str(x) for x in ds.meta["split"]]
        assert ids and set(ids) <= set(planned) and len(set(ids)) == len(ids)
        assert all(planned[i].zone_name == z and planned[i].split == x for i, z, x in zip(ids, zones, splits))
    assert {t.zone_name for t in new} == {"MOH+3HOH", "ACT+3HOH"}
    assert all("-cluster80-" in t.frame_id and "-w3/" in t.frame_id for t in new)
    assert not {t.frame_id for t in new} & {t.frame_id for t in old}
    assert new[0].frame_id.startswith("MOH-cluster80-300K-s") and new[0].trajectory + "/f00/c0" == new[0].frame_id
    # gas frames never carry waters; a cluster without ml_waters has no -w tag; same seed for the same MD
    cfg = LabelConfig(solutes=("MOH",), solvated_kinds=("cluster",), temperatures_K=(300.0,), ml_waters=2,
                      trajectories=1, frames_per_trajectory=1, displaced_copies=0)
    t = plan(cfg)
    assert [x.ml_waters for x in t] == [2, 0] and t[1].frame_id.startswith("MOH-gas-400K-") and \
        t[1].zone_name == "MOH"
    t0 = plan(LabelConfig(solutes=("MOH",), solvated_kinds=("cluster",), temperatures_K=(300.0,), gas=False,
                          trajectories=1, frames_per_trajectory=1, displaced_copies=0))
    assert t0[0].frame_id == t[0].frame_id.replace("-w2/", "/") and t0[0].chain == t[0].chain


def test_ml_waters_list_cycles_over_the_frames_of_a_block(tmp_path):
    """`ml_waters = [1, 3]`: frame f of every block gets the (f mod 2)-th count, from the same MD chain, so zones
    of several sizes come from one labelling config; every id is unique and names its count."""
    p = tmp_path / "zones.toml"
    p.write_text("solutes = ['HOH', 'MOH']\nsolvated_kinds = ['cluster']\ntemperatures_K = [300.0]\n"
                 "gas = false\nml_waters = [1, 3]\ntrajectories = 2\nframes_per_trajectory = 3\n"
                 "displaced_copies = 1\n")
    cfg = LabelConfig.from_toml(p)
    tasks = plan(cfg)
    assert len(tasks) == 2 * 2 * 3 * 2 and len({t.frame_id for t in tasks}) == len(tasks)
    assert [t.ml_waters for t in tasks if t.chain.solute == "MOH" and t.block == 0 and t.copy == 0] == [1, 3, 1]
    assert {t.zone_name for t in tasks} == {"HOH+1HOH", "HOH+3HOH", "MOH+1HOH", "MOH+3HOH"}
    one = next(t for t in tasks if t.ml_waters == 1 and t.chain.solute == "MOH")
    three = next(t for t in tasks if t.ml_waters == 3 and t.chain.solute == "MOH")
    assert one.chain == three.chain and "-w1/" in one.frame_id and "-w3/" in three.frame_id
    for bad, msg in (("ml_waters = []", "ml_waters must be >= 0"), ("ml_waters = [2, -1]", "ml_waters must be"),
                     ("solvated_kinds = ['cluster']\ncluster_waters = 4\nml_waters = [1, 6]", "at least ml_waters")):
        p.write_text(bad + "\n")
        with pytest.raises(Exception, match=msg):
            LabelConfig.from_toml(p)


def test_label_cluster_zone_end_to_end(tmp_path):
    """`mlmm label` with a cluster and waters in the QM zone (PySCF, STO-3G): the stored frame is the QM
    zone (solute + 2 waters, solute charge), the 8 other waters are the charges, and the Labeller reproduces the
    stored inputs."""
    from driver.pipeline import label_main
    from potentials.dataset import Dataset
    cfg_path = tmp_path / "cluster.toml"
    cfg_path.write_text(cluster_toml(ml_waters=2))
    out = tmp_path / "c.nc"
    assert label_main(argparse.Namespace(out=str(out), config=str(cfg_path), frames=None)) == 0
    cfg = LabelConfig.from_toml(cfg_path)
    tasks = plan(cfg)
    with Dataset.open(out) as ds:
        assert [ds.frame(i)["frame_id"] for i in range(len(ds))] == [t.frame_id for t in tasks]
        assert len(ds) == 2
        labeller = Labeller(cfg, out.with_suffix(".samples"), _point_charges())
        for i, task in enumerate(tasks):
            fr = ds.frame(i)
            assert str(fr["solute"]) == "MOH+2HOH" and int(fr["total_charge"]) == 0
            assert fr["environment"] == "cluster" and fr["kind"] == ("cluster", "displaced")[i]
            assert fr["numbers"].tolist() == [6, 1, 1, 1, 8, 1] + [8, 1, 1] * 2
            assert fr["n_charges"] == 3 * 8 and abs(float(fr["mm_charges"].sum())) < 1e-5
            x = labeller.inputs(task)
            np.testing.assert_array_equal(fr["mm_positions"], x["mm_positions"])
            np.testing.assert_allclose(fr["positions"], x["positions"], atol=1e-12)
            if i:
                continue
            # the QM waters are the two nearest: every MM oxygen is farther from the solute than they are
            solute, qm_o = fr["positions"][:6], fr["positions"][[6, 9]]
            mm_o = fr["mm_positions"][fr["mm_charges"] < 0]
            dist = lambda o: np.linalg.norm(o[:, None] - solute[None], axis=-1).min(axis=1)  # noqa: E731
            assert dist(qm_o).max() <= dist(mm_o).min() + 1e-4
        fr = ds.frame(0)
        # net force ~ 0 (translation invariance), up to the grid-level-1 XC grid without grid response
        assert fr["forces"].shape == (12, 3) and np.abs(fr["forces"].sum(0) + fr["mm_forces"].sum(0)).max() < 0.03


def test_label_only_some_solutes_keeps_the_full_plan():
    """`mlmm label --solutes ACT` labels the acetate frames of the cluster plan: the same ids, splits, MD chains
    and shards as the full plan, in its order, so a later run with the full config fills in the rest."""
    from potentials.core.errors import SetupError
    from potentials.qmmm_reference import only_solutes
    full = dataclasses.replace(LabelConfig.from_toml(REPO / "inputs" / "data" / "label_config_clusters.toml"),
                               trajectories=12)
    act = only_solutes(full, "ACT")
    assert act.solutes == ("ACT",) and only_solutes(full, None) is full
    assert plan(act) == [t for t in plan(full) if t.chain.solute == "ACT"]
    for k in (1, 2):
        assert shard_of(plan(act), (k, 2)) == [t for t in shard_of(plan(full), (k, 2)) if t.chain.solute == "ACT"]
    assert only_solutes(full, " ACT, MOH ").solutes == ("MOH", "ACT")       # the config's order
    for bad in ("HOH", "", "ACT,MAM"):
        with pytest.raises(SetupError, match="subset of the config's solutes \\(MOH,ACT\\)"):
            only_solutes(full, bad)


def test_zone_config_errors(tmp_path):
    from potentials.core.errors import SetupError
    p = tmp_path / "bad.toml"
    p.write_text("ml_waters = -1\n")
    with pytest.raises(SetupError, match="ml_waters must be >= 0"):
        LabelConfig.from_toml(p)
    p.write_text("solvated_kinds = ['cluster']\ncluster_waters = 2\nml_waters = 3\n")
    with pytest.raises(SetupError, match="cluster_waters"):
        LabelConfig.from_toml(p)
    with pytest.raises(SetupError, match="unknown sampling kind"):
        ChainSpec("MOH", "clusters", 300.0, seed=1)


def test_two_shards_label_one_file_at_once(tmp_path):
    """`mlmm label --shard 1/2` and `--shard 2/2` run at the same time into one file (PySCF, STO-3G): together
    they label every planned frame exactly once, each frame whole; a shard that does not exist is one line."""
    import subprocess
    import sys

    from potentials.dataset import Dataset
    from potentials.qmmm_reference import shard_of
    cfg_path = tmp_path / "cluster.toml"
    cfg_path.write_text(cluster_toml(cluster_waters=6, frames=3, conv_tol=1e-7, spacing_ps=0.05))
    out = tmp_path / "c.nc"
    argv = [sys.executable, "-m", "driver.cli", "label", "--out", str(out), "--config", str(cfg_path)]
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    jobs = [subprocess.Popen([*argv, "--shard", f"{k}/2"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True) for k in (1, 2)]
    logs = [j.communicate(timeout=600)[0] for j in jobs]
    assert [j.returncode for j in jobs] == [0, 0], logs
    tasks = plan(LabelConfig.from_toml(cfg_path))
    assert sorted(t.frame_id for k in (1, 2) for t in shard_of(tasks, (k, 2))) == sorted(t.frame_id for t in tasks)
    with Dataset.open(out) as ds:
        ids = [str(ds.frame(i)["frame_id"]) for i in range(len(ds))]
        assert sorted(ids) == sorted(t.frame_id for t in tasks) and len(ds) == 6
        assert all(ds.frame(i)["numbers"].tolist() == [6, 1, 1, 1, 8, 1, 8, 1, 1] for i in range(len(ds)))
    bad = subprocess.run([*argv, "--shard", "3/2"], cwd=REPO, env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "--shard '3/2'" in bad.stderr and "Traceback" not in bad.stderr
    assert len(Dataset.open(out)) == 6                  # the refused job touched nothing


def test_ion_pair_zone_end_to_end(tmp_path):
    """An ion pair with a water in one QM zone (`solutes = ["MAM+ACT"]`, PySCF STO-3G): the neutral zone
    MAM+ACT+1HOH is labelled in the field of the other waters, and the domain record sees three molecules."""
    from driver.pipeline import label_main
    from potentials.dataset import Dataset
    from potentials.domain import training_domain
    cfg_path = tmp_path / "pair.toml"
    cfg_path.write_text(cluster_toml(solute="MAM+ACT", displaced_copies=0))
    out = tmp_path / "p.nc"
    assert label_main(argparse.Namespace(out=str(out), config=str(cfg_path), frames=None)) == 0
    with Dataset.open(out) as ds:
        fr = ds.frame(0)
        assert str(fr["solute"]) == "MAM+ACT+1HOH" and int(fr["total_charge"]) == 0
        assert fr["numbers"].tolist() == [6, 1, 1, 1, 7, 1, 1, 1] + [6, 1, 1, 1, 6, 8, 8] + [8, 1, 1]
        assert fr["n_charges"] == 3 * 9 and abs(float(fr["mm_charges"].sum())) < 1e-5
        assert str(fr["frame_id"]).startswith("MAM+ACT-cluster10-300K-s")
        dom = training_domain([fr])
    assert dom["ml_molecules"] == 3 and {m["formula"] for m in dom["molecules"]} == {"CH6N", "C2H3O2", "H2O"}

"""QM/MM labeller: agreement with a PySCF calculation written out here, finite-difference forces on the point
charges and QM atoms, and the end-to-end `mlmm label` pipeline (sampling, embedding, resumable writing)."""
from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np
import pytest

pyscf = pytest.importorskip("pyscf")
from pyscf import dft, gto, qmmm  # noqa: E402

from potentials.core.errors import SetupError  # noqa: E402
from potentials.core.units import BOHR_PER_ANGSTROM, EV_PER_HARTREE  # noqa: E402
from coupling.schemes import SCHEMES  # noqa: E402
from driver.pipeline import label_main  # noqa: E402
from potentials.core.spec import CouplingSpec  # noqa: E402
from potentials.qmmm_reference import LabelConfig, Labeller, LevelOfTheory, label_frame, plan  # noqa: E402

POINT_CHARGES = SCHEMES.get("electrostatic").point_charges

WATER = np.array([[0.0, 0.0, 0.0], [0.9572, 0.0, 0.0], [-0.2400, 0.9266, 0.0]])      # Å
# two TIP3P waters around it, charges in e, positions in Å
MM_POS = np.array([[2.9, 0.3, 0.2], [3.4, 1.0, 0.6], [3.3, -0.5, 0.5],
                   [-1.2, 2.6, -0.9], [-0.8, 3.3, -0.4], [-2.1, 2.8, -1.1]])
MM_Q = np.array([-0.834, 0.417, 0.417, -0.834, 0.417, 0.417])


def test_label_matches_direct_pyscf():
    """label_frame == a plain PySCF QM/MM run (energy, QM forces) and a field-based MM force (int1e_grids_ip)."""
    lab = label_frame([8, 1, 1], WATER, 0, MM_POS, MM_Q)
    b = BOHR_PER_ANGSTROM
    mol = gto.M(atom=[(z, tuple(r * b)) for z, r in zip([8, 1, 1], WATER)], unit="Bohr", basis="def2-svp",
                verbose=0)
    mf = dft.RKS(mol).density_fit(auxbasis="def2-universal-jkfit")
    mf.xc, mf.conv_tol = "b3lyp", 1e-10          # 'b3lyp' and 'b3lypg' are the same functional in PySCF 2.14
    mf = qmmm.mm_charge(mf, MM_POS * b, MM_Q, unit="Bohr")
    e = mf.kernel()
    g = mf.nuc_grad_method().kernel()
    # force on each charge = -q * grad(potential of nuclei + electrons) at the charge. The electronic part uses
    # int1e_grids_ip, a different integral route from the labeller's int3c2e_ip2; with PySCF's sign convention
    # for it, grad_R sum_pq D_pq <p|1/|r-R||q> = 2 sum_pq D_pq ip[:, R, p, q] (the absolute sign is pinned
    # independently by test_forces_match_finite_differences)
    dm = mf.make_rdm1()
    ip = mol.intor("int1e_grids_ip", grids=MM_POS * b)                       # [3, m, nao, nao]
    grad_phi_el = -2.0 * np.einsum("xkpq,pq->kx", ip, dm)                   # electrons carry charge -1
    d = MM_POS[:, None, :] * b - mol.atom_coords()[None]                    # [m, n, 3]
    grad_phi_nuc = -np.einsum("a,kax->kx", mol.atom_charges(), d / np.linalg.norm(d, axis=-1)[..., None] ** 3)
    f_mm = -MM_Q[:, None] * (grad_phi_el + grad_phi_nuc)
    conv = EV_PER_HARTREE * b
    assert lab.energy == pytest.approx(e * EV_PER_HARTREE, abs=1e-6)
    np.testing.assert_allclose(lab.forces, -g * conv, atol=1e-5)
    np.testing.assert_allclose(lab.mm_forces, f_mm * conv, atol=1e-5)
    # nonzero and physically sized: the field of a polar molecule on a charge 3 Å away is ~0.1-1 eV/Å
    assert 0.05 < np.abs(lab.mm_forces).max() < 5.0
    # gas phase differs (polarisation + interaction with the charges)
    gas = label_frame([8, 1, 1], WATER, 0)
    assert gas.mm_forces.shape == (0, 3) and abs(gas.energy - lab.energy) > 0.05


def test_forces_match_finite_differences():
    """MM-charge forces and QM forces = -dE/dR by central differences (small basis for speed)."""
    level = LevelOfTheory(basis="6-31g", auxbasis="def2-universal-jkfit", grid_level=2, conv_tol=1e-11)
    lab = label_frame([8, 1, 1], WATER, 0, MM_POS[:3], MM_Q[:3], level)
    h = 2e-3   # Å

    def energy(pos, mm):
        return label_frame([8, 1, 1], pos, 0, mm, MM_Q[:3], level).energy

    for j, x in [(0, 0), (1, 1), (2, 2)]:
        mp, mm_ = MM_POS[:3].copy(), MM_POS[:3].copy()
        mp[j, x] += h
        mm_[j, x] -= h
        fd = -(energy(WATER, mp) - energy(WATER, mm_)) / (2 * h)
        assert lab.mm_forces[j, x] == pytest.approx(fd, abs=2e-5), (j, x)
    # QM atoms: the grid moves with the atoms and its response is not in the analytic force -> looser
    for i, x in [(0, 0), (2, 1)]:
        pp, pm = WATER.copy(), WATER.copy()
        pp[i, x] += h
        pm[i, x] -= h
        fd = -(energy(pp, MM_POS[:3]) - energy(pm, MM_POS[:3])) / (2 * h)
        assert lab.forces[i, x] == pytest.approx(fd, abs=2e-3), (i, x)
    # Newton's third law does not hold atom-by-atom, but the total force on QM + MM vanishes (translation)
    total = lab.forces.sum(0) + lab.mm_forces.sum(0)
    np.testing.assert_allclose(total, 0.0, atol=2e-3)


def test_scf_fallbacks_give_the_same_state():
    """The retry paths (damping + level shift, second-order SCF) converge to the same energy and gradient."""
    from potentials.qmmm_reference import _scf
    level = LevelOfTheory(basis="6-31g", grid_level=2, conv_tol=1e-10)
    res = []
    for attempt in range(3):
        mol, mf = _scf(np.array([8, 1, 1]), WATER, 0, MM_POS, MM_Q, level, attempt)
        assert mf.converged
        res.append((mf.e_tot, mf.nuc_grad_method().kernel()))
    for e, g in res[1:]:
        assert e == pytest.approx(res[0][0], abs=1e-8)
        np.testing.assert_allclose(g, res[0][1], atol=1e-5)


def test_dipole_of_neutral_water():
    """Dipole about the centroid: along the H-O-H bisector, ~2.0-2.2 D for B3LYP/def2-SVP water in vacuum."""
    lab = label_frame([8, 1, 1], WATER, 0)
    debye = np.linalg.norm(lab.dipole) / 0.2081943       # e·Å -> D
    bisector = (WATER[1] + WATER[2]) / 2 - WATER[0]
    cos = lab.dipole @ bisector / np.linalg.norm(lab.dipole) / np.linalg.norm(bisector)
    assert 1.9 < debye < 2.3 and cos > 0.99
    assert abs(lab.quadrupole[:3].sum()) < 1e-10


def _tiny_config(tmp_path, **over):
    text = """
solutes = ["HOH"]
solvated_kinds = ["droplet"]
temperatures_K = [300.0]
gas = true
trajectories = 2
frames_per_trajectory = 1
split_pattern = ["train", "test"]
equil_ps = 0.02
gap_ps = 0.02
spacing_ps = 0.02
droplet_radius_nm = 0.7
embedding_cutoff_nm = 0.6
embedding_switch_nm = 0.2
[level]
basis = "sto-3g"
grid_level = 1
conv_tol = 1e-10
"""
    for k, v in over.items():
        text = f"{k} = {v}\n" + text
    p = tmp_path / "label.toml"
    p.write_text(text)
    return p


def test_label_main_resumable_and_consistent(tmp_path):
    """`mlmm label` end to end: partial run, resume without duplicates, stored inputs reproduce the labels."""
    from potentials.dataset import Dataset
    cfg_path = _tiny_config(tmp_path)
    out = tmp_path / "d.nc"
    assert label_main(argparse.Namespace(out=str(out), config=str(cfg_path), frames=2)) == 0
    with Dataset.open(out) as ds:
        assert len(ds) == 2
    assert label_main(argparse.Namespace(out=str(out), config=str(cfg_path), frames=None)) == 0
    cfg = LabelConfig.from_toml(cfg_path)
    tasks = plan(cfg)
    assert len(tasks) == 2 * (2 + 1)          # 2 blocks x (droplet MD frame + displaced copy + gas)
    with Dataset.open(out) as ds:
        assert len(ds) == len(tasks)
        assert [ds.frame(i)["frame_id"] for i in range(len(ds))] == [t.frame_id for t in tasks]
        assert ds.attrs["qm_xc"] == "b3lypg" and "pyscf_version" in ds.attrs
        assert ds.attrs["history"].count("mlmm label session") == 2        # one line per (re)start
        kinds = {str(k) for k in ds.meta["kind"]}
        assert kinds == {"droplet", "displaced", "gas"}
        for traj in set(ds.meta["trajectory"]):
            assert len(set(ds.meta["split"][ds.meta["trajectory"] == traj])) == 1
        labeller = Labeller(cfg, out.with_suffix(".samples"), POINT_CHARGES)
        for i, task in enumerate(tasks):
            fr = ds.frame(i)
            x = labeller.inputs(task)
            np.testing.assert_array_equal(fr["mm_positions"], x["mm_positions"])
            np.testing.assert_array_equal(fr["mm_charges"], x["mm_charges"])
            np.testing.assert_allclose(fr["positions"], x["positions"], atol=1e-12)
            if fr["kind"] == "gas":
                assert fr["n_charges"] == 0
            else:
                assert fr["n_charges"] > 0 and fr["n_charges"] % 3 == 0
        # the labels belong to exactly the stored environment
        fr = ds.frame(0)
        lab = label_frame(fr["numbers"], fr["positions"], int(fr["total_charge"]), fr["mm_positions"],
                          fr["mm_charges"], cfg.level)
        assert lab.energy == pytest.approx(float(fr["energy"]), abs=1e-6)
        np.testing.assert_allclose(lab.mm_forces, fr["mm_forces"], atol=1e-5)


def test_config_errors(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text("solutes = ['HOH']\nframes = 3\n")
    with pytest.raises(SetupError, match="unknown key"):
        LabelConfig.from_toml(p)
    p.write_text("trajectories = 'many'\n")
    with pytest.raises(SetupError, match="trajectories: expected an integer"):
        LabelConfig.from_toml(p)
    p.write_text("displacement_A = [0.05]\n")
    with pytest.raises(SetupError, match="displacement_A: expected 2 values"):
        LabelConfig.from_toml(p)
    p.write_text("[level]\nbasis = 3\n")
    with pytest.raises(SetupError, match=r"\[level\] basis: expected str"):
        LabelConfig.from_toml(p)
    # the embedding defaults are the simulation's (one definition: the system.toml schema)
    assert LabelConfig().embedding_cutoff_nm == CouplingSpec().cutoff_nm
    assert LabelConfig().embedding_switch_nm == CouplingSpec().switch_width_nm
    p.write_text("solutes = ['XYZ']\n")
    with pytest.raises(SetupError, match="unknown solute"):
        plan(LabelConfig.from_toml(p))


def test_qm_backend_choice(tmp_path):
    """QM on the CPU (PySCF) or the GPU (gpu4pyscf): "auto" takes the GPU only when gpu4pyscf runs; "gpu" without it
    is one clear error before anything is written. Where gpu4pyscf runs, both backends give the same label."""
    from potentials.qmmm_reference import _gpu_missing, qm_backend
    assert qm_backend("cpu") == "cpu"
    with pytest.raises(SetupError, match="choose auto, cpu or gpu"):
        qm_backend("tpu")
    why = _gpu_missing()
    if why:
        assert qm_backend("auto") == "cpu"
        with pytest.raises(SetupError, match="gpu4pyscf"):
            qm_backend("gpu")
        out = tmp_path / "d.nc"
        with pytest.raises(SetupError, match="QM device \"gpu\""):
            label_main(argparse.Namespace(out=str(out), config=str(_tiny_config(tmp_path)), frames=1, qm_device="gpu"))
        assert not out.exists()
        return
    assert qm_backend("auto") == "gpu"
    z = [8, 1, 1]
    x = np.array([[0.0, 0.0, 0.1173], [0.0, 0.7572, -0.4692], [0.0, -0.7572, -0.4692]])
    mm = np.array([[2.9, 0.1, 0.0], [3.4, 0.9, 0.1], [3.4, -0.7, 0.1]])
    q = np.array([-0.834, 0.417, 0.417])
    cpu = label_frame(z, x, 0, mm, q, LevelOfTheory(), "cpu")
    gpu = label_frame(z, x, 0, mm, q, LevelOfTheory(), "gpu")
    assert gpu.energy == pytest.approx(cpu.energy, abs=1e-5)                 # eV
    np.testing.assert_allclose(gpu.forces, cpu.forces, atol=1e-4)            # eV/Å
    np.testing.assert_allclose(gpu.mm_forces, cpu.mm_forces, atol=1e-4)
    np.testing.assert_allclose(gpu.dipole, cpu.dipole, atol=1e-4)


FRAGMENTS = {"ASP": ("C2H3O2", -1), "SER": ("CH4O", 0), "CYS": ("CH4S", 0), "CYM": ("CH3S", -1),
             "GLU": ("C3H5O2", -1), "THR": ("C2H6O", 0), "MET": ("C3H8S", 0), "HID": ("C4H6N2", 0),
             "HIE": ("C4H6N2", 0), "HIP": ("C4H7N2", 1), "LYS": ("C4H12N", 1), "TYR": ("C7H8O", 0),
             "ARG": ("C4H12N3", 1), "DIPEPTIDE": ("C4H8N2O2", 0),
             "CYS-DISP": ("CH4S", 0)}           # Cys again, 60 of 80 frames displaced (learn_fragments_displaced)
DHFR_FRAGMENTS = {"DHFR-ASP27": ("C2H3O2", -1), "DHFR-GLU17": ("C3H5O2", -1), "DHFR-HIS45": ("C4H6N2", 0),
                  "DHFR-SER49": ("CH4O", 0), "DHFR-THR46": ("C2H6O", 0), "DHFR-LYS32": ("C4H12N", 1),
                  "DHFR-ARG57": ("C4H12N3", 1), "DHFR-TYR100": ("C7H8O", 0), "DHFR-MET20": ("C3H8S", 0),
                  "DHFR-CYS152": ("CH4S", 0)}       # the same side chains inside DHFR (HIS45 is HID there)


def test_shipped_fragments_are_what_their_readme_says():
    """inputs/data/fragments/<NAME>.nc (label_fragments.sh): 80 frames of one capped side chain each, split by MD
    segment, and a label (the methanethiol one: sulfur; in DHFR, Cys152's, with the protein's charges around it)
    recomputed here equals the stored one. Every fragment of the script's plan is shipped, in water and in DHFR."""
    from potentials.dataset import Dataset
    from potentials.domain import formula
    root = Path(__file__).resolve().parents[2] / "inputs" / "data" / "fragments"
    shipped = sorted(p.stem for p in root.glob("*.nc"))
    known = {**FRAGMENTS, **DHFR_FRAGMENTS}
    assert set(shipped) == set(known), shipped
    script = (root.parent / "label_fragments.sh").read_text()           # the plan: its WATER and PROTEIN lists
    plan_lists = {k: v.split() for k, v in re.findall(r"^(WATER|PROTEIN)=\((.*)\)$", script, re.MULTILINE)}
    assert set(plan_lists["WATER"]) == set(FRAGMENTS), plan_lists
    assert {f"DHFR-{r}" for r in plan_lists["PROTEIN"]} == set(DHFR_FRAGMENTS), plan_lists
    for name in shipped:
        chem, charge = known[name]
        with Dataset.open(root / f"{name}.nc") as ds:
            assert len(ds) == 80 and ds.attrs["qm_xc"] == "b3lypg" and ds.attrs["qm_basis"] == "def2-svp"
            fr = ds.frame(0)
            assert formula(fr["numbers"]) == chem and int(fr["total_charge"]) == charge
            split, traj = ds.meta["split"], ds.meta["trajectory"]
            assert {str(s): int(np.sum(split == s)) for s in ("train", "val", "test")} == {"train": 48, "val": 16,
                                                                                           "test": 16}
            assert all(len(set(split[traj == t])) == 1 for t in set(traj))
            assert int(np.sum(ds.meta["displaced"] > 0)) == (60 if name.endswith("-DISP") else 40), name
            distinct = len(np.unique(np.round(fr["mm_charges"], 4)))     # the environment's partial charges:
            assert (distinct > 200) == name.startswith("DHFR-"), (name, distinct)  # a protein's residues (330-425
            #                                       in these), or a droplet's waters and capped peptide (40-130)
            if name in ("CYS", "DHFR-CYS152"):
                lab = label_frame(fr["numbers"], fr["positions"], charge, fr["mm_positions"], fr["mm_charges"])
                assert lab.energy == pytest.approx(float(fr["energy"]), abs=1e-5)
                np.testing.assert_allclose(lab.forces, fr["forces"], atol=1e-4)

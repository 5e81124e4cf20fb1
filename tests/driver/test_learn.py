"""`mlmm learn` (driver/learn*.py): active learning end to end on a molecule no shipped model has seen
(formaldehyde in a TIP3P droplet, prepared by `mlmm prepare`), with real OpenMM sampling, real PySCF labels
(HF/STO-3G: cheap), real committee training (tiny preset) and real ML/MM MD; plus the frame selection and the
config's refusals."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from driver.cli import main as cli
from driver.learn_config import LearnConfig
from driver.learn_sample import gasteiger_charges, select
from potentials.core.errors import SetupError

FORMALDEHYDE = """\
HETATM    1  C1  FOR A   1       0.000   0.000   0.000  1.00  0.00           C
HETATM    2  O1  FOR A   1       0.000   0.000   1.208  1.00  0.00           O
HETATM    3  H1  FOR A   1       0.000   0.943  -0.587  1.00  0.00           H
HETATM    4  H2  FOR A   1       0.000  -0.943  -0.587  1.00  0.00           H
CONECT    1    2    3    4
END
"""

# the smallest run that still has every part: 2 temperatures x 2 segments x 1 frame x (MD + displaced) = 8 seed
# frames, one ML/MM run of 24 steps per round, 3 frames selected per round, 2 rounds, 2 members x 1 epoch; then the
# final committee (2 members x 2 epochs, from scratch) and 4 validation frames (2 from a fresh MM chain, 2 from ML/MM MD with the final committee)
CONFIG = """\
split_pattern = ["train", "test", "val", "train"]
[seed]
temperatures_K = [300.0, 450.0]
trajectories = 2
frames_per_trajectory = 1
equil_ps = 0.2
gap_ps = 0.1
spacing_ps = 0.05
[explore]
temperatures_K = [350.0]
steps = 24
stride = 3
floor_kjmol_nm = 1.0
ceiling_kjmol_nm = 100000.0
frames_per_round = 3
min_separation = 1
[level]
xc = "hf"
basis = "sto-3g"
auxbasis = "weigend"
conv_tol = 1e-8
[train]
preset = "tiny"
committee = 2
epochs = 1
warm_epochs = 1
batch_size = 4
[final]
epochs = 2
[budget]
max_frames = 40
max_rounds = 2
[validate]
frames = 4
stride = 3
spacing_ps = 0.05
equil_ps = 0.1
"""


def _prepare(tmp_path: Path) -> Path:
    pdb = tmp_path / "formaldehyde.pdb"
    pdb.write_text(FORMALDEHYDE)
    assert cli(["prepare", str(pdb), "--ml", "resname FOR", "--nonperiodic", "--solvate", "0.5",
                "--embedding-cutoff", "0.6", "--out", str(tmp_path / "prep")]) == 0
    return tmp_path / "prep" / "system.toml"


# ------------------------------------------------------------------------------------------------ fast
def test_select_keeps_the_window_the_order_and_the_separation():
    f = np.array([5.0, 50.0, 20.0, 200.0, 30.0, 40.0, 0.5, 45.0])
    run = np.array([0, 0, 0, 0, 0, 1, 1, 1])
    got = select(f, run, floor=10.0, ceiling=100.0, n=10)
    assert list(got) == [1, 7, 5, 4, 2]                  # largest first; 200 (> ceiling) and 5, 0.5 (< floor) out
    assert list(select(f, run, 10.0, 100.0, n=2)) == [1, 7]
    # no two of one run closer than 2 candidates: run 0 keeps 1 and then 4 (2 is next to 1, 3 is over the ceiling)
    assert list(select(f, run, 10.0, 100.0, n=10, min_separation=2)) == [1, 7, 5, 4]
    # a share per run first: each run gets one of the two, then the rest by spread
    assert list(select(f, run, 10.0, 100.0, n=2, per_run=1)) == [1, 7]
    assert list(select(np.array([9.0, 8.0, 1.0]), np.array([0, 0, 1]), 0.0, 10.0, n=2, per_run=1)) == [0, 2]
    assert len(select(f, run, 300.0, 400.0, n=3)) == 0
    # fill_floor: what the window leaves empty is filled from below the floor, largest spread first
    assert list(select(f, run, 10.0, 100.0, n=10, fill_floor=0.0)) == [1, 7, 5, 4, 2, 0, 6]
    assert list(select(f, run, 10.0, 100.0, n=6, fill_floor=1.0)) == [1, 7, 5, 4, 2, 0]


def test_gasteiger_charges_sum_to_the_charge():
    q = gasteiger_charges([6, 8, 1, 1], [(0, 1), (0, 2), (0, 3)], 0)        # formaldehyde
    assert q is not None and abs(q.sum()) < 1e-9 and q[1] < -0.2 and q[0] > 0.0
    q = gasteiger_charges([6, 1, 1, 1, 7, 1, 1, 1], [(0, 1), (0, 2), (0, 3), (0, 4), (4, 5), (4, 6), (4, 7)], 1)
    assert q is not None and abs(q.sum() - 1.0) < 1e-9                    # methylammonium


@pytest.mark.parametrize("raw, message", [
    ({"nope": 1}, "unknown key(s) ['nope']"),
    ({"explore": {"floor_kjmol_nm": 50.0, "ceiling_kjmol_nm": 40.0}}, "must be >= 0 and below ceiling_kjmol_nm"),
    ({"train": {"committee": 1}}, "committee of at least 2"),
    ({"split_pattern": ["train", "val"]}, "at least one train, one val and one test"),
    ({"split_pattern": ["train", "tset", "val"]}, "must be train, val or test"),
    ({"seed": {"trajectories": 1}}, "fewer than split_pattern"),
    ({"train": {"epochs": "many"}}, "epochs: expected an integer"),
    ({"qm_device": "tpu"}, "choose auto, cpu or gpu"),
    ({"train": {"device": "mps"}}, "choose auto, cpu, cuda"),
    ({"validate": {"ml_fraction": 1.5}}, "ml_fraction within [0, 1]"),
])
def test_config_refusals(raw, message):
    with pytest.raises(SetupError, match=re.escape(message)):
        LearnConfig.from_dict(raw)


def test_bad_input_is_one_line(tmp_path, capsys):
    assert cli(["learn", str(tmp_path / "none.toml"), "--out", str(tmp_path / "o")]) == 2
    assert "system file" in capsys.readouterr().err
    system = _prepare(tmp_path)
    for text, message in (('[level]\nbasis = "no-such-basis"\n', "[level] basis = 'no-such-basis'"),
                          ('[level]\nxc = "no-such-xc"\n', "[level] xc = 'no-such-xc'"),
                          ('[train]\npreset = "huge"\n', "model preset 'huge' not found"),
                          ('[seed]\nmodel = "no-such.pt"\n', "[seed] model = 'no-such.pt': no such file")):
        (tmp_path / "c.toml").write_text(text)
        capsys.readouterr()
        assert cli(["learn", str(system), "--out", str(tmp_path / "o"), "--config", str(tmp_path / "c.toml")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("mlmm: error: ") and message in err[0], err
    assert cli(["learn", str(system), "--out", str(tmp_path / "o"), "--max-frames", "0"]) == 2


# ------------------------------------------------------------------------------------------------ end to end
def _sessions(log: Path) -> list[str]:
    return re.split(r"^.*mlmm learn .* --out .*$", log.read_text(), flags=re.M)[1:]


@pytest.mark.slow
def test_learn_end_to_end_held_out_selection_and_resume(tmp_path):
    from potentials.dataset import Dataset
    from potentials.model_io import read_model_file

    system = _prepare(tmp_path)
    (tmp_path / "learn.toml").write_text(CONFIG)
    out = tmp_path / "al"
    args = ["learn", str(system), "--out", str(out), "--config", str(tmp_path / "learn.toml")]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    stderr = open(tmp_path / "first.err", "w")          # a file, not a pipe: a full pipe would block the run
    proc = subprocess.Popen([str(Path(sys.executable).parent / "mlmm"), *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=stderr)
    # kill it once round 1 is complete and round 2 has labelled its first frame
    deadline = time.time() + 150
    log = out / "learn.log"
    try:
        while time.time() < deadline and proc.poll() is None:
            if log.exists() and re.search(r"\[1/\d+\] r002/", log.read_text()):
                break
            time.sleep(0.05)
        assert proc.poll() is None, ("mlmm learn ended before it could be killed: "
                                     f"{(tmp_path / 'first.err').read_text()[-2000:]}")
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
        stderr.close()
    assert "evaluated" in json.loads((out / "round_001" / "state.json").read_text())["stages"]
    assert not (out / "model.pt").exists()

    assert cli(args) == 0                                 # the same command again: it continues
    first, second = _sessions(log)
    assert not re.search(r"\] r00[01]/", second)          # finished rounds are not labelled again ...
    assert "round 0: training" not in second and "round 1: training" not in second   # ... nor trained
    done = int(re.search(r"round 2: labelling (\d+) frames \((\d+) of the round's (\d+)", second).group(2))
    assert done >= 1                                      # round 2's frames labelled before the kill are kept
    states = [json.loads((out / f"round_{r:03d}" / "state.json").read_text()) for r in range(4)]
    with Dataset.open(out / "data.nc") as ds:
        ids, split, traj = list(ds.meta["frame_id"]), ds.meta["split"], ds.meta["trajectory"]
    assert len(ids) == len(set(ids)) == sum(s["n_selected"] for s in states[:3])      # each frame labelled once
    for t in set(traj):                                   # the split is by trajectory
        assert len(set(split[traj == t])) == 1
    for s in states[:3]:                                  # held out: never trained on, by trajectory
        e = s["errors"]
        assert e["n"] > 0 and np.isfinite(e["energy"]) and np.isfinite(e["forces"]) and np.isfinite(e["mm_forces"])
        assert not set(e["test_frame_ids"]) & set(s["trained_frame_ids"])
        assert not set(e["test_trajectories"]) & set(s["trained_trajectories"])
        assert {i.split("/f")[0].split("/c")[0] for i in e["test_frame_ids"]} == set(e["test_trajectories"])
    for s in states[1:3]:                                 # selection by disagreement beats random candidates
        assert s["n_selected"] == 3
        assert np.mean(s["selected_force_std"]) > np.mean(s["random_force_std"])
        assert min(s["selected_force_std"]) >= 1.0
    assert "explore" in states[3] and "selected" not in states[3]["stages"]         # round budget: measured, stop
    result = json.loads((out / "learn.json").read_text())["finished"]
    assert result["round"] == 2 and "round budget" in result["reason"]
    d = read_model_file(out / "model.pt")
    assert d["architecture"] == "embedded-aimnet2-committee" and len(d["members"]) == 2
    # model.pt is the [final] committee: retrained from scratch on every train/val frame, the test frames held out
    fin = json.loads((out / "final" / "state.json").read_text())
    assert d["metadata"].get("final") is True and fin["round"] == 2 and result["final"]["errors"] == fin["errors"]
    assert set(fin["trained_frame_ids"]) == set(states[2]["trained_frame_ids"])
    assert not set(fin["errors"]["test_frame_ids"]) & set(fin["trained_frame_ids"])
    emb = d["metadata"]["embedding"]
    assert (emb["scheme"], emb["cutoff_nm"], emb["switch_nm"]) == ("electrostatic", 0.6, 0.2)
    card, report = (out / "model.md").read_text(), (out / "report.md").read_text()
    assert "hf/sto-3g" in card and "Held-out test errors" in card and "CH2O" in card
    assert "| 2 | ML/MM MD |" in report and "Final training" in report and "final committee" in card
    for png in ("errors.png", "uncertainty.png", "frames.png"):
        assert (out / png).stat().st_size > 1000
    # independent validation: its own frames, from a fresh MM chain and ML/MM MD, none of them in the loop's data
    val = json.loads((out / "validation_final_r002" / "errors.json").read_text())
    assert (val["all"]["n"], val["mm"]["n"], val["md"]["n"]) == (4, 2, 2) and val["round"] == 2
    assert all(np.isfinite(val["all"][k]) for k in ("energy", "forces", "mm_forces"))
    with Dataset.open(out / "validation_final_r002" / "data.nc") as ds:
        val_ids, val_pos = list(ds.meta["frame_id"]), [ds.frame(i)["positions"] for i in range(len(ds))]
    assert not set(val_ids) & set(ids) and all(i.startswith("validation/") for i in val_ids)
    with Dataset.open(out / "data.nc") as ds:
        loop_pos = [ds.frame(i)["positions"] for i in range(len(ds))]
    assert min(np.abs(a - b).max() for a in val_pos for b in loop_pos) > 1e-3      # new configurations
    assert "Independent validation" in report and "Independent validation" in card
    # a smaller budget on a later call stops where the run is, not in a round that went on before
    assert cli([*args, "--max-frames", "9"]) == 0
    result = json.loads((out / "learn.json").read_text())["finished"]
    assert result["round"] == 2 and "frame budget of 9" in result["reason"]


@pytest.mark.slow
def test_learn_labels_a_link_atom_zone_with_its_caps(tmp_path):
    """A side chain cut from its peptide at CA–CB (link atoms): the QM zone of every label is the capped
    fragment (Asp's side chain + cap = acetate), the QM/MM labeller sees the run's boundary charges, and the
    committee's domain record names acetate."""
    import torch

    from potentials.dataset import Dataset
    from potentials.domain import formula

    frag = Path(__file__).resolve().parents[2] / "inputs" / "examples" / "fragments" / "ACE-ASP-NME.pdb"
    assert cli(["prepare", str(frag), "--ml", "resid 2 and not name N H CA HA C O", "--nonperiodic", "--solvate",
                "0.5", "--embedding-cutoff", "0.6", "--out", str(tmp_path / "prep")]) == 0
    (tmp_path / "learn.toml").write_text(CONFIG.replace("max_rounds = 2", "max_rounds = 1")
                                         .replace("[validate]\nframes = 4", "[validate]\nframes = 0"))
    out = tmp_path / "run"
    args = ["learn", str(tmp_path / "prep" / "system.toml"), "--out", str(out), "--config", str(tmp_path / "learn.toml")]
    assert cli([*args, "--seed-only"]) == 0                 # a dataset only: sampled, labelled, not trained
    assert json.loads((out / "learn.json").read_text())["seed_only"]["frames"] == 8
    assert not list(out.glob("round_000/committee*.pt")) and not (out / "model.pt").exists()
    fresh = tmp_path / "fresh"          # that dataset shipped and copied into a fresh checkout's folder (as
    fresh.mkdir()                       # label_fragments.sh does): it holds the budget, so no seed MD runs again
    shutil.copy(out / "data.nc", fresh / "data.nc")
    assert cli([*args[:3], str(fresh), *args[4:], "--seed-only", "--max-frames", "8"]) == 0
    assert "held the frame budget" in json.loads((fresh / "learn.json").read_text())["seed_only"]["reason"]
    assert not (fresh / "round_000" / "seed").exists()
    assert cli(args) == 0                                   # the same folder goes on to a committee
    with Dataset.open(out / "data.nc") as ds:
        frames = [ds.frame(i) for i in range(len(ds))]
    assert frames and all(formula(f["numbers"]) == "C2H3O2" and int(f["total_charge"]) == -1 for f in frames)
    r = frames[0]["positions"]
    cap = r[-1]                                             # the cap: last QM atom, 1.09 Å from CB
    charged = frames[0]["mm_positions"][np.abs(frames[0]["mm_charges"]) > 0]
    assert abs(np.linalg.norm(cap - r[0]) - 1.09) < 0.15
    assert np.min(np.linalg.norm(charged - cap, axis=1)) > 1.0     # no charge on the cap: CA's moved to N, HA, C
    meta = torch.load(out / "model.pt", weights_only=True)["metadata"]
    assert {"formula": "C2H3O2", "charge": -1} in meta["domain"]["molecules"]


def test_init_model_fine_tunes_from_the_shipped_model(tmp_path):
    """[train] init_model: round 0's members start from that model (its architecture, D3 and damping); later
    rounds warm-start from their predecessors; a zone with an element the model lacks (S) widens it."""
    from driver.learn import Learner
    from driver.learn_train import _train_config
    from potentials.model_io import read_model_file

    shipped = Path(__file__).resolve().parents[2] / "inputs" / "models" / "small_b3lyp_svp.pt"
    system = _prepare(tmp_path)
    cfg = LearnConfig.from_dict({"train": {"init_model": str(shipped)}})
    learner = Learner(system, tmp_path / "ft", cfg)
    c0, c1 = _train_config(learner, 0), _train_config(learner, 1)
    assert c0.init_model == str(shipped.resolve()) and not c1.init_model and c0.lr == cfg.train.warm_lr
    assert c0.model == read_model_file(shipped)["config"] == c1.model
    frag = Path(__file__).resolve().parents[2] / "inputs" / "examples" / "fragments" / "ACE-CYS-NME.pdb"
    assert cli(["prepare", str(frag), "--ml", "resid 2 and not name N H CA HA C O", "--nonperiodic", "--solvate",
                "0.5", "--embedding-cutoff", "0.6", "--out", str(tmp_path / "cys")]) == 0
    cys = Learner(tmp_path / "cys" / "system.toml", tmp_path / "ft2", cfg)
    assert _train_config(cys, 0).model["elements"] == [1, 6, 7, 8, 16]
    # [final] init_model = "auto": [train] init_model, else the shipped network at its own level and preset only
    from driver.learn_train import SHIPPED_MODEL, final_init_model
    assert final_init_model(learner) == str(shipped)
    assert final_init_model(Learner(system, tmp_path / "d1", LearnConfig())) == str(SHIPPED_MODEL)
    for raw in ({"level": {"xc": "hf", "basis": "sto-3g"}}, {"train": {"preset": "tiny"}},
                {"final": {"init_model": "none"}}):
        assert final_init_model(Learner(system, tmp_path / "d2", LearnConfig.from_dict(raw))) == "", raw


@pytest.mark.slow
def test_seed_model_samples_round_0_by_ml_mm(tmp_path):
    """--seed-model: round 0 is sampled by ML/MM MD with the given model (here the shipped network, which knows C, H
    and O) instead of MM with an elastic zone; the frames are labelled like MM seeds and the model keeps the
    molecule bonded. The cached segments are reused when the command runs again."""
    from potentials.dataset import Dataset

    shipped = Path(__file__).resolve().parents[2] / "inputs" / "models" / "small_b3lyp_svp.pt"
    pdb = tmp_path / "formaldehyde.pdb"
    pdb.write_text(FORMALDEHYDE)
    assert cli(["prepare", str(pdb), "--ml", "resname FOR", "--nonperiodic", "--solvate", "0.5",
                "--out", str(tmp_path / "prep")]) == 0          # the shipped model's embedding cutoff (1.2 nm)
    system = tmp_path / "prep" / "system.toml"
    (tmp_path / "learn.toml").write_text(CONFIG.replace("[validate]\nframes = 4", "[validate]\nframes = 0"))
    out = tmp_path / "run"
    args = ["learn", str(system), "--out", str(out), "--config", str(tmp_path / "learn.toml"), "--seed-only",
            "--seed-model", str(shipped)]
    assert cli(args) == 0
    st = json.loads((out / "round_000" / "state.json").read_text())
    assert st["record"] == {"model": str(shipped.resolve())}
    z = np.load(out / "round_000" / "frames.npz")
    assert len(z["frame_id"]) == 8 and all(str(t).startswith("r000/ml-") for t in z["trajectory"])
    md = z["positions"][z["displaced"] == 0][:, :4] * 10.0                 # formaldehyde, Å
    co = np.linalg.norm(md[:, 1] - md[:, 0], axis=1)
    ch = np.linalg.norm(md[:, 2:] - md[:, :1], axis=2)
    assert np.all((co > 1.05) & (co < 1.45)) and np.all((ch > 0.9) & (ch < 1.35)), (co, ch)
    assert np.ptp(md[:, 0], axis=0).max() > 1e-3                           # the frames are not one structure
    segs = sorted((out / "round_000" / "seed").glob("ml-T*/seg_*.npz"))
    assert len(segs) == 4 and not list((out / "round_000" / "seed").glob("T*"))
    with Dataset.open(out / "data.nc") as ds:
        assert len(ds) == 8
    stamp = [p.stat().st_mtime_ns for p in segs]
    assert cli(args) == 0
    assert [p.stat().st_mtime_ns for p in segs] == stamp


@pytest.mark.slow
def test_seed_frames_exported_labelled_elsewhere_and_imported(tmp_path, capsys):
    """--seed-only --export-jobs: round 0 is sampled and its QM inputs written (no dataset, no QM); labelled by
    `python -m potentials.qm_jobs` and imported with `mlmm label --import-labels`, they are the frames a plain
    --seed-only run would label: run in the same folder it finds nothing left, and a label equals a direct PySCF
    calculation of the stored inputs."""
    from potentials.dataset import Dataset
    from potentials.qmmm_reference import LevelOfTheory, label_frame

    system = _prepare(tmp_path)
    (tmp_path / "learn.toml").write_text(CONFIG.replace("[validate]\nframes = 4", "[validate]\nframes = 0"))
    out, jobs, labels = tmp_path / "run", tmp_path / "jobs.npz", tmp_path / "labels.npz"
    args = ["learn", str(system), "--out", str(out), "--config", str(tmp_path / "learn.toml"), "--seed-only"]
    assert cli([*args, "--export-jobs", str(jobs)]) == 0
    assert jobs.exists() and not (out / "data.nc").exists()
    r = subprocess.run([sys.executable, "-m", "potentials.qm_jobs", str(jobs), str(labels), "--qm-device", "cpu",
                        "--workers", "2"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert cli(["label", "--out", str(out / "data.nc"), "--import-labels", str(labels)]) == 0
    stamp = (out / "data.nc").stat().st_mtime_ns
    assert cli(args) == 0                                   # nothing left to label: the ids are learn's own
    assert (out / "data.nc").stat().st_mtime_ns == stamp
    assert json.loads((out / "learn.json").read_text())["seed_only"]["frames"] == 8
    with Dataset.open(out / "data.nc") as ds:
        assert len(ds) == 8 and ds.attrs["qm_xc"] == "hf" and "mlmm learn" in ds.attrs["title"]
        f = ds.frame(3)
    lab = label_frame(f["numbers"], f["positions"], int(f["total_charge"]), f["mm_positions"], f["mm_charges"],
                      LevelOfTheory(xc="hf", basis="sto-3g", auxbasis="weigend", conv_tol=1e-8))
    assert abs(lab.energy - float(f["energy"])) < 1e-6
    np.testing.assert_allclose(lab.forces, f["forces"], atol=1e-4)
    capsys.readouterr()
    assert cli(["learn", str(system), "--out", str(tmp_path / "x"), "--config", str(tmp_path / "learn.toml"),
                "--export-jobs", str(jobs)]) == 2
    assert "--export-jobs goes with --seed-only" in capsys.readouterr().err


def test_frames_skipped_by_label_import_or_learn_are_not_labelled_again(tmp_path):
    """A learner's SCF failures live where `mlmm label` and `--import-labels` put them (``DIR/data.skipped.txt``);
    the list earlier versions wrote (``DIR/skipped.txt``) is still honoured, and only the rest is pending."""
    from types import SimpleNamespace

    from driver.learn_label import _pending
    from potentials.qmmm_reference import add_skipped, skipped_path

    learner = SimpleNamespace(out=tmp_path, dataset=tmp_path / "data.nc")
    np.savez(tmp_path / "frames.npz", frame_id=np.array(["a", "b", "c", "d"]))
    assert skipped_path(learner.dataset) == tmp_path / "data.skipped.txt"
    add_skipped(skipped_path(learner.dataset), [("b", "SCF did not converge")])
    add_skipped(tmp_path / "skipped.txt", [("c", "SCF did not converge")])
    _, todo = _pending(learner, tmp_path / "frames.npz", {"a"})
    assert todo == [3]

"""Committees end to end on the driver side: `mlmm train --committee 2` writes a loadable committee (and its
members, resumably), and the uncertainty guard of the ML client (driver/uncertainty.py) trips after N
consecutive requests over its threshold and not before. Real parts: the tiny dataset and network, a real ML
engine on a TIP3P water cluster, the client's own `evaluate`."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from driver.cli import build_parser, main
from driver.client import ForceGuard, evaluate
from driver.uncertainty import UncertaintyGuard, uncertainty_options
from potentials.core.errors import CalculationFailed, SetupError

ROOT = Path(__file__).resolve().parents[2]
TINY_DATA = ROOT / "tests" / "data" / "tiny_qmmm.nc"
TINY = ROOT / "inputs" / "models" / "configs" / "tiny.toml"


def _config(folder: Path, epochs: int = 2, committee: int = 1) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "train.toml"
    path.write_text(f'[model]\npreset = "tiny"\n[data]\npath = "{TINY_DATA}"\nsnapshot = false\n'
                    f'[train]\nseed = 7\nepochs = {epochs}\nbatch_size = 4\nthreads = 1\nprogress = false\n'
                    f'committee = {committee}\n'
                    '[optim]\nlr = 3e-3\nplateau_patience = 100\n[output]\nmodel = "c.pt"\n')
    return path


def test_train_committee_writes_a_loadable_committee_and_resumes(tmp_path):
    from potentials.adapters import load_adapter
    from potentials.committee import CommitteeAdapter

    assert main(["train", str(_config(tmp_path / "a", committee=2))]) == 0          # [train] committee = 2
    members = [tmp_path / "a" / f"c.member{k}.pt" for k in range(2)]
    assert all(p.is_file() and p.with_suffix(".ckpt").is_file() for p in members)
    d = torch.load(tmp_path / "a" / "c.pt", weights_only=True)
    meta = d["metadata"]
    assert meta["committee"]["n_members"] == 2 and meta["committee"]["seeds"] == [7, 8]
    assert meta["embedding"]["scheme"] == "electrostatic" and "domain" in meta
    splits = [m["metadata"]["split"] for m in d["members"]]
    assert splits[0]["kind"] == "dataset" and splits[1]["kind"] == "by-trajectory"
    assert d["members"][1]["metadata"]["n_val"] > 0
    adapter = load_adapter(tmp_path / "a" / "c.pt")
    assert isinstance(adapter, CommitteeAdapter) and adapter.n_members == 2
    a, b = (m.module.state_dict() for m in adapter.members)
    assert not all(torch.equal(a[k], b[k]) for k in a)                  # different seeds: different members

    # interrupted after 1 epoch, resumed to 2: the same committee as the uninterrupted run
    assert main(["train", str(_config(tmp_path / "b", epochs=1)), "--committee", "2"]) == 0
    assert main(["train", str(_config(tmp_path / "b", epochs=2)), "--committee", "2", "--resume"]) == 0
    e = torch.load(tmp_path / "b" / "c.pt", weights_only=True)
    for ma, mb in zip(d["members"], e["members"]):
        for k, v in ma["state_dict"].items():
            assert torch.equal(v, mb["state_dict"][k]), k
    # once finished, a rerun with --resume keeps the members (their files untouched) and writes the committee
    stamps = [(tmp_path / "b" / f"c.member{k}.pt").stat().st_mtime_ns for k in range(2)]
    assert main(["train", str(_config(tmp_path / "b", epochs=2)), "--committee", "2", "--resume"]) == 0
    assert [(tmp_path / "b" / f"c.member{k}.pt").stat().st_mtime_ns for k in range(2)] == stamps


# ------------------------------------------------------------------------------------------------ the guard
@pytest.fixture(scope="module")
def committee_engine():
    """An ML engine running a 3-member tiny committee on water 0 of six TIP3P waters (no box), and positions."""
    from coupling.embedding import MMEnvironment
    from coupling.ml_engine import MLEngine
    from coupling.mmsystem import mm_charges
    from potentials.committee import CommitteeAdapter
    from potentials.network import EmbeddedAIMNet2, ModelConfig

    from run_helpers import tip3p_waters

    topology, system, pos = tip3p_waters(6, 1.2)
    residues = np.array([a.residue.index for a in topology.atoms()])
    numbers = np.array([a.element.atomic_number for a in topology.atoms()])
    env = MMEnvironment(mm_charges(system), residues, np.arange(3), cutoff=0.9, switch_width=0.3)
    nets = [EmbeddedAIMNet2(ModelConfig.from_toml(TINY), seed=s).double() for s in (1, 2, 3)]
    return MLEngine(CommitteeAdapter(nets), numbers[:3], 0, env, mode="electrostatic", periodic=False), pos


def _spread(engine, pos) -> float:
    return engine.compute(pos[None])[0].extras["ml.committee"]["force_std_max"]


def test_guard_trips_after_n_requests_over_the_threshold_and_not_before(committee_engine):
    engine, pos = committee_engine
    value = _spread(engine, pos)
    assert value > 0
    watch = UncertaintyGuard(0.5 * value, steps=3)
    guard = ForceGuard(None, uncertainty=watch)
    x = pos[None]
    evaluate(engine, x, None, batched=False, guard=guard, request=1)
    evaluate(engine, x, None, batched=False, guard=guard, request=2)
    watch.max_force_std = 2.0 * value                         # one request below the threshold resets the count
    evaluate(engine, x, None, batched=False, guard=guard, request=3)
    assert watch.count == 0
    watch.max_force_std = 0.5 * value
    evaluate(engine, x, None, batched=False, guard=guard, request=4)
    evaluate(engine, x, None, batched=False, guard=guard, request=5)
    with pytest.raises(CalculationFailed, match=r"request 6 .*force_std_max = .* above --max-force-uncertainty "
                                                r".* for 3 consecutive requests") as err:
        evaluate(engine, x, None, batched=False, guard=guard, request=6)
    assert "\n" not in str(err.value)


def test_guard_flags_instead_of_stopping(committee_engine, caplog):
    engine, pos = committee_engine
    watch = UncertaintyGuard(0.5 * _spread(engine, pos), steps=2, action="flag")
    guard = ForceGuard(None, uncertainty=watch)
    results = []
    for request in (1, 2, 3):
        results.append(engine.compute(pos[None]))
        watch.observe(results[-1], request)
    assert [("flagged" in r[0].extras["ml.committee"]) for r in results] == [False, True, True]
    assert watch.tripped == 1 and "uncertain structure at request 2" in caplog.text
    evaluate(engine, pos[None], None, batched=False, guard=guard, request=4)        # flags, sends


def test_guard_options_and_refusals(committee_engine, tmp_path):
    from coupling.ml_engine import MLEngine
    from potentials.network import EmbeddedAIMNet2, ModelConfig

    with pytest.raises(SetupError, match="--max-force-uncertainty -1"):
        UncertaintyGuard(-1.0)
    with pytest.raises(SetupError, match="--uncertainty-steps 0"):
        UncertaintyGuard(1.0, steps=0)
    engine, _ = committee_engine
    single = MLEngine(EmbeddedAIMNet2(ModelConfig.from_toml(TINY), seed=1).double(), engine.zone.numbers, 0,
                      engine.env, mode="electrostatic", periodic=False)
    with pytest.raises(SetupError, match="needs a committee model"):
        UncertaintyGuard(1.0).check_engine(single)
    UncertaintyGuard(1.0).check_engine(engine)
    args = build_parser().parse_args(["run", "x.xml", "--system", "s.toml", "--model", "c.pt",
                                      "--max-force-uncertainty", "40", "--uncertainty-steps", "5",
                                      "--uncertainty-action", "flag"])
    assert uncertainty_options(args) == {"max_force_uncertainty": 40.0, "uncertainty_steps": 5,
                                         "uncertainty_action": "flag"}
    from driver.rundir import client_argv_factory

    argv = client_argv_factory(tmp_path / "s.toml", tmp_path / "c.pt", "cpu", None, False,
                               model_options=uncertainty_options(args))("ml", "unix:x")
    parsed = build_parser().parse_args(argv[argv.index("client"):])
    assert UncertaintyGuard.from_args(parsed).__dict__ == UncertaintyGuard(40.0, 5, "flag").__dict__


@pytest.mark.timeout(240)
def test_mlmm_run_stops_on_the_uncertainty_guard(tmp_path):
    """`mlmm run ... --max-force-uncertainty F --uncertainty-steps 3`: the flags reach the ML client, which stops
    the run at its third request with the one-line diagnosis (exit code 2: no automatic restart)."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from run_helpers import water_cluster_spec

    from potentials.committee import save_committee
    from potentials.network import EmbeddedAIMNet2, ModelConfig

    water_cluster_spec(tmp_path).save(tmp_path / "system.toml")
    save_committee(tmp_path / "c.pt", [EmbeddedAIMNet2(ModelConfig.from_toml(TINY), seed=s) for s in (1, 2)])
    argv = ["run", str(ROOT / "inputs" / "templates" / "nvt_bussi.xml"), "--system", str(tmp_path / "system.toml"),
            "--model", str(tmp_path / "c.pt"), "--steps", "30", "--out", str(tmp_path / "run"), "--no-progress",
            "--threads", "1+1", "--max-force-uncertainty", "1e-6", "--uncertainty-steps", "3"]
    assert main(argv) == 2
    log = (tmp_path / "run" / "client_ml.log").read_text()
    assert "uncertain structure at request 3 " in log and "--max-force-uncertainty 1e-06 kJ/mol/nm" in log
    # a single model is refused before anything starts
    from potentials.model_io import save_model

    save_model(tmp_path / "one.pt", EmbeddedAIMNet2(ModelConfig.from_toml(TINY), seed=1))
    argv[argv.index("--model") + 1], argv[argv.index("--out") + 1] = str(tmp_path / "one.pt"), str(tmp_path / "r2")
    assert main(argv) == 2 and not (tmp_path / "r2").exists()

    # --uncertainty-action flag: the run goes on, the structures are flagged, `mlmm analyze` plots the spread
    xml = (ROOT / "inputs" / "templates" / "nvt_bussi_committee.xml").read_text()      # the shipped template
    assert "extra_type='ml.uncertainty'" in xml
    xml = xml.replace("stride='10'", "stride='2'")
    (tmp_path / "flag.xml").write_text(xml)
    argv[1], argv[argv.index("--model") + 1] = str(tmp_path / "flag.xml"), str(tmp_path / "c.pt")
    argv[argv.index("--out") + 1], argv[argv.index("--steps") + 1] = str(tmp_path / "r3"), "10"
    assert main(argv + ["--uncertainty-action", "flag"]) == 0
    log = (tmp_path / "r3" / "client_ml.log").read_text()
    assert log.count("uncertain structure at request 3 ") == 1 and "flagged, running on" in log
    assert main(["analyze", str(tmp_path / "r3")]) == 0
    assert (tmp_path / "r3" / "analysis" / "uncertainty.png").stat().st_size > 1000
    summary = (tmp_path / "r3" / "analysis" / "summary.txt").read_text()
    assert "largest committee force spread" in summary

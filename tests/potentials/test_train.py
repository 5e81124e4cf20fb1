"""Training pipeline: the loss falls, resume reproduces an uninterrupted run, the baseline is plain Coulomb.

Real parts only: the tiny labelled QM/MM dataset shipped in tests/data, the real network (tiny preset).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from coupling.schemes import SCHEMES
from potentials.core.errors import SetupError
from potentials.core.units import COULOMB_EV_ANGSTROM
from potentials import evaluate as EV
from potentials import train as T

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "tests" / "data" / "tiny_qmmm.nc"
ELECTROSTATIC = SCHEMES.get("electrostatic")()
MECHANICAL = SCHEMES.get("mechanical")()
BOTH = {"electrostatic": ELECTROSTATIC, "mechanical": MECHANICAL}


def _cfg(tmp_path: Path, **over) -> T.TrainConfig:
    raw = {
        "model": {"preset": "tiny"},
        "data": {"path": str(TINY), "snapshot": False},
        "train": {"seed": 7, "epochs": 2, "batch_size": 4, "threads": 1, "progress": False},
        "optim": {"lr": 3e-3, "plateau_patience": 100},
        "loss": {"energy": 1.0, "forces": 1.0, "mm_forces": 1.0, "dipole": 0.1},
        "output": {"model": str(tmp_path / "m.pt")},
    }
    for section, values in over.items():
        raw[section] = {**raw[section], **values}
    return T.TrainConfig.from_dict(raw, base=tmp_path)


@pytest.fixture(scope="module")
def frames():
    if not TINY.is_file():
        pytest.fail(f"{TINY} missing (written by the QM/MM reference helper)")
    return T.load_frames(TINY, "all")


def test_config_rejects_unknown_keys(tmp_path):
    with pytest.raises(SetupError, match="unknown key"):
        _cfg(tmp_path, optim={"learning_rate": 1e-3})
    with pytest.raises(SetupError, match="preset"):
        T.TrainConfig.from_dict({"model": {"preset": "no-such-preset"}, "data": {"path": "x"},
                                 "output": {"model": "y"}}, base=tmp_path)
    # types are checked by the one config loader; the error names the file and the key
    path = tmp_path / "train.toml"
    path.write_text('[model]\npreset = "tiny"\n[data]\npath = "d.nc"\n[output]\nmodel = "m.pt"\n'
                    '[optim]\nlr = "fast"\n')
    with pytest.raises(SetupError, match=r"train\.toml lr: expected a number"):
        T.TrainConfig.from_toml(path)
    assert _cfg(tmp_path).embedding == "electrostatic"
    assert _cfg(tmp_path, train={"embedding": "mechanical"}).embedding == "mechanical"


def test_self_energy_fit_recovers_exact_atomic_energies(frames):
    elements = sorted({int(z) for f in frames for z in f["numbers"]})
    true = {z: -13.6 * z - 0.1 * z * z for z in elements}
    fake = [{**f, "energy": sum(true[int(z)] for z in f["numbers"])} for f in frames]
    counts = np.array([[np.sum(np.asarray(f["numbers"]) == z) for z in elements] for f in fake])
    if np.linalg.matrix_rank(counts) < len(elements):
        pytest.skip("tiny dataset compositions do not determine every element")
    sae = T.fit_self_energies(fake, elements)
    np.testing.assert_allclose(sae, [true[z] for z in elements], rtol=1e-10)


def test_loss_falls_in_a_few_steps(tmp_path, frames):
    torch.manual_seed(0)
    cfg = _cfg(tmp_path)
    model = T.build_model(cfg, "cpu")
    train_frames = T.load_frames(TINY, "train") or frames
    T.set_self_energies(model, T.fit_self_energies(train_frames, [int(z) for z in model.config.elements]))
    opt = T._make_optimizer(model, cfg)
    b = T.collate(train_frames[:8], "cpu")

    def loss():
        return T.total_loss(T.loss_terms(T.predict(model, b, ELECTROSTATIC, create_graph=True), b), cfg)

    first = float(loss().detach())
    for _ in range(15):
        opt.zero_grad()
        lo = loss()
        lo.backward()
        opt.step()
    last = float(loss().detach())
    assert math.isfinite(first) and last < 0.5 * first, (first, last)


def test_train_writes_model_curve_checkpoint_and_resume_is_exact(tmp_path):
    from potentials.model_io import load_model

    # uninterrupted: 2 epochs
    full = _cfg(tmp_path / "a", output={"model": str(tmp_path / "a" / "m.pt")})
    T.train(full, scheme=ELECTROSTATIC)
    # interrupted after 1 epoch, then resumed to 2
    part = _cfg(tmp_path / "b", output={"model": str(tmp_path / "b" / "m.pt")}, train={"epochs": 1})
    T.train(part, scheme=ELECTROSTATIC)
    part.epochs = 2
    T.train(part, resume=True, scheme=ELECTROSTATIC)

    for d in ("a", "b"):
        assert (tmp_path / d / "m_curve.png").stat().st_size > 1000
        assert (tmp_path / d / "m.ckpt").is_file()
    ca = torch.load(tmp_path / "a" / "m.ckpt", weights_only=False)
    cb = torch.load(tmp_path / "b" / "m.ckpt", weights_only=False)
    assert ca["state"]["epoch"] == cb["state"]["epoch"] == 2
    for k, v in ca["model"].items():
        assert torch.equal(v, cb["model"][k]), k
    assert ca["state"]["history"][-1]["val_loss"] == cb["state"]["history"][-1]["val_loss"]
    ma, mb = load_model(tmp_path / "a" / "m.pt"), load_model(tmp_path / "b" / "m.pt")
    for (k, v), w in zip(ma.state_dict().items(), mb.state_dict().values()):
        assert torch.equal(v, w), k
    assert ma.metadata["best_epoch"] >= 1
    # the training embedding is stamped from the dataset's attributes (tiny_qmmm.nc: labelled at 0.6 / 0.2 nm)
    emb = ma.metadata["embedding"]
    assert emb["scheme"] == "electrostatic" == ma.metadata["training"]["embedding"]
    assert (emb["cutoff_nm"], emb["switch_nm"], emb["long_range"]) == (0.6, 0.2, "none")
    assert "TIP3P" in emb["mm_charges"] and str(TINY) in emb["source"]
    # the scheme object must be the one the config names
    with pytest.raises(SetupError, match="embedding 'electrostatic' needs that scheme"):
        T.train(full, scheme=MECHANICAL)
    with pytest.raises(SetupError, match="needs that scheme"):
        T.train(full)


def test_weight_average_is_validated_checkpointed_and_resumed_exactly(tmp_path):
    """``[optim] ema_decay``: each epoch the better of the weights and their moving average (by validation score)
    is the candidate; the saved model re-evaluates to the recorded best score; resume restores the average."""
    from potentials.model_io import load_model

    full = _cfg(tmp_path / "a", optim={"ema_decay": 0.9}, train={"epochs": 3},
                output={"model": str(tmp_path / "a" / "m.pt")})
    T.train(full, scheme=ELECTROSTATIC)
    part = _cfg(tmp_path / "b", optim={"ema_decay": 0.9}, train={"epochs": 1},
                output={"model": str(tmp_path / "b" / "m.pt")})
    T.train(part, scheme=ELECTROSTATIC)
    part.epochs = 3
    T.train(part, resume=True, scheme=ELECTROSTATIC)

    ca = torch.load(tmp_path / "a" / "m.ckpt", weights_only=True)
    cb = torch.load(tmp_path / "b" / "m.ckpt", weights_only=True)
    for k, v in ca["ema"].items():
        assert torch.equal(v, cb["ema"][k]), k
    averaged = {k.removeprefix("module."): v for k, v in ca["ema"].items() if k.startswith("module.")}
    assert any(not torch.equal(v, averaged[k]) for k, v in ca["model"].items() if v.is_floating_point())
    for h in ca["state"]["history"]:
        assert h["val_score"] == min(h["val_score_raw"], h["val_score_ema"])
    untimed = [[{k: v for k, v in h.items() if k != "seconds"} for h in c["state"]["history"]] for c in (ca, cb)]
    assert untimed[0] == untimed[1]
    model = load_model(tmp_path / "a" / "m.pt")
    val = T.load_frames(TINY, "val")
    rescored = T.evaluate_loss(model, val, full, "cpu", next(model.parameters()).dtype, ELECTROSTATIC)["score"]
    assert rescored == pytest.approx(ca["state"]["best_val"], rel=1e-5)
    # the curve gets a third panel, the validation score of the weights beside the average's (PNG width: IHDR)
    width = int.from_bytes((tmp_path / "a" / "m_curve.png").read_bytes()[16:20], "big")
    assert width == 15 * 90
    with pytest.raises(SetupError, match="ema_decay must be in"):
        _cfg(tmp_path / "c", optim={"ema_decay": 1.0})


def test_training_embedding_falls_back_to_the_labelling_defaults(tmp_path):
    """A dataset that records no embedding cutoff/switch: the model's metadata says so and assumes the defaults
    `mlmm label` uses (those of [coupling])."""
    import shutil

    import netCDF4

    from potentials.core.spec import CouplingSpec

    bare = tmp_path / "bare.nc"
    shutil.copyfile(TINY, bare)
    with netCDF4.Dataset(bare, "a") as nc:
        for key in ("embedding_cutoff_nm", "embedding_switch_nm", "mm_model"):
            nc.delncattr(key)
    emb = T.training_embedding(_cfg(tmp_path, data={"path": str(bare)}))
    assert (emb["cutoff_nm"], emb["switch_nm"]) == (CouplingSpec().cutoff_nm, CouplingSpec().switch_width_nm)
    assert emb["source"].startswith("labelling defaults") and emb["scheme"] == "electrostatic"


def test_mechanical_baseline_is_coulomb_of_vacuum_charges(tmp_path, frames):
    """Mechanical mode = vacuum model + fixed-charge Coulomb: check energy and MM forces by hand."""
    torch.manual_seed(1)
    model = T.build_model(_cfg(tmp_path), "cpu").double()
    f = next(f for f in frames if len(f["mm_charges"]) > 0)
    b = T.collate([f], "cpu", torch.float64)
    gas = T.predict(model, b, None)
    mech = T.predict(model, b, MECHANICAL)
    q = gas["charges"].detach().numpy()
    r = np.asarray(f["positions"], float)
    R = np.asarray(f["mm_positions"], float)
    Q = np.asarray(f["mm_charges"], float)
    d = R[None, :, :] - r[:, None, :]                       # [n, M, 3] from ML atom to MM charge
    dist = np.linalg.norm(d, axis=-1)
    e_coul = COULOMB_EV_ANGSTROM * np.sum(q[:, None] * Q[None, :] / dist)
    f_mm = COULOMB_EV_ANGSTROM * np.sum((q[:, None] * Q[None, :] / dist ** 3)[..., None] * d, axis=0)
    # training's phi/E use k_e in eV·Å, as this reference does: float64 round-off only
    assert float((mech["energy"] - gas["energy"]).detach()) == pytest.approx(e_coul, rel=1e-10)
    np.testing.assert_allclose(mech["mm_forces"].detach().numpy(), f_mm, rtol=1e-10, atol=1e-12)


def test_evaluate_table_has_every_solute_and_modes_agree_in_gas_phase(tmp_path, frames):
    torch.manual_seed(2)
    model = T.build_model(_cfg(tmp_path), "cpu")
    res = EV.evaluate(model, frames, batch_size=5, schemes=BOTH)
    solutes = {str(f["solute"]) for f in frames}
    assert solutes <= set(res["electrostatic"]) and "all" in res["mechanical"]
    assert res["electrostatic"]["all"]["n"] == len(frames)
    table = EV.format_table(res)
    for s in solutes:
        assert f"| {s} | electrostatic |" in table and f"| {s} | mechanical |" in table
    gas = [f for f in frames if len(f["mm_charges"]) == 0]
    if gas:
        g = EV.evaluate(model, gas, schemes=BOTH)
        assert g["electrostatic"]["all"]["energy"] == pytest.approx(g["mechanical"]["all"]["energy"], abs=1e-9)


def test_energy_offset_removed_ignores_a_constant_per_solute(tmp_path, frames):
    """Shifting every reference energy of one solute by a constant changes its absolute energy MAE but not the
    MAE with each solute's mean error removed (per solute and for "all"), and that MAE is the spread of the
    signed errors about their mean."""
    torch.manual_seed(3)
    model = T.build_model(_cfg(tmp_path), "cpu")
    one = str(frames[0]["solute"])
    shifted = [dict(f, energy=float(f["energy"]) + (2.0 if str(f["solute"]) == one else 0.0)) for f in frames]
    a = EV.evaluate(model, frames, schemes=BOTH)["electrostatic"]
    b = EV.evaluate(model, shifted, schemes=BOTH)["electrostatic"]
    assert b[one]["energy"] != pytest.approx(a[one]["energy"], abs=1e-3)
    for key in (one, "all"):
        assert b[key]["energy_offset_removed"] == pytest.approx(a[key]["energy_offset_removed"], rel=1e-9)
    mine = [f for f in frames if str(f["solute"]) == one]
    e = np.array([float(T.predict(model, T.collate([f], "cpu"), ELECTROSTATIC)["energy"][0].detach())
                  - float(f["energy"]) for f in mine]) * EV.KCALMOL_PER_EV
    assert a[one]["energy_offset_removed"] == pytest.approx(np.mean(np.abs(e - e.mean())), rel=1e-3, abs=1e-4)
    assert "mean error removed" in EV.format_table({"electrostatic": a})


def test_offset_removed_mae_weights_frames_not_sets():
    """Each set loses its own mean; the MAE is over all frames, so a set of one frame adds a zero."""
    assert EV.offset_removed_mae([[1.0, 3.0], [10.0]]) == pytest.approx(2.0 / 3.0)
    assert EV.offset_removed_mae([np.array([5.0, 5.0, 5.0])]) == 0.0


def test_init_model_widened_to_a_new_element(tmp_path, frames):
    """Fine-tuning a model on data with an element it lacks (S): every weight is kept, sulfur's embedding starts
    as oxygen's (same group), and its self-energy is fitted so that the widened model reproduces the S frames'
    labels; frames without S are predicted exactly as before."""
    from potentials.model_io import load_model

    small = _cfg(tmp_path, model={"config": {"elements": [1, 6, 7, 8]}}, train={"epochs": 1})
    init_path = T.train(small, "cpu", scheme=ELECTROSTATIC)
    init = load_model(init_path, "cpu")
    water = [f for f in frames if sorted(set(f["numbers"].tolist())) == [1, 8]]
    e_water = T.predict(init, T.collate(water, "cpu"), ELECTROSTATIC)["energy"].detach().numpy()
    # H2S stand-ins: water's geometry with S for O, labelled as the init model's water energy + an offset
    offset = -10000.0
    sulfur = [{**f, "numbers": np.where(f["numbers"] == 8, 16, f["numbers"]), "energy": e + offset}
              for f, e in zip(water, e_water)]
    cfg = _cfg(tmp_path, model={"config": {"elements": [1, 6, 7, 8, 16]}},
               train={"init_model": str(init_path)})
    model, _ = T._initial_model(cfg, frames + sulfur, "cpu", ELECTROSTATIC)
    assert [int(z) for z in model.config.elements] == [1, 6, 7, 8, 16]
    sd, old = model.state_dict(), init.state_dict()
    for k, v in old.items():
        if k not in ("embedding", "shift.weight"):
            assert torch.equal(sd[k], v), k
    assert torch.equal(sd["embedding"][4], old["embedding"][3]) and torch.equal(sd["embedding"][:4], old["embedding"])
    assert torch.equal(sd["shift.weight"][:4], old["shift.weight"])
    got = T.predict(model, T.collate(sulfur, "cpu"), ELECTROSTATIC)["energy"].detach().numpy()
    np.testing.assert_allclose(got, e_water + offset, atol=1e-6)
    rest = [f for f in frames if 16 not in f["numbers"]]
    np.testing.assert_allclose(T.predict(model, T.collate(rest, "cpu"), ELECTROSTATIC)["energy"].detach().numpy(),
                               T.predict(init, T.collate(rest, "cpu"), ELECTROSTATIC)["energy"].detach().numpy(),
                               atol=1e-9)
    with pytest.raises(SetupError, match=r"no training frame holds them"):
        T._initial_model(cfg, frames, "cpu", ELECTROSTATIC)


def test_config_base_key_layers_a_config_over_another(tmp_path):
    """``base = "OTHER.toml"``: the other file's keys, its relative paths kept meaning what they meant in its own
    folder, this file's keys laid over table by table ([model.config] key by key, lists replaced)."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "stage1.toml").write_text(
        '[model]\npreset = "tiny"\n[model.config]\nelements = [1, 8]\nd3 = true\n'
        '[data]\npath = "d.nc"\nextra = ["e.nc", "f.nc"]\n[loss]\nenergy = 30.0\nforces = 4.0\n'
        '[optim]\nlr = 5e-5\nema_decay = 0.998\n[train]\nseed = 1\ninit_model = "start.pt"\n'
        '[output]\nmodel = "one.pt"\n')
    (tmp_path / "b" / "stage2.toml").write_text(
        'base = "../a/stage1.toml"\n[model.config]\nelements = [1, 6, 8]\n[data]\nextra = ["g.nc"]\n'
        '[train]\nseed = 2\n[output]\nmodel = "two.pt"\n')
    cfg = T.TrainConfig.from_toml(tmp_path / "b" / "stage2.toml")
    a, b = (tmp_path / "a").resolve(), (tmp_path / "b").resolve()
    assert cfg.seed == 2 and cfg.lr == 5e-5 and cfg.ema_decay == 0.998 and cfg.w_energy == 30.0
    assert cfg.model["elements"] == [1, 6, 8] and cfg.model["d3"] is True      # merged key by key
    assert cfg.dataset == str(a / "d.nc") and cfg.init_model == str(a / "start.pt")   # the base's folder
    assert cfg.extra == [str(b / "g.nc")]                                     # replaced, this file's folder
    assert cfg.output == str(b / "two.pt") and cfg.checkpoint == str(b / "two.ckpt")
    base_alone = T.TrainConfig.from_toml(tmp_path / "a" / "stage1.toml")
    assert base_alone.seed == 1 and base_alone.extra == [str(a / "e.nc"), str(a / "f.nc")]

    (tmp_path / "a" / "stage1.toml").write_text('base = "../b/stage2.toml"\n')
    with pytest.raises(SetupError, match="loop"):
        T.TrainConfig.from_toml(tmp_path / "b" / "stage2.toml")
    (tmp_path / "c.toml").write_text('base = "nowhere.toml"\n')
    with pytest.raises(SetupError, match="nowhere.toml.*no such file"):
        T.TrainConfig.from_toml(tmp_path / "c.toml")


@pytest.mark.parametrize("path", sorted((ROOT / "inputs" / "models").glob("train_*.toml")), ids=lambda p: p.name)
def test_shipped_training_configs_read(path):
    """Every training config the model cards cite is a valid one (keys, types, presets, base files)."""
    cfg = T.TrainConfig.from_toml(path)
    assert cfg.model and cfg.dataset.endswith(".nc") and cfg.output.endswith(".pt")


def test_init_model_widened_to_wider_layers(tmp_path, frames):
    """Fine-tuning into wider layers (hidden, aim_size, out_hidden): the widened network computes what the initial
    one did (energies, ML and MM forces) before training; the added units train (their weights get gradients);
    narrower or deeper layers are refused with the sizes named."""
    from potentials.model_io import load_model

    init_path = T.train(_cfg(tmp_path, train={"epochs": 1}), "cpu", scheme=ELECTROSTATIC)
    init = load_model(init_path, "cpu").double()
    wide = {"hidden": [[48, 24], [40, 16], [32, 20]], "aim_size": 24, "out_hidden": [20]}
    cfg = _cfg(tmp_path, model={"config": wide}, train={"init_model": str(init_path)})
    model, _ = T._initial_model(cfg, frames, "cpu", ELECTROSTATIC)
    model = model.double()
    assert model.passes[0][0].weight.shape[0] == 48 and model.output[0].weight.shape[1] == 24
    batch = T.collate(frames[:6], "cpu", torch.float64)
    a, b = T.predict(init, batch, ELECTROSTATIC), T.predict(model, batch, ELECTROSTATIC)
    for key in ("energy", "forces", "mm_forces"):
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-10)
    loss = T.predict(model.train(), batch, ELECTROSTATIC, create_graph=True)["forces"].square().sum()
    loss.backward()
    assert model.passes[0][2].weight.grad[:, 32:].abs().sum() > 0       # reads the added units of layer 1
    assert model.output[0].weight.grad[:, 16:].abs().sum() > 0            # reads the added AIM channels
    for bad in ({"hidden": [[16, 16], [32, 16], [32, 16]]}, {"hidden": [[32, 16, 8], [32, 16], [32, 16]]},
                {"out_hidden": [16, 16]}):
        with pytest.raises(SetupError, match="may only be widened"):
            T._initial_model(_cfg(tmp_path, model={"config": bad}, train={"init_model": str(init_path)}),
                             frames, "cpu", ELECTROSTATIC)

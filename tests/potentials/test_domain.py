"""The model knows its domain (issue 19): training records the molecules, charges and zone sizes it saw, and the
ML client names, in one warning line, what a zone has that the training data did not."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np
import pytest

from coupling.ml_engine import MLEngine
from potentials.batches import load_frames
from potentials.domain import domain_news, formula, molecules, training_domain
from potentials.model_io import save_model
from potentials.network import EmbeddedAIMNet2, ModelConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "driver"))
from run_helpers import water_cluster_spec  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TEST_SET = ROOT / "inputs" / "data" / "test_b3lyp_svp.nc"


def test_formula_and_molecules():
    assert formula([6, 1, 1, 1, 8, 1]) == "CH4O" and formula([8, 1, 1]) == "H2O" and formula([11]) == "Na"
    assert formula([7, 1, 1, 1, 6, 1, 1, 1]) == "CH6N" and formula([17, 11]) == "ClNa"
    water = np.array([[0.0, 0.0, 0.0], [0.96, 0.0, 0.0], [-0.24, 0.93, 0.0]])
    dimer = np.concatenate([water, water + [2.9, 0.0, 0.0]])            # O…O 2.9 Å: a hydrogen-bonded pair
    parts = molecules([8, 1, 1] * 2, dimer)
    assert [p.tolist() for p in parts] == [[0, 1, 2], [3, 4, 5]]
    # a hydrogen is monovalent: squeezed to 1.40 Å of the other oxygen (within 1.5 x the O-H radii, 1.46 Å) it stays
    # with its own, nearer oxygen, so the pair stays two molecules; H2 stays one
    squeezed = np.concatenate([water, water[[0, 2, 1]] + [0.96 + 1.40, 0.0, 0.0]])
    assert [p.tolist() for p in molecules([8, 1, 1] * 2, squeezed)] == [[0, 1, 2], [3, 4, 5]]
    assert [p.tolist() for p in molecules([1, 1], [[0, 0, 0], [0.74, 0, 0]])] == [[0, 1]]


def test_training_domain_of_the_shipped_test_set():
    dom = training_domain(load_frames(TEST_SET))
    assert dom["elements"] == [1, 6, 7, 8] and dom["ml_molecules"] == 1
    assert {(m["formula"], m["charge"]) for m in dom["molecules"]} == {
        ("H2O", 0), ("CH4O", 0), ("C2H3O2", -1), ("CH6N", 1)}
    assert dom["zone_atoms"] == [3, 8]
    # what is new, named
    assert domain_news(dom, [("CH4O", 0)], 6) == []
    assert domain_news(dom, [("C2H5NO", 0)], 9) == ["molecule C2H5NO (charge +0)", "9 ML atoms (training zones: "
                                                                                   "at most 8)"]
    assert domain_news(dom, [("H2O", None)] * 10, 30) == ["30 ML atoms (training zones: at most 8)"]
    assert domain_news(dom, [("CH4O", 1)], 6) == ["CH4O with charge +1"]
    assert domain_news({}, [("C2H5NO", 0)], 9) == []                   # no record: nothing to say


def test_ml_client_names_what_is_new_at_start_up(tmp_path, caplog):
    spec = water_cluster_spec(tmp_path, embedding="electrostatic", cutoff_nm=1.2)
    spec.save(tmp_path / "system.toml")
    net = EmbeddedAIMNet2(ModelConfig.from_toml(ROOT / "inputs/models/configs/tiny.toml"), seed=1)
    methanol_only = {"elements": [1, 6, 8], "molecules": [{"formula": "CH4O", "charge": 0}],
                     "zone_atoms": [6, 6], "ml_molecules": 1}
    save_model(tmp_path / "m.pt", net, {"domain": methanol_only})
    with caplog.at_level(logging.WARNING):
        MLEngine.from_spec(tmp_path / "system.toml", tmp_path / "m.pt")
    lines = [r.getMessage() for r in caplog.records if "was not trained on" in r.getMessage()]
    assert len(lines) == 1 and "molecule H2O (charge +0)" in lines[0] and "CH4O" in lines[0]
    caplog.clear()
    save_model(tmp_path / "w.pt", net, {"domain": training_domain(load_frames(TEST_SET))})
    with caplog.at_level(logging.WARNING):
        MLEngine.from_spec(tmp_path / "system.toml", tmp_path / "w.pt")
    assert not [r for r in caplog.records if "was not trained on" in r.getMessage()]


def _side_chain_zone(pdb: Path):
    """Topology of a capped fragment and its side chain cut at CA-CB (the link-atom zone of label_fragments.sh)."""
    from openmm.app import PDBFile
    top = PDBFile(str(pdb)).topology
    ml = [a.index for a in top.atoms() if a.residue.index == 1 and a.name not in ("N", "H", "CA", "HA", "C", "O")]
    return top, ml


def test_tautomers_are_told_apart():
    """HID and HIE (H on ND1 or NE2) share the formula C4H6N2; their bond graphs differ. The bond graph of the
    shipped HIE frames (from geometry) equals that of an HIE zone cut from a PDB (from its topology, with the cap),
    a model trained on HID but not HIE warns for an HIE zone only (stage 11 of the zones model did), and the
    shipped zones model, trained on both, warns for neither."""
    from coupling.zones import zone_formulas
    from potentials.domain import graph_key
    from potentials.model_io import read_model_file
    ring = [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5), (5, 1)]          # CB-CG, CG-ND1-CE1-NE2-CD2-CG
    z = [6, 6, 7, 6, 7, 6, 1]
    hid, hie = graph_key(z, ring + [(2, 6)]), graph_key(z, ring + [(4, 6)])
    assert hid != hie
    perm = [3, 0, 6, 2, 5, 1, 4]
    where = {p: i for i, p in enumerate(perm)}
    assert graph_key([z[p] for p in perm], [(where[a], where[b]) for a, b in ring + [(2, 6)]]) == hid
    frags = ROOT / "inputs" / "examples" / "fragments"
    zones = {name: zone_formulas(*_side_chain_zone(frags / f"ACE-{name}-NME.pdb"), 0) for name in ("HID", "HIE")}
    assert zones["HID"][0][:2] == zones["HIE"][0][:2] == ("C4H6N2", 0) and zones["HID"][0][2] != zones["HIE"][0][2]
    # one graph per ring: the displaced copies (a strongly displaced one has a ring 1,3 pair at 1.27 x the radii
    # sum) are not read for graphs; the imidazolium's 80 frames gave 3 graphs, its MD frames 1
    shipped_hie = training_domain(load_frames(ROOT / "inputs" / "data" / "fragments" / "HIE.nc"))
    assert shipped_hie["graphs"]["C4H6N2"] == [zones["HIE"][0][2]]
    assert len(training_domain(load_frames(ROOT / "inputs" / "data" / "fragments" / "HIP.nc"))["graphs"]["C4H7N2"]) == 1
    dom = training_domain(load_frames(ROOT / "inputs" / "data" / "fragments" / "HID.nc"))
    assert domain_news(dom, zones["HID"], 12) == []
    assert domain_news(dom, zones["HIE"], 12) == [
        "C4H6N2 bonded differently from every training C4H6N2 (another isomer or tautomer)"]
    shipped = read_model_file(ROOT / "inputs" / "models" / "small_b3lyp_svp_zones.pt")["metadata"]["domain"]
    assert domain_news(shipped, zones["HID"], 12) == domain_news(shipped, zones["HIE"], 12) == []
    old = {k: v for k, v in dom.items() if k != "graphs"}
    assert domain_news(old, zones["HIE"], 12) == []                  # a record without graphs: formula only

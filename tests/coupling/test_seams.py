"""The seams of docs/architecture.md take a new capability as one class plus one registration.

A dummy embedding scheme ("no ML–MM electrostatics": the network in vacuum, ML charges zero in the MM client)
is registered here and nothing else is touched; the ML engine, the MM-system surgery, the bookkeeping check,
training's energy of labelled frames and the ownership table then all run it. A dummy engine kind and a dummy
ML-zone mapping are dispatched the same way.
"""
from pathlib import Path

import numpy as np
import pytest
import torch

from coupling.bookkeeping import check_split
from coupling.embedding import MMEnvironment
from coupling.engines import ENGINES, EngineOptions, build_engine
from coupling.ml_engine import MLEngine
from coupling.mmsystem import mlmm_mm_system, mm_charges
from coupling.schemes import SCHEMES, EmbeddingScheme, Term
from coupling.zones import ZONES, WholeMolecules
from coupling_cases import openmm_energy_forces
from oracle import ForceFieldOracle
from potentials.core.errors import SetupError


class NoCoulomb(EmbeddingScheme):
    """The zone in vacuum and no ML–MM Coulomb at all (a deliberately incomplete physics, for the test)."""

    name = "test-no-coulomb"
    field_inputs = False
    coulomb_terms = (Term("ML–MM Coulomb", "nobody (test scheme)"),)

    def ml_charges_in_mm(self, mm_charges, fixed):
        return np.zeros(np.shape(mm_charges))

    def network_energy(self, model, numbers, positions, mol_idx, charge, phi, field):
        out = model(numbers, positions, mol_idx, charge, torch.zeros_like(phi), torch.zeros_like(field))
        return out["energy"], out


@pytest.fixture
def no_coulomb():
    SCHEMES.register(NoCoulomb.name, NoCoulomb)
    yield NoCoulomb()
    SCHEMES.unregister(NoCoulomb.name)


def _engine(case, mode):
    residues = np.array([a.residue.index for a in case.topology.atoms()])
    env = MMEnvironment(mm_charges(case.system), residues, case.ml, cutoff=0.9, switch_width=0.3)
    return MLEngine(ForceFieldOracle(case.system, case.ml), case.numbers(), case.charge, env, mode=mode,
                    periodic=False)


def test_a_registered_scheme_runs_everywhere(cluster, no_coulomb):
    pos = cluster.positions
    # ML client: the zone in vacuum, as in mechanical embedding (whose ML side is the same)
    engine = _engine(cluster, NoCoulomb.name)
    assert engine.mode == NoCoulomb.name
    res = engine.compute(pos[None], None)[0]
    ref = _engine(cluster, "mechanical").compute(pos[None], None)[0]
    assert res.energy == pytest.approx(ref.energy, rel=1e-12) and np.allclose(res.forces, ref.forces)
    # MM client: ML charges zero, exactly like the electrostatic split; the bookkeeping check accepts it
    mm = mlmm_mm_system(cluster.system, cluster.ml, NoCoulomb.name)
    check_split(mm, cluster.ml, NoCoulomb.name, full_system=cluster.system, engine=engine)
    es = mlmm_mm_system(cluster.system, cluster.ml, "electrostatic")
    e_new, _ = openmm_energy_forces(mm, pos)
    e_es, _ = openmm_energy_forces(es, pos)
    assert e_new == pytest.approx(e_es, rel=1e-12)
    # ... and refuses the pair when the engine runs another scheme
    with pytest.raises(SetupError, match="ML engine runs mechanical embedding"):
        check_split(mm, cluster.ml, NoCoulomb.name, engine=_engine(cluster, "mechanical"))
    # the ownership table has the scheme's own row
    assert "nobody (test scheme)" in no_coulomb.ownership_table()


def test_a_registered_scheme_trains(no_coulomb):
    """Training's energy of labelled frames goes through the same scheme object."""
    from potentials.network import EmbeddedAIMNet2, ModelConfig
    from potentials.train import collate, load_frames, predict

    root = Path(__file__).resolve().parents[2]
    frames = load_frames(root / "tests" / "data" / "tiny_qmmm.nc", limit=4)
    model = EmbeddedAIMNet2(ModelConfig.from_toml(root / "inputs" / "models" / "configs" / "tiny.toml")).double()
    b = collate(frames, dtype=torch.float64)
    new = predict(model, b, no_coulomb)["energy"]
    gas = predict(model, b, None)["energy"]
    assert torch.allclose(new, gas)


def test_unknown_names_are_one_line():
    with pytest.raises(SetupError, match="unknown embedding mode 'nope'; known: electrostatic, mechanical"):
        SCHEMES.get("nope")
    with pytest.raises(SetupError, match="unknown client kind 'nope'"):
        build_engine("nope", None)
    with pytest.raises(SetupError, match="unknown ML-zone mapping"):
        ZONES.get("nope")


def test_engine_and_zone_registries_dispatch(cluster):
    seen = {}

    def build(spec, options):
        seen["args"] = (spec, options)
        return "engine"

    ENGINES.register("test-kind", build)
    try:
        assert build_engine("test-kind", "spec", EngineOptions(device="cpu")) == "engine"
        assert seen["args"][0] == "spec" and "test-kind" in ENGINES.names()
    finally:
        ENGINES.unregister("test-kind")
    zone = ZONES.get("whole-molecules").from_topology(cluster.topology, cluster.ml)
    assert isinstance(zone, WholeMolecules) and np.array_equal(zone.numbers, cluster.numbers())
    x = torch.zeros(len(cluster.ml), 3)
    assert zone.model_positions(x) is x

"""Sampling systems: solute parameters (charges, geometry), droplet restraint, cached MD chains, displacements."""
from __future__ import annotations

import numpy as np
import openmm
import pytest
from openmm import unit

from potentials.sampling import SOLUTE_CHARGE, Chain, ChainSpec, build, displace, system_data

BONDS_NM = {("C", "H"): 0.109, ("C", "O"): 0.141, ("O", "H"): 0.0945, ("C", "C"): 0.1522, ("N", "H"): 0.101,
            ("C", "N"): 0.1471}


@pytest.mark.parametrize("solute", sorted(SOLUTE_CHARGE))
def test_gas_phase_solute(solute):
    """Formal charge, whole-molecule topology, and a minimised geometry with sensible bond lengths."""
    top, system, pos = build(ChainSpec(solute, "gas", 300.0, seed=1))
    d = system_data(top, system, SOLUTE_CHARGE[solute])
    assert d.charges.sum() == pytest.approx(SOLUTE_CHARGE[solute], abs=1e-6)
    assert list(d.ml_indices) == list(range(top.getNumAtoms())) and d.box is None
    els = [a.element.symbol for a in top.atoms()]
    for bond in top.bonds():
        i, j = bond[0].index, bond[1].index
        key = tuple(sorted((els[i], els[j]), key=lambda e: "CNOH".index(e)))
        r = np.linalg.norm(pos[i] - pos[j])
        if solute == "HOH":
            assert r == pytest.approx(0.09572, abs=0.003)
        elif key == ("C", "O") and solute == "ACT":
            assert r == pytest.approx(0.125, abs=0.004)          # carboxylate C-O
        elif key == ("C", "N") and solute == "MGU" and "CZ" in (bond[0].name, bond[1].name):
            assert r == pytest.approx(0.131, abs=0.004)          # guanidinium C-N (1.34 A, shortened by 1-4 terms)
        else:
            assert r == pytest.approx(BONDS_NM[key], abs=0.004), (key, r)
    assert top.getNumBonds() == len(els) - 1


def test_droplet_restraint_and_chain_cache(tmp_path):
    """A small droplet: neutral water shell, restraint active only outside the radius; cached blocks reload
    identically and the next block continues the MD (different frames)."""
    spec = ChainSpec("MOH", "droplet", 300.0, seed=3, equil_ps=0.02, gap_ps=0.02, spacing_ps=0.01,
                     droplet_radius_nm=0.6)
    top, system, pos = build(spec)
    restraint = next(f for f in system.getForces() if isinstance(f, openmm.CustomCentroidBondForce))
    assert restraint.getNumBonds() == sum(1 for r in top.residues() if r.name == "HOH") > 10
    ctx = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
    restraint.setForceGroup(5)
    ctx.reinitialize()
    ctx.setPositions(pos)
    assert ctx.getState(getEnergy=True, groups={5}).getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole) == 0
    pos2 = pos.copy()
    last_o = max(a.index for a in top.atoms() if a.element.symbol == "O" and a.residue.name == "HOH")
    mass = np.array([system.getParticleMass(i).value_in_unit(unit.dalton) for i in range(6)])
    centre = mass @ pos[:6] / mass.sum()                     # the restraint uses the solute's centre of mass
    pos2[last_o] = centre + np.array([0.7, 0.0, 0.0])        # 0.1 nm outside
    ctx.setPositions(pos2)
    e = ctx.getState(getEnergy=True, groups={5}).getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
    assert e == pytest.approx(500.0 * 0.1 ** 2, rel=1e-6)

    chain = Chain(spec, tmp_path)
    b0 = chain.block(0, 2)
    b1 = chain.block(1, 2)
    again = Chain(spec, tmp_path)
    np.testing.assert_array_equal(again.block(0, 2), b0)
    assert b0.shape == (2, top.getNumAtoms(), 3) and not np.allclose(b0[1], b1[0])
    assert again.data.solute_charge == 0 and len(again.data.numbers) == 6
    b2 = again.block(2, 2)                                   # continues from block 1's saved final state
    assert np.abs(b2[0] - b1[1]).max() < 0.3                 # 20 fs later: nothing jumped


def test_displace_lengths():
    rng = np.random.default_rng(0)
    pos = np.zeros((10, 3))
    out = displace(pos, np.arange(2, 8), rng, 0.05, 0.15)
    d = np.linalg.norm(out - pos, axis=1) * 10.0               # Å
    assert np.all(d[[0, 1, 8, 9]] == 0)
    assert np.all((d[2:8] >= 0.05) & (d[2:8] <= 0.15))


def test_ion_pair_is_one_solute_held_in_contact(tmp_path):
    """'MAM+ACT' (a salt bridge): two residues, one neutral QM solute; minimised with an N-H...O contact, and the
    flat-bottom pair restraint keeps the centroids together in a hot cluster (it is zero inside its radius)."""
    from potentials.sampling import PAIR_RADIUS_NM, solute_charge, solute_parts
    assert solute_parts("MAM+ACT") == ["MAM", "ACT"] and solute_charge("MAM+ACT") == 0
    with pytest.raises(Exception, match="unknown solute 'NA' in 'MAM\\+NA'"):
        ChainSpec("MAM+NA", "gas", 300.0, seed=1)
    top, system, pos = build(ChainSpec("MAM+ACT", "gas", 300.0, seed=1))
    res = [r.name for r in top.residues()]
    assert res == ["MAM", "ACT"] and top.getNumBonds() == 7 + 6
    d = system_data(top, system, 0, 2)
    assert len(d.ml_indices) == 15 and d.charges.sum() == pytest.approx(0.0, abs=1e-6)
    names = [(a.residue.name, a.element.symbol) for a in top.atoms()]
    n = [i for i, x in enumerate(names) if x == ("MAM", "N")]
    o = [i for i, x in enumerate(names) if x == ("ACT", "O")]
    assert np.linalg.norm(pos[n][:, None] - pos[o][None], axis=-1).min() < 0.30          # N-H...O salt bridge
    spec = ChainSpec("MAM+ACT", "cluster", 400.0, seed=2, cluster_waters=12, equil_ps=0.2, gap_ps=0.05,
                     spacing_ps=0.1)
    chain = Chain(spec, tmp_path)
    frames = chain.block(0, 3)
    data = chain.data
    assert list(data.ml_indices) == list(range(15)) and data.solute_charge == 0
    mam, act = data.ml_indices[:8], data.ml_indices[8:]
    for x in frames:
        assert np.linalg.norm(x[mam].mean(0) - x[act].mean(0)) < PAIR_RADIUS_NM + 0.1
    forces = [f for f in system.getForces() if isinstance(f, openmm.CustomCentroidBondForce)]
    assert len(forces) == 1 and forces[0].getNumBonds() == 1
    for f in system.getForces():
        f.setForceGroup(1 if isinstance(f, openmm.CustomCentroidBondForce) else 0)
    ctx = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
    ctx.setPositions(pos)
    assert ctx.getState(getEnergy=True, groups={1}).getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole) == 0.0
    far = pos.copy()
    far[8:] += [0.5, 0.0, 0.0]
    ctx.setPositions(far)
    assert ctx.getState(getEnergy=True, groups={1}).getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole) > 1.0


def test_arg_asp_salt_bridge_is_planar_and_bidentate(tmp_path):
    """'MGU+ACT' (methylguanidinium-acetate, the Arg-Asp/Glu salt bridge): built far enough apart to start
    without overlap (the guanidinium is longer than methylammonium), minimised into a salt bridge, and the
    guanidinium (its C, the three N and their H) stays planar in hot cluster MD."""
    from potentials.sampling import solute_charge
    assert solute_charge("MGU+ACT") == 0
    top, system, pos = build(ChainSpec("MGU+ACT", "gas", 300.0, seed=1))
    assert [r.name for r in top.residues()] == ["MGU", "ACT"] and top.getNumBonds() == 12 + 6
    names = [(a.residue.name, a.name) for a in top.atoms()]
    n = [i for i, (r, a) in enumerate(names) if r == "MGU" and a.startswith("N")]
    o = [i for i, (r, a) in enumerate(names) if r == "ACT" and a.startswith("O")]
    close = np.linalg.norm(pos[n][:, None] - pos[o][None], axis=-1) < 0.31
    assert close.sum() >= 2 and close.any(axis=0).all()                   # both O accept: a bidentate bridge
    plane = [i for i, (r, a) in enumerate(names) if r == "MGU" and (a in ("NE", "CZ", "NH1", "NH2") or a[:2] in
                                                                    ("HE", "HH"))]
    assert len(plane) == 9

    def out_of_plane(x):
        c = x[plane] - x[plane].mean(0)
        return np.linalg.svd(c, compute_uv=False)[-1] / np.sqrt(len(plane))   # rms distance from the best plane

    assert out_of_plane(pos) < 0.002
    spec = ChainSpec("MGU+ACT", "cluster", 400.0, seed=2, cluster_waters=12, equil_ps=0.2, gap_ps=0.05,
                     spacing_ps=0.1)
    for x in Chain(spec, tmp_path).block(0, 3):
        assert out_of_plane(x) < 0.02                       # nm: thermal wiggle, not a pyramidal N

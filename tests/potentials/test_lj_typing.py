"""LJ typing of ML atoms without an MM template (potentials/lj_typing.py, ``[ml] lj``), issue 16.1."""
from pathlib import Path

import numpy as np
import openmm
import pytest
from openmm import unit

from potentials.core.errors import SetupError
from potentials.core.spec import SystemSpec
from potentials.lj_typing import assign_types, sigma_eps
from potentials.openmm_system import GAFF_LJ, element_lj_table, load_system

PREPARED = Path(__file__).resolve().parents[2] / "inputs" / "examples" / "methanol" / "prepared" / "system.toml"
TIP3P_O = (0.31507524065751241, 0.635968)           # amber14/tip3p.xml OW: sigma nm, epsilon kJ/mol


def _mol(smiles_like: list[tuple[str, list[int]]]) -> tuple[list[str], list[tuple[int, int]]]:
    """[(element, [indices of earlier atoms bonded to it])] -> (elements, bonds)."""
    return [el for el, _ in smiles_like], [(j, i) for i, (_, nb) in enumerate(smiles_like) for j in nb]


MOLECULES = {   # name: (atoms, expected GAFF-style types)
    "methanol": ([("C", []), ("O", [0]), ("H", [0]), ("H", [0]), ("H", [0]), ("H", [1])],
                 ["c3", "oh", "h1", "h1", "h1", "hgp1"]),
    "acetate": ([("C", []), ("H", [0]), ("H", [0]), ("H", [0]), ("C", [0]), ("O", [4]), ("O", [4])],
                ["c3", "hc", "hc", "hc", "c2", "o", "o"]),
    "methylammonium": ([("C", []), ("H", [0]), ("H", [0]), ("H", [0]), ("N", [0]), ("H", [4]), ("H", [4]),
                        ("H", [4])], ["c3", "hx", "hx", "hx", "n", "hgp1", "hgp1", "hgp1"]),
    "methanethiol": ([("C", []), ("S", [0]), ("H", [0]), ("H", [0]), ("H", [0]), ("H", [1])],
                     ["c3", "s", "hc", "hc", "hc", "hgp3"]),
    "dimethyl ether": ([("C", []), ("O", [0]), ("C", [1])] + [("H", [0])] * 3 + [("H", [2])] * 3,
                       ["c3", "os", "c3"] + ["h1"] * 6),
    "acetonitrile": ([("C", []), ("C", [0]), ("N", [1])] + [("H", [0])] * 3, ["c3", "c1", "n", "hc", "hc", "hc"]),
    "phenol": ([("C", []), ("C", [0]), ("C", [1]), ("C", [2]), ("C", [3]), ("C", [4, 0]), ("O", [0]), ("H", [6])]
               + [("H", [k]) for k in (1, 2, 3, 4, 5)], ["c2"] * 6 + ["oh", "hgp1"] + ["ha"] * 5),
}


@pytest.mark.parametrize("name", sorted(MOLECULES))
def test_assign_types(name):
    atoms, expected = MOLECULES[name]
    assert assign_types(*_mol(atoms)) == expected


def test_polar_h_numbers():
    """CHARMM polar H (Rmin/2 0.2245 Å, 0.046 kcal/mol); against TIP3P O it allows an H-bond where hc does not."""
    sigma, eps = sigma_eps("hgp1")
    assert sigma == pytest.approx(0.0400014, abs=1e-6) and eps == pytest.approx(0.192464)

    def pair(h, r):
        s, e = 0.5 * (h[0] + TIP3P_O[0]), np.sqrt(h[1] * TIP3P_O[1])
        return 4 * e * ((s / r) ** 12 - (s / r) ** 6)
    assert pair(sigma_eps("hc"), 0.185) == pytest.approx(168, abs=2)       # the old typing: no H-bond
    assert pair(sigma_eps("hc"), 0.195) == pytest.approx(87, abs=2)
    assert -0.5 < pair(sigma_eps("hgp1"), 0.185) < 0.0 and -0.5 < pair(sigma_eps("hgp1"), 0.195) < 0.0
    assert pair(sigma_eps("hgp1"), 0.12) > 100                             # still no collapse onto the O


def _ml_lj(spec):
    _, system, _ = load_system(spec)
    nb = next(f for f in system.getForces() if isinstance(f, openmm.NonbondedForce))
    return [tuple(p.value_in_unit(u) for p, u in zip(nb.getParticleParameters(i)[1:],
                                                      (unit.nanometer, unit.kilojoule_per_mole)))
            for i in spec.ml.indices]


def test_modes_and_overrides():
    """lj = "gaff" types; [ml] lj_table entries win per element; lj = "element" is the old per-element table."""
    spec = SystemSpec.load(PREPARED)
    assert spec.ml.lj == "gaff"
    lj = _ml_lj(spec)
    assert lj[5] == pytest.approx(sigma_eps("hgp1")) and lj[2] == pytest.approx(sigma_eps("h1"))
    spec = SystemSpec.load(PREPARED)
    spec.ml.lj_table = {"h": [0.1, 0.05]}
    lj = _ml_lj(spec)
    assert lj[5] == pytest.approx((0.1, 0.05)) and lj[2] == pytest.approx((0.1, 0.05))
    assert lj[0] == pytest.approx(sigma_eps("c3"))
    spec = SystemSpec.load(PREPARED)
    spec.ml.lj = "element"
    table = element_lj_table()
    assert np.allclose(_ml_lj(spec), [table[el] for el in "COHHHH"])
    assert set(GAFF_LJ) <= set(table)
    spec.ml.lj = "charmm"
    with pytest.raises(SetupError, match="lj = 'charmm'"):
        load_system(spec)

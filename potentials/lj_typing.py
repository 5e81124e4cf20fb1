"""Lennard-Jones atom types for ML-zone molecules that have no MM template (``[ml] lj = "gaff"``, the default).

ML atoms carry no MM charge and no bonded term; their only MM parameters are the LJ terms the MM client uses for
ML–MM van der Waals. Each atom gets a type a force-field person would recognise:

* heavy atoms and C–H hydrogens: GAFF 1.81 types (AmberTools ``gaff.dat``, NONBON section; Wang et al.,
  J. Comput. Chem. 25, 1157 (2004)), hybridisation-aware: carbon c3 (sp3) / c2, ca, c (sp2, aromatic, carbonyl:
  one LJ set) / c1 (sp); oxygen oh (hydroxyl) / os (ether, ester) / o (carbonyl, carboxylate); hydrogen on carbon
  hc, h1–h3 (aliphatic C with 1–3 electron-withdrawing neighbours N, O, F, Cl, Br, I), hx (C next to a
  four-coordinate N+), ha, h4, h5 (sp2/aromatic C with 0, 1, 2 such neighbours).
* polar hydrogens (bonded to O or N): CHARMM's polar H, Rmin/2 = 0.2245 Å, ε = 0.046 kcal/mol (CHARMM22/36
  type H, CGenFF HGP1/HGP2; MacKerell et al., J. Phys. Chem. B 102, 3586 (1998); Vanommeslaeghe et al.,
  J. Comput. Chem. 31, 671 (2010)), σ = 0.0400 nm, ε = 0.1925 kJ/mol. Thiol H: CGenFF HGP3, Rmin/2 = 0.45 Å,
  ε = 0.10 kcal/mol. GAFF's own ho (and TIP3P's H) has no LJ at all; a small radius keeps a polar ML hydrogen
  from falling onto an MM charge while leaving hydrogen bonds free: against a TIP3P oxygen the pair term is
  −0.2 kJ/mol at 0.185 nm (the aliphatic hc costs +168 kJ/mol there) and +140 kJ/mol at 0.12 nm; the donor's
  heavy atom (O…O) and the network's own repulsion do the rest, as in CHARMM.

Hybridisation and aromaticity come from RDKit (bond orders perceived from the bonds and elements of the
topology, ``rdDetermineBonds.DetermineBondOrders``, trying net charges 0, ±1, ±2); where RDKit cannot perceive
the molecule, carbon falls back to its number of neighbours (4 → sp3, 3 → sp2, 2 → sp).

Units of the returned tables: sigma nm, epsilon kJ/mol.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence

from potentials.core.units import ANGSTROM_PER_NM, KJMOL_PER_KCALMOL

log = logging.getLogger(__name__)

# type -> (Rmin/2 Å, epsilon kcal/mol); GAFF 1.81 gaff.dat unless marked
TYPE_RMIN_EPS = {
    "c3": (1.9080, 0.1094), "c2": (1.9080, 0.0860), "c1": (1.9080, 0.2100),
    "n": (1.8240, 0.1700),                                 # n, n1-n4, na, nh, ... share one LJ set
    "oh": (1.7210, 0.2104), "os": (1.6837, 0.1700), "o": (1.6612, 0.2100),
    "s": (2.0000, 0.2500), "p5": (2.1000, 0.2000),
    "f": (1.75, 0.061), "cl": (1.948, 0.265), "br": (2.02, 0.420), "i": (2.15, 0.50),
    "hc": (1.4870, 0.0157), "h1": (1.3870, 0.0157), "h2": (1.2870, 0.0157), "h3": (1.1870, 0.0157),
    "hx": (1.1000, 0.0157), "ha": (1.4590, 0.0150), "h4": (1.4090, 0.0150), "h5": (1.3590, 0.0150),
    "hgp1": (0.2245, 0.0460),                              # CHARMM36/CGenFF polar H (on O, N)
    "hgp3": (0.4500, 0.1000),                              # CGenFF thiol H (on S)
}
ELEMENT_TYPE = {"C": "c3", "N": "n", "O": "oh", "S": "s", "P": "p5", "F": "f", "Cl": "cl", "Br": "br", "I": "i",
                "H": "hc"}
ELECTRON_WITHDRAWING = {"N", "O", "F", "Cl", "Br", "I"}


def sigma_eps(lj_type: str) -> tuple[float, float]:
    """(sigma nm, epsilon kJ/mol) of a type of :data:`TYPE_RMIN_EPS`."""
    r_half, eps = TYPE_RMIN_EPS[lj_type]
    return 2.0 * r_half / ANGSTROM_PER_NM / 2.0 ** (1.0 / 6.0), eps * KJMOL_PER_KCALMOL


def _hybridisations(elements: Sequence[str], bonds: Sequence[tuple[int, int]]) -> list[str] | None:
    """RDKit's hybridisation ("SP3", "SP2", ...) per atom, with aromatic atoms as "AROMATIC"; None if RDKit is
    missing or cannot assign bond orders."""
    try:
        from rdkit import Chem, RDLogger
        from rdkit.Chem import rdDetermineBonds
    except ImportError:
        return None
    RDLogger.DisableLog("rdApp.*")
    mol = Chem.RWMol()
    for el in elements:
        mol.AddAtom(Chem.Atom(el))
    for a, b in bonds:
        mol.AddBond(int(a), int(b), Chem.BondType.SINGLE)
    mol.AddConformer(Chem.Conformer(len(elements)), assignId=True)   # needed by the API, not used for orders
    base = mol.GetMol()
    for charge in (0, -1, 1, -2, 2):
        trial = Chem.Mol(base)
        try:
            rdDetermineBonds.DetermineBondOrders(trial, charge=charge)
        except Exception:     # RDKit raises ValueError / RuntimeError when no valid bond ordering exists
            continue
        if any(a.GetNumRadicalElectrons() for a in trial.GetAtoms()):
            continue              # an open-shell "solution" means the bonds or hydrogens are incomplete
        return ["AROMATIC" if a.GetIsAromatic() else str(a.GetHybridization()) for a in trial.GetAtoms()]
    return None


def _carbon_type(degree: int, hyb: str | None) -> str:
    if hyb is None:
        hyb = {4: "SP3", 3: "SP2", 2: "SP"}.get(degree, "SP3")
    return {"SP": "c1", "SP2": "c2", "AROMATIC": "c2"}.get(hyb, "c3")


def _hydrogen_type(partner: int, elements, neighbours, types) -> str:
    el = elements[partner]
    if el in ("O", "N"):
        return "hgp1"
    if el == "S":
        return "hgp3"
    if el != "C":
        return "hc"
    others = [j for j in neighbours[partner] if elements[j] != "H"]
    if any(elements[j] == "N" and len(neighbours[j]) == 4 for j in others):
        return "hx"
    n_ew = sum(elements[j] in ELECTRON_WITHDRAWING for j in others)
    if types[partner] == "c3":
        return ("hc", "h1", "h2", "h3")[min(n_ew, 3)]
    return ("ha", "h4", "h5")[min(n_ew, 2)]


def assign_types(elements: Sequence[str], bonds: Sequence[tuple[int, int]]) -> list[str]:
    """One LJ type of :data:`TYPE_RMIN_EPS` per atom of a molecule given by element symbols and bonds (index
    pairs). Elements without a type here get their element symbol (for ``[ml] lj_table`` to supply)."""
    n = len(elements)
    neighbours: list[list[int]] = [[] for _ in range(n)]
    for a, b in bonds:
        neighbours[a].append(b)
        neighbours[b].append(a)
    hyb = _hybridisations(elements, bonds) if bonds else None
    if bonds and hyb is None:
        log.info("RDKit could not perceive bond orders; carbon typed by its number of neighbours")
    types: list[str] = []
    for i, el in enumerate(elements):
        if el == "C":
            types.append(_carbon_type(len(neighbours[i]), hyb[i] if hyb else None))
        elif el == "O":
            heavy = [j for j in neighbours[i] if elements[j] != "H"]
            types.append("oh" if len(heavy) < len(neighbours[i]) else ("os" if len(heavy) >= 2 else "o"))
        else:
            types.append(ELEMENT_TYPE.get(el, el))
    for i, el in enumerate(elements):
        if el == "H" and len(neighbours[i]) == 1:
            types[i] = _hydrogen_type(neighbours[i][0], elements, neighbours, types)
    return types

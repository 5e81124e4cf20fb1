"""Covalent ML/MM boundaries: link atoms (capping hydrogens) on the bonds an ML selection cuts.

Which bonds may be cut (:func:`check_cuts`): single bonds at an sp3 carbon, between two carbons or between a
carbon and a nitrogen: the side-chain cut CA–CB, and the C(sp3)–C and N–C(sp3) cuts that keep whole peptide
groups in the ML zone. Amide (peptide) bonds, double and aromatic bonds, bonds to hydrogen and polar bonds
(C–O, C–S, ...) are refused with a line that says where to cut instead.

Each cut bond Q1–M1 (Q1 in the ML zone, M1 in the MM zone) gets a hydrogen H placed on it at a fixed ratio
(Dapprich et al., J. Mol. Struct. THEOCHEM 461, 1 (1999), as in ONIOM):

    r_H = r_Q1 + g (r_M1 - r_Q1),   g = d(Q1–H) / d0(Q1–M1)

with d(C–H) = 1.09 Å, d(N–H) = 1.01 Å and the force field's standard single-bond lengths d0 (Amber: CT–CT
1.526 Å, C–CT 1.522 Å, N–CT 1.449 Å). The model sees H as an ordinary hydrogen; its force F_H goes back to the
two real atoms by the chain rule: (1 - g) F_H on Q1 and g F_H on M1.

MM charges near the boundary (electrostatic embedding; :meth:`LinkAtoms.environment`): the charge of M1 is
moved, in equal parts, onto its other bonded neighbours M2 (the charge-shift scheme without dipole
corrections: Sherwood et al., J. Mol. Struct. THEOCHEM 632, 1 (2003); Lin & Truhlar, J. Phys. Chem. A 109,
3991 (2005)), so no point charge sits 0.4 Å from the cap and the embedding's total charge is preserved. The
difference between the force field's charges of the ML atoms and the ML zone's integer charge (a cut residue's
charges do not add up to an integer) is spread over the same M2 atoms, so ML zone plus embedded charges carry
the system's total charge. These are the charges the network sees; the MM client keeps the force field's
charges for every MM–MM interaction.

How the engine uses it: the caps are extra atoms appended after the system's N atoms (indices N..N+k-1,
:meth:`LinkAtoms.extend`); the embedding treats them as ML atoms (phi and E are computed there too), and the
forces on them are folded back onto Q1 and M1 (:meth:`LinkAtoms.fold`). Nothing outside this module and the
zone interface knows about caps.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import numpy as np

from coupling.selection import cut_bonds, describe_atom
from coupling.zones import ZONES, WholeMolecules, ml_numbers
from potentials.core.errors import SetupError

log = logging.getLogger(__name__)

CAP_BOND_A = {"C": 1.09, "N": 1.01}          # Q1–H of the cap, Å
# standard single-bond lengths d0(Q1–M1), Å (Amber ff14SB: CT–CT, C–CT, N–CT); key: (Q1 element, Q1 sp3?,
# M1 element, M1 sp3?) reduced to the bond kinds check_cuts allows
_D0_CC_SP3 = 1.526
_D0_CC_SP2 = 1.522
_D0_CN = 1.449


@dataclass(frozen=True)
class Link:
    """One cut bond: ``q1`` (ML atom) – ``m1`` (MM atom), the cap's ratio ``g`` and the MM neighbours ``m2`` of
    m1 (without q1), which take m1's charge in the embedding."""

    q1: int
    m1: int
    g: float
    m2: tuple[int, ...]


def _neighbours(topology) -> dict[int, list]:
    nb: dict[int, list] = {a.index: [] for a in topology.atoms()}
    for a, b in topology.bonds():
        nb[a.index].append(b)
        nb[b.index].append(a)
    return nb


def _symbol(atom) -> str:
    return atom.element.symbol if atom.element is not None else "?"


def _sp3_carbon(atom, nb) -> bool:
    return _symbol(atom) == "C" and len(nb[atom.index]) == 4


def _refusal(q, m, nb, bond) -> str | None:
    """Why the bond q–m may not be cut (None: it may)."""
    sq, sm = _symbol(q), _symbol(m)
    order = getattr(bond, "order", None)
    if "H" in (sq, sm):
        return "a bond to hydrogen"
    if order not in (None, 1):
        return f"a bond of order {order}"
    if {sq, sm} == {"C"}:
        if _sp3_carbon(q, nb) or _sp3_carbon(m, nb):
            return None
        return "a double or aromatic C–C bond (neither carbon is sp3)"
    if {sq, sm} == {"C", "N"}:
        c = q if sq == "C" else m
        if _sp3_carbon(c, nb):
            return None
        return "an amide (peptide) or other C(sp2)–N bond"
    return f"a polar {sq}–{sm} bond"


def _advice(q, m) -> str:
    names = {q.name, m.name}
    if names == {"C", "N"}:
        return ("keep the whole peptide group in one zone: add the C and O of the residue before the peptide bond "
                "and the N and H after it to the same zone, and cut at the CA atoms (C–CA / N–CA)")
    return ("cut a single bond at an sp3 carbon instead: CA–CB for a side chain, or C–CA / N–CA to keep whole "
            "peptide groups; or add the atoms on the other side to the ML zone")


def check_cuts(topology, ml_indices) -> list[tuple]:
    """The cut bonds as (ML atom, MM atom) pairs after refusing those link atoms cannot cap (SetupError, one
    line naming the bond, why, and where to cut instead)."""
    nb = _neighbours(topology)
    bond_of = {frozenset((a.index, b.index)): bond for bond in topology.bonds() for a, b in [(bond[0], bond[1])]}
    cuts = cut_bonds(topology, ml_indices)
    seen_m1: dict[int, object] = {}
    for q, m in cuts:
        why = _refusal(q, m, nb, bond_of.get(frozenset((q.index, m.index))))
        if why is not None:
            raise SetupError(f"the ML selection cuts {describe_atom(q)} - {describe_atom(m)}, {why}; link atoms "
                             f"cap only single bonds at an sp3 carbon (C–C, N–C): {_advice(q, m)}")
        if m.index in seen_m1:
            raise SetupError(f"MM atom {describe_atom(m)} is bonded to two ML atoms ({describe_atom(seen_m1[m.index])}"
                             f" and {describe_atom(q)}); add it to the ML zone")
        seen_m1[m.index] = q
        if len(nb[m.index]) < 2:
            raise SetupError(f"the MM side of the cut bond {describe_atom(q)} - {describe_atom(m)} is a single atom; "
                             "add it to the ML zone")
    return cuts


def _ratio(q, m, nb) -> float:
    if {_symbol(q), _symbol(m)} == {"C"}:
        d0 = _D0_CC_SP3 if (_sp3_carbon(q, nb) and _sp3_carbon(m, nb)) else _D0_CC_SP2
    else:
        d0 = _D0_CN
    return CAP_BOND_A[_symbol(q)] / d0


@ZONES.register("link-atoms")
class LinkAtoms(WholeMolecules):
    """An ML zone that may cut single bonds at sp3 carbons; a capping hydrogen on each cut bond.

    atoms : (n,) system indices of the ML atoms; numbers : (n,) their atomic numbers; n_system : number of
    system atoms N; links : the cut bonds (:class:`Link`). The model's atoms are the ML atoms followed by the
    caps (``model_indices``: the caps are the extended system's atoms N..N+k-1).
    """

    name = "link-atoms"

    def __init__(self, atoms, numbers, n_system: int, links: list[Link]):
        super().__init__(atoms, numbers)
        self.links = list(links)
        self.n_system = int(n_system)
        k = len(self.links)
        self._q1 = np.array([l.q1 for l in self.links], dtype=np.int64)
        self._m1 = np.array([l.m1 for l in self.links], dtype=np.int64)
        self._g = np.array([l.g for l in self.links], dtype=np.float64)
        self.numbers = np.concatenate([self.numbers, np.ones(k, dtype=np.int64)])
        self._model_indices = np.concatenate([self.atoms, self.n_system + np.arange(k)])

    @property
    def model_indices(self) -> np.ndarray:
        return self._model_indices

    @classmethod
    def from_topology(cls, topology, ml_indices) -> "LinkAtoms":
        ml = np.asarray(ml_indices, dtype=np.int64).reshape(-1)
        nb = _neighbours(topology)
        links = [Link(q.index, m.index, _ratio(q, m, nb), tuple(sorted(a.index for a in nb[m.index] if a.index != q.index)))
                 for q, m in check_cuts(topology, ml)]
        zone = cls(ml, ml_numbers(topology, ml), topology.getNumAtoms(), links)
        if links:
            atoms = list(topology.atoms())
            log.info("link atoms: %d cut bond(s) capped with hydrogen: %s", len(links), "; ".join(
                f"{describe_atom(atoms[l.q1])} - {describe_atom(atoms[l.m1])} (g = {l.g:.3f})" for l in links))
        return zone

    @property
    def n_extra(self) -> int:
        return len(self.links)

    def cut_pairs(self) -> set[tuple[int, int]]:
        """The capped bonds as (ML atom, MM atom) pairs."""
        return {(l.q1, l.m1) for l in self.links}

    def boundary_atoms(self) -> np.ndarray:
        """The MM atoms whose positions the caps read (M1 of each link)."""
        return self._m1.copy()

    def extend(self, positions: np.ndarray, box: np.ndarray | None) -> np.ndarray:
        """(N + k, 3) nm: the system's positions followed by the caps, each on its bond (M1 at its image
        nearest Q1)."""
        if not self.links:
            return positions
        d = positions[self._m1] - positions[self._q1]
        if box is not None:
            frac = d @ np.linalg.inv(box)
            d = (frac - np.round(frac)) @ box
        return np.concatenate([positions, positions[self._q1] + self._g[:, None] * d])

    def fold(self, forces: np.ndarray) -> np.ndarray:
        """(N, 3): the extended system's forces with each cap's force moved onto Q1 ((1 - g) F) and M1 (g F)."""
        if not self.links:
            return forces
        f_cap = forces[self.n_system:]
        out = forces[:self.n_system].copy()
        np.add.at(out, self._q1, (1.0 - self._g)[:, None] * f_cap)
        np.add.at(out, self._m1, self._g[:, None] * f_cap)
        return out

    def environment(self, env, ml_charge: int | None = None):
        """The embedding's environment of the extended system: the caps are ML atoms (phi and E are computed at
        them), M1's charge is shifted onto its M2 neighbours and the ML zone's non-integer force-field charge
        is made up on them (see the module docstring)."""
        if not self.links:
            return env
        k = len(self.links)
        charges = np.concatenate([np.asarray(env.charges, dtype=np.float64), np.zeros(k)])
        residue = np.concatenate([np.asarray(env.residue), np.asarray(env.residue)[self._q1]])
        excess = 0.0 if ml_charge is None else float(charges[self.atoms].sum()) - float(ml_charge)
        for link in self.links:
            share = (charges[link.m1] + excess / k) / len(link.m2)
            charges[link.m1] = 0.0
            charges[list(link.m2)] += share
        if ml_charge is not None and abs(excess) > 1e-6:
            log.info("link atoms: the ML atoms' force-field charges add up to %+.4f e, the ML zone has %+d e; the "
                     "difference is spread over the MM neighbours of the cut bonds in the embedding",
                     float(np.asarray(env.charges)[self.atoms].sum()), ml_charge)
        return replace(env, charges=charges, residue=residue, ml_indices=self.model_indices)

    def ml_charges(self, model_charges: np.ndarray) -> np.ndarray:
        """The ML atoms' charges with each cap's charge added to its Q1 (mechanical embedding's fixed charges:
        the zone's total is kept, and no charge sits on a cap the MM client does not have)."""
        q = np.asarray(model_charges, dtype=np.float64)
        n = len(self.atoms)
        out = q[:n].copy()
        local = {int(a): k for k, a in enumerate(self.atoms)}
        for link, qc in zip(self.links, q[n:]):
            out[local[link.q1]] += qc
        return out

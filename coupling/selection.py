"""The ML zone's covalent boundary: which bonds a selection cuts, and the policy of zones of whole molecules.

The selection language itself is :mod:`potentials.atom_selection` (:func:`select`, re-exported here).
:func:`cut_bonds` *finds* the covalent bonds an ML zone cuts; :func:`check_boundary` is the policy of the
``whole-molecules`` zone (refuse them). Cut bonds are capped by the ``link-atoms`` zone
(:mod:`coupling.link_atoms`), which has its own policy (single bonds at sp3 carbons).
"""
from __future__ import annotations

from collections.abc import Iterable

from openmm import app

from potentials.atom_selection import KEYWORDS, OPERATORS, select  # noqa: F401  (the grammar, re-exported)
from potentials.core.errors import SetupError


def describe_atom(atom: app.topology.Atom) -> str:
    """``'C1 (MOL 1, chain A, atom 0)'``: how errors name an atom."""
    return f"{atom.name} ({atom.residue.name} {atom.residue.id}, chain {atom.residue.chain.id}, atom {atom.index})"


def cut_bonds(topology: app.Topology, indices: Iterable[int]) -> list[tuple[app.topology.Atom, app.topology.Atom]]:
    """Covalent bonds with exactly one atom in the ML zone, as (ML atom, MM atom) pairs, in topology order.

    The ``link-atoms`` zone caps them (:mod:`coupling.link_atoms`); :func:`check_boundary` refuses them.
    """
    inside = set(int(i) for i in indices)
    cut = []
    for a, b in topology.bonds():
        if (a.index in inside) != (b.index in inside):
            cut.append((a, b) if a.index in inside else (b, a))
    return cut


def check_boundary(topology: app.Topology, indices: Iterable[int]) -> None:
    """Refuse a zone of whole molecules that cuts covalent bonds (the ``link-atoms`` zone caps them)."""
    cut = cut_bonds(topology, indices)
    if cut:
        shown = "; ".join(f"{describe_atom(a)} - {describe_atom(b)}" for a, b in cut[:5])
        more = f" and {len(cut) - 5} more" if len(cut) > 5 else ""
        raise SetupError(f"the ML selection cuts {len(cut)} covalent bond(s): {shown}{more}; select whole molecules/"
                         "residues, or cap the cut bonds with link atoms: [ml] zone = \"link-atoms\" in system.toml "
                         "(`mlmm prepare` sets it when a selection cuts single bonds at sp3 carbons)")

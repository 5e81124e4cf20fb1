"""Who owns which energy term, and a check that a built (MM system, ML engine) pair counts each term once.

E = E_MM(MM–MM, all terms) + E_LJ(ML–MM) + E_ML(ML zone) + whatever the embedding scheme assigns (in
electrostatic embedding the ML zone's Coulomb interaction with the MM charges goes to the network). Each
scheme lists its rows (:meth:`coupling.schemes.EmbeddingScheme.terms`); :data:`OWNERSHIP` is the table of all
registered schemes side by side (logs, docs) and :func:`check_split` verifies a concrete pair against the
scheme it was built for.
"""
from __future__ import annotations

import itertools
from typing import NamedTuple

import numpy as np
import openmm

from coupling.mmsystem import bonded_term_counts, ml_only_terms
from coupling.schemes import SCHEMES, get_scheme
from potentials.core.errors import SetupError
from potentials.openmm_params import exception_parameters, nonbonded_force, particle_charges, particle_lj


class Term(NamedTuple):
    term: str
    electrostatic: str      # owner in electrostatic embedding
    mechanical: str         # owner in mechanical embedding


def _table() -> tuple[Term, ...]:
    """The two built-in schemes' rows side by side (they list the same terms in the same order)."""
    es, mech = (SCHEMES.get(n)().terms() for n in ("electrostatic", "mechanical"))
    return tuple(Term(a.term, a.owner, b.owner) for a, b in zip(es, mech))


OWNERSHIP: tuple[Term, ...] = _table()


def ownership_table(mode) -> str:
    """The ownership table of one embedding scheme (name or object), as aligned text for the log."""
    return get_scheme(mode).ownership_table()


def check_split(mm_system: openmm.System, ml_indices, mode, *, full_system: openmm.System | None = None,
                engine=None, ml_charges=None) -> None:
    """Raise SetupError listing every term the MM system and the ML engine would both count (or drop).

    Parameters
    ----------
    mm_system : the MM client's system (:func:`coupling.mmsystem.mlmm_mm_system`).
    ml_indices : the ML zone.
    mode : the embedding scheme (name or object) the pair was built for.
    full_system : the original MM system; if given, checks that MM parameters and ML–MM LJ are unchanged and
        that the ML atoms carry what the scheme says (zero, or the fixed charges).
    engine : the ML client's :class:`coupling.ml_engine.MLEngine`; if given, its zone and scheme must match.
    ml_charges : fixed ML charges (e) the MM system should hold, for a scheme that keeps them (default: the
        force field's).
    """
    scheme = get_scheme(mode)
    ml = np.asarray(ml_indices, dtype=np.int64).reshape(-1)
    n = mm_system.getNumParticles()
    is_ml = np.zeros(n, bool)
    is_ml[ml] = True
    problems = [f"{kind} term on ML atoms {atoms}" for kind, atoms in ml_only_terms(mm_system, ml)]
    problems += [f"constraint between ML atoms {i} and {j}" for i, j, _ in
                 (mm_system.getConstraintParameters(k) for k in range(mm_system.getNumConstraints()))
                 if is_ml[i] and is_ml[j]]
    nb = nonbonded_force(mm_system)
    q, lj = particle_charges(nb), particle_lj(nb)
    q0 = lj0 = None
    if full_system is not None:
        nb0 = nonbonded_force(full_system)
        q0, lj0 = particle_charges(nb0), particle_lj(nb0)
        if not np.array_equal(q[~is_ml], q0[~is_ml]) or not np.array_equal(lj, lj0):
            problems.append("MM charges or Lennard-Jones parameters changed (the ML–MM LJ terms must be kept)")
        problems += _boundary_terms(full_system, mm_system, ml)
    problems += _ml_charges(scheme, q, None if q0 is None else q0[ml], ml, ml_charges)
    problems += _ml_pairs_left(mm_system, nb, ml, is_ml)
    if scheme.field_inputs:
        problems += _boundary_coulomb(nb, is_ml)
    if engine is not None:
        problems += _compare_engine(scheme, engine, ml, n)
    if problems:
        raise SetupError("ML/MM energy bookkeeping: " + "; ".join(problems))


def _ml_pairs_left(mm_system, nb, ml, is_ml) -> list[str]:
    """Every ML–ML pair must be an exception with no charge product and no epsilon, and excluded from every
    CustomNonbondedForce."""
    problems, zero_pairs = [], set()
    for k in range(nb.getNumExceptions()):
        i, j, qq, _, eps = exception_parameters(nb, k)
        if is_ml[i] and is_ml[j] and qq == 0 and eps == 0:
            zero_pairs.add((min(i, j), max(i, j)))
    pairs = list(itertools.combinations(sorted(ml.tolist()), 2))
    missing = [p for p in pairs if p not in zero_pairs]
    if missing:
        problems.append(f"{len(missing)} ML–ML pairs still interact in NonbondedForce, e.g. {missing[0]}")
    for f in mm_system.getForces():
        if isinstance(f, openmm.CustomNonbondedForce):
            excl = {tuple(sorted(f.getExclusionParticles(k))) for k in range(f.getNumExclusions())}
            left = [p for p in pairs if p not in excl]
            if left:
                problems.append(f"CustomNonbondedForce '{f.getName()}': {len(left)} ML–ML pairs not excluded")
    return problems


def _boundary_terms(full_system, mm_system, ml) -> list[str]:
    """Every bonded term with at least one MM atom (those across a link atom's cut bond too) must still be in
    the MM system, and no term whose atoms are all ML."""
    full, mm = bonded_term_counts(full_system, ml), bonded_term_counts(mm_system, ml)
    problems = []
    for key, (_, other) in full.items():
        kept = mm.get(key, (0, 0))[1]
        if kept != other:
            problems.append(f"{key}: {other} terms with MM atoms in the full system, {kept} in the MM system")
    return problems


def _boundary_coulomb(nb, is_ml) -> list[str]:
    """With the network fed the MM field, no ML–MM pair may keep Coulomb in the MM client (the 1-4 exceptions
    across a link atom's cut bond would otherwise be counted by both clients)."""
    left = [(i, j) for k in range(nb.getNumExceptions()) for i, j, qq, _, _ in [exception_parameters(nb, k)]
            if is_ml[i] != is_ml[j] and qq != 0]
    if left:
        return [f"{len(left)} ML–MM exceptions keep a charge product in the MM NonbondedForce, e.g. atoms {left[0]}: "
                "ML–MM Coulomb would be counted by both clients"]
    return []


def _ml_charges(scheme, q, q0_ml, ml, ml_charges) -> list[str]:
    """The ML atoms must carry what the scheme says: zero (the network owns ML–MM Coulomb) or the fixed
    charges (given, or the force field's ``q0_ml``; without either there is nothing to compare)."""
    fixed = None if ml_charges is None else np.asarray(ml_charges, dtype=np.float64)
    if scheme.field_inputs:
        want = scheme.ml_charges_in_mm(q[ml], fixed)
    elif fixed is None and q0_ml is None:
        return []
    else:
        want = scheme.ml_charges_in_mm(q0_ml if q0_ml is not None else q[ml], fixed)
    if np.allclose(q[ml], want, rtol=0, atol=1e-12):
        return []
    if scheme.field_inputs:
        return [f"ML atoms {ml[q[ml] != want][:5].tolist()} carry charge in the MM NonbondedForce: ML–MM Coulomb "
                "would be counted by both clients"]
    return [f"ML charges in the MM system differ from the {scheme.name}-embedding charges"]


def _compare_engine(scheme, engine, ml, n) -> list[str]:
    problems = []
    if engine.mode != scheme.name:
        problems.append(f"ML engine runs {engine.mode} embedding, the MM system was built for {scheme.name}")
    if not np.array_equal(np.sort(engine.zone.atoms), np.sort(ml)):
        problems.append("ML engine and MM system disagree on the ML-zone atoms")
    if engine.natoms != n:
        problems.append(f"ML engine has {engine.natoms} atoms, the MM system {n}")
    return problems

"""Who owns which energy term, and a check that a built (MM system, ML engine) pair counts each term once.

E = E_MM(MM–MM, all terms) + E_LJ(ML–MM) + E_ML(ML zone; in electrostatic embedding also its Coulomb
interaction with the MM charges). :data:`OWNERSHIP` is the table (for logs and docs); :func:`check_split`
verifies a concrete pair against it.
"""
from __future__ import annotations

import itertools
from typing import NamedTuple

import numpy as np
import openmm

from coupling.mmsystem import MODES, ml_only_terms, nonbonded_force
from driver.errors import SetupError


class Term(NamedTuple):
    term: str
    electrostatic: str      # owner in electrostatic embedding
    mechanical: str         # owner in mechanical embedding


OWNERSHIP: tuple[Term, ...] = (
    Term("MM–MM bonded terms", "MM", "MM"),
    Term("MM–MM Coulomb (PME / cutoff / none)", "MM", "MM"),
    Term("MM–MM Lennard-Jones", "MM", "MM"),
    Term("ML–ML bonded + nonbonded (the ML zone's own energy)", "ML", "ML"),
    Term("ML–MM Coulomb", "ML (network fed phi, E of MM charges within the embedding cutoff)",
         "MM (fixed ML charges)"),
    Term("ML–MM Lennard-Jones", "MM", "MM"),
    Term("ML charges with their own periodic images", "nobody (ML charges are zero in PME)", "MM"),
    Term("long-range LJ dispersion correction (constant, all atom types)", "MM", "MM"),
    Term("restraints and barostats (CustomExternalForce, MonteCarlo*)", "MM", "MM"),
)


def ownership_table(mode: str) -> str:
    """The ownership table for one embedding mode, as aligned text for the log."""
    if mode not in MODES:
        raise SetupError(f"unknown embedding mode {mode!r}; choose one of {MODES}")
    width = max(len(t.term) for t in OWNERSHIP)
    return "\n".join(f"{t.term:<{width}}  {getattr(t, mode)}" for t in OWNERSHIP)


def check_split(mm_system: openmm.System, ml_indices, mode: str, *, full_system: openmm.System | None = None,
                engine=None, ml_charges=None) -> None:
    """Raise SetupError listing every term the MM system and the ML engine would both count (or drop).

    Parameters
    ----------
    mm_system : the MM client's system (:func:`coupling.mmsystem.mlmm_mm_system`).
    ml_indices : the ML zone.
    mode : "electrostatic" or "mechanical".
    full_system : the original MM system; if given, checks that MM parameters and ML–MM LJ are unchanged.
    engine : the ML client's :class:`coupling.ml_engine.MLEngine`; if given, its zone and mode must match.
    ml_charges : mechanical mode: the fixed ML charges (e) the MM system should hold (default: the MM ones).
    """
    if mode not in MODES:
        raise SetupError(f"unknown embedding mode {mode!r}; choose one of {MODES}")
    ml = np.asarray(ml_indices, dtype=np.int64).reshape(-1)
    n = mm_system.getNumParticles()
    is_ml = np.zeros(n, bool)
    is_ml[ml] = True
    problems = [f"{kind} term on ML atoms {atoms}" for kind, atoms in ml_only_terms(mm_system, ml)]
    problems += [f"constraint between ML atoms {i} and {j}" for i, j, _ in
                 (mm_system.getConstraintParameters(k) for k in range(mm_system.getNumConstraints()))
                 if is_ml[i] and is_ml[j]]
    nb = nonbonded_force(mm_system)
    q = np.array([nb.getParticleParameters(i)[0]._value for i in range(n)])
    lj = np.array([[p._value for p in nb.getParticleParameters(i)[1:]] for i in range(n)])
    if mode == "electrostatic" and np.any(q[ml] != 0):
        problems.append(f"ML atoms {ml[q[ml] != 0][:5].tolist()} carry charge in the MM NonbondedForce: ML–MM "
                        "Coulomb would be counted by both clients")
    # every ML–ML pair: an exception with no charge product and no epsilon
    zero_pairs = set()
    for k in range(nb.getNumExceptions()):
        i, j, qq, _, eps = nb.getExceptionParameters(k)
        if is_ml[i] and is_ml[j] and qq._value == 0 and eps._value == 0:
            zero_pairs.add((min(i, j), max(i, j)))
    missing = [p for p in itertools.combinations(sorted(ml.tolist()), 2) if p not in zero_pairs]
    if missing:
        problems.append(f"{len(missing)} ML–ML pairs still interact in NonbondedForce, e.g. {missing[0]}")
    for f in mm_system.getForces():
        if isinstance(f, openmm.CustomNonbondedForce):
            excl = {tuple(sorted(f.getExclusionParticles(k))) for k in range(f.getNumExclusions())}
            left = [p for p in itertools.combinations(sorted(ml.tolist()), 2) if p not in excl]
            if left:
                problems.append(f"CustomNonbondedForce '{f.getName()}': {len(left)} ML–ML pairs not excluded")
    if full_system is not None:
        nb0 = nonbonded_force(full_system)
        q0 = np.array([nb0.getParticleParameters(i)[0]._value for i in range(n)])
        lj0 = np.array([[p._value for p in nb0.getParticleParameters(i)[1:]] for i in range(n)])
        if not np.array_equal(q[~is_ml], q0[~is_ml]) or not np.array_equal(lj, lj0):
            problems.append("MM charges or Lennard-Jones parameters changed (the ML–MM LJ terms must be kept)")
        if mode == "mechanical":
            want = q0[ml] if ml_charges is None else np.asarray(ml_charges, dtype=np.float64)
            if not np.allclose(q[ml], want, rtol=0, atol=1e-12):
                problems.append("ML charges in the MM system differ from the mechanical-embedding charges")
    if engine is not None:
        if engine.mode != mode:
            problems.append(f"ML engine runs {engine.mode} embedding, the MM system was built for {mode}")
        if not np.array_equal(np.sort(engine.env.ml_indices), np.sort(ml)):
            problems.append("ML engine and MM system disagree on the ML-zone atoms")
        if engine.natoms != n:
            problems.append(f"ML engine has {engine.natoms} atoms, the MM system {n}")
    if problems:
        raise SetupError("ML/MM energy bookkeeping: " + "; ".join(problems))

"""Reading per-particle parameters out of an OpenMM system: the one place that knows where they live.

The MM charges (e) and Lennard-Jones parameters (nm, kJ/mol) sit in the system's single NonbondedForce;
the embedding, the MM-system surgery, the bookkeeping check and ``mlmm prepare`` all read them from here.
"""
from __future__ import annotations

import numpy as np
import openmm

from potentials.core.errors import SetupError


def nonbonded_force(system: openmm.System) -> openmm.NonbondedForce:
    """The one NonbondedForce of an MM system (SetupError if there is none or several)."""
    found = [f for f in system.getForces() if isinstance(f, openmm.NonbondedForce)]
    if len(found) != 1:
        raise SetupError(f"the MM system has {len(found)} NonbondedForce objects; ML/MM needs exactly one "
                         "(it holds the MM charges and the ML–MM Lennard-Jones terms)")
    return found[0]


def particle_charges(system: openmm.System | openmm.NonbondedForce) -> np.ndarray:
    """Partial charges (e) of every particle, from the system's NonbondedForce."""
    nb = system if isinstance(system, openmm.NonbondedForce) else nonbonded_force(system)
    e = openmm.unit.elementary_charge
    return np.array([nb.getParticleParameters(i)[0].value_in_unit(e) for i in range(nb.getNumParticles())])


def particle_lj(system: openmm.System | openmm.NonbondedForce) -> np.ndarray:
    """(n, 2) Lennard-Jones sigma (nm) and epsilon (kJ/mol) of every particle."""
    nb = system if isinstance(system, openmm.NonbondedForce) else nonbonded_force(system)
    nm, kj = openmm.unit.nanometer, openmm.unit.kilojoule_per_mole
    return np.array([[p[1].value_in_unit(nm), p[2].value_in_unit(kj)]
                     for p in (nb.getParticleParameters(i) for i in range(nb.getNumParticles()))]).reshape(-1, 2)


def exception_parameters(nb: openmm.NonbondedForce, k: int) -> tuple[int, int, float, float, float]:
    """Exception ``k``: atoms i, j, charge product (e^2), sigma (nm), epsilon (kJ/mol) as plain numbers."""
    i, j, qq, sigma, eps = nb.getExceptionParameters(k)
    return (i, j, qq.value_in_unit(openmm.unit.elementary_charge ** 2), sigma.value_in_unit(openmm.unit.nanometer),
            eps.value_in_unit(openmm.unit.kilojoule_per_mole))

"""The prepared system's structure as ``ase.Atoms``: the ASE edge (positions and cell in Å, masses in dalton).

Used by the launcher (i-PI's starting structure, written as extended XYZ) and by the in-process ASE calculator
(:meth:`coupling.ase_calculator.MLMMCalculator.initial_atoms`). Everything is taken from the OpenMM system the
MM client builds (:func:`potentials.openmm_system.load_system`), so i-PI and ASE integrate with exactly the MM
force field's masses (including hydrogen mass repartitioning).
"""
from __future__ import annotations

import numpy as np

from potentials.core.errors import SetupError
from potentials.core.spec import SystemSpec
from potentials.core.units import ANGSTROM_PER_NM


def ase_atoms(spec: SystemSpec):
    """The system's starting structure as ``ase.Atoms``: positions in Å, OpenMM masses, and the periodic box
    (rows = box vectors, Å) with ``pbc`` set if the system is periodic; no cell and ``pbc`` off otherwise.

    Raises SetupError for virtual sites (extra points): neither i-PI nor ASE integrates massless particles.
    """
    import ase
    from openmm import unit

    from potentials.openmm_system import load_system

    topology, system, pos_nm = load_system(spec)
    atoms = list(topology.atoms())
    for a in atoms:
        if a.element is None or system.isVirtualSite(a.index):
            raise SetupError(f"{spec.structure_path}: atom {a.index + 1} ({a.name}, residue {a.residue.name} "
                             f"{a.residue.id}) is a virtual site; i-PI cannot integrate extra points")
    pos = np.asarray(pos_nm, dtype=float) * ANGSTROM_PER_NM
    masses = np.array([system.getParticleMass(i).value_in_unit(unit.dalton) for i in range(len(atoms))])
    box = None
    if spec.structure.periodic:
        box = np.asarray(topology.getPeriodicBoxVectors().value_in_unit(unit.nanometer)) * ANGSTROM_PER_NM
    out = ase.Atoms([a.element.symbol for a in atoms], positions=pos, cell=box, pbc=spec.structure.periodic)
    out.set_masses(masses)
    return out

"""An ASE calculator for the full ML/MM potential, in-process: the MM client's OpenMM engine plus the ML client's
network engine, built by the very functions the socket clients use (:func:`coupling.engines.build_mm_engine`,
:func:`coupling.engines.build_ml_engine`), so ``ase.optimize``, ASE MD and NEB see exactly the energy i-PI
integrates: E = E_MM (MM–MM, ML–MM LJ) + E_ML (the zone in the field of the MM charges).

ASE units at this edge: positions and cell in Å, energy in eV, forces in eV/Å (converted with
:mod:`potentials.core.units`); inside, everything stays nm, kJ/mol.

Example::

    calc = MLMMCalculator("run1/system.toml", "inputs/models/small_b3lyp_svp.pt")
    atoms = calc.initial_atoms()            # the prepared structure, masses and box
    atoms.calc = calc
    ase.optimize.LBFGS(atoms).run(fmax=0.05)
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from ase.calculators.calculator import Calculator, all_changes

from potentials.core.errors import SetupError
from potentials.core.units import EV_PER_ANGSTROM_PER_KJMOL_PER_NM, EV_PER_KJMOL, NM_PER_ANGSTROM


class MLMMCalculator(Calculator):
    """ML/MM energy and forces of a prepared system (``system.toml`` from ``mlmm prepare``).

    Parameters
    ----------
    system_toml : str or Path
        The system file; the atoms given to :meth:`calculate` must be in its order (use :meth:`initial_atoms`).
    model : str or Path, optional
        Network model file for the ML zone. Required when the system has an ML zone; a system without one is
        pure MM.
    device : str
        torch device of the network (``cpu``, ``cuda``, ``cuda:N``).
    platform : str, optional
        OpenMM platform (``CPU``, ``CUDA``, ``Reference``); default: the MM client's choice.
    allow_embedding_mismatch : bool
        run a model whose recorded training embedding differs from the system's (a loud warning instead of the
        refusal; :func:`coupling.ml_engine.check_embedding`).

    ``results`` hold ``energy``/``free_energy`` (eV), ``forces`` (eV/Å) and, for inspection, ``energy_mm`` and
    ``energy_ml`` (eV) and ``ml_extras`` (the ML client's extras: ``ml.charges`` e, ``ml.dipole`` e·Å, ...).
    """

    implemented_properties = ("energy", "free_energy", "forces")   # a tuple: nothing can extend it in place

    def __init__(self, system_toml: str | Path, model: str | Path | None = None, device: str = "cpu",
                 platform: str | None = None, allow_embedding_mismatch: bool = False, **kwargs):
        super().__init__(**kwargs)
        from coupling.engines import EngineOptions, build_ml_engine, build_mm_engine
        from potentials.core.spec import SystemSpec

        self.spec = SystemSpec.load(system_toml)
        if self.spec.ml.indices and not model:
            raise SetupError(f"{system_toml} has an ML zone ({len(self.spec.ml.indices)} atoms): give the network "
                             "model file (MLMMCalculator(system, model=PATH) or --model PATH)")
        model = str(model) if model else None
        self.mm = build_mm_engine(self.spec, EngineOptions(model=model, device=device, platform=platform,
                                                           virial="none"))     # ASE reads no stress here
        self.ml = build_ml_engine(self.spec, EngineOptions(model=model, device=device,
                                                           allow_embedding_mismatch=allow_embedding_mismatch)) \
            if self.spec.ml.indices else None
        self.natoms = self.mm.natoms
        self.periodic = bool(self.spec.structure.periodic)

    def initial_atoms(self):
        """The system's prepared structure as ``ase.Atoms`` (Å, OpenMM masses, the box if periodic; no cell
        otherwise)."""
        from potentials.structure_io import ase_atoms

        return ase_atoms(self.spec)

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        if len(self.atoms) != self.natoms:
            raise SetupError(f"the atoms have {len(self.atoms)} atoms but {self.spec.structure_path} has "
                             f"{self.natoms}; start from MLMMCalculator.initial_atoms()")
        pos = self.atoms.get_positions()[None] * NM_PER_ANGSTROM                  # (1, N, 3) nm
        box = None
        if self.periodic:
            if self.atoms.cell.rank != 3:
                raise SetupError("the system is periodic but the atoms have no cell; use initial_atoms()")
            box = self.atoms.cell.array[None] * NM_PER_ANGSTROM                  # rows = vectors, nm
        mm = self.mm.compute(pos, box)[0]
        energy, forces = mm.energy, np.array(mm.forces, dtype=np.float64)
        self.results["energy_mm"] = mm.energy * EV_PER_KJMOL
        if self.ml is not None:
            ml = self.ml.compute(pos, box)[0]
            energy += ml.energy
            forces += ml.forces
            self.results["energy_ml"] = ml.energy * EV_PER_KJMOL
            self.results["ml_extras"] = ml.extras
        self.results["energy"] = self.results["free_energy"] = energy * EV_PER_KJMOL
        self.results["forces"] = forces * EV_PER_ANGSTROM_PER_KJMOL_PER_NM


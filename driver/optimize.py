"""`mlmm optimize SYSTEM`: relax a prepared structure on the full ML/MM potential before MD.

The energy is :class:`coupling.ase_calculator.MLMMCalculator` (the clients' own engines, in-process), the
optimiser ASE's. By default only the ML zone and the MM residues within ``--shell`` nm of it move (the rest was
already relaxed by ``mlmm prepare`` on the MM force field); ``--free all`` relaxes everything, ``--free ml``
only the ML zone. Writes ``OUT/NAME.pdb`` (or ``.cif`` for very large systems) and ``OUT/NAME.toml``: the same
system spec pointing at the new structure, ready for ``mlmm run``.
"""
from __future__ import annotations

import copy
import logging
import os
from pathlib import Path

import numpy as np

from potentials.core.errors import CalculationFailed, MLMMError, SetupError
from potentials.core.spec import SystemSpec
from potentials.core.units import KJMOL_PER_EV, NM_PER_ANGSTROM

log = logging.getLogger(__name__)

FREE_CHOICES = ("shell", "ml", "all")
OPTIMIZERS = ("LBFGS", "BFGS", "FIRE")


def main(args) -> int:
    """``mlmm optimize SYSTEM [--model M] [--out DIR] [--name N] [--free shell|ml|all] [--shell NM] [--fmax F]
    [--steps K] [--optimizer LBFGS|BFGS|FIRE] [--device D] [--platform P] [--allow-embedding-mismatch]``."""
    res = optimize(args.system, model=args.model, out=args.out, name=args.name, free=args.free,
                   shell_nm=args.shell, fmax=args.fmax, steps=args.steps, optimizer=args.optimizer,
                   device=args.device, platform=args.platform,
                   allow_embedding_mismatch=args.allow_embedding_mismatch)
    log.info("energy %.3f -> %.3f kJ/mol, max force %.3f -> %.3f eV/Å in %d steps (%d atoms free)%s; wrote %s",
             res["energy_start_kjmol"], res["energy_kjmol"], res["fmax_start"], res["fmax"], res["steps"],
             res["n_free"], "" if res["converged"] else " NOT converged (raise --steps)", res["system"])
    print(res["system"])
    return 0


def free_atoms(spec: SystemSpec, topology, positions_nm: np.ndarray, free: str, shell_nm: float) -> np.ndarray:
    """Indices of the atoms the optimiser may move.

    ``ml``: the ML zone; ``shell``: the ML zone and every MM residue with an atom within ``shell_nm`` of an ML
    atom (minimum image in a periodic box: residues are kept whole); ``all``: every atom.
    """
    n = len(positions_nm)
    if free == "all":
        return np.arange(n)
    ml = np.asarray(spec.ml.indices, dtype=np.int64)
    if free not in FREE_CHOICES:
        raise SetupError(f"--free {free!r}: choose one of {FREE_CHOICES}")
    if len(ml) == 0:
        raise SetupError(f"--free {free}: {spec.structure.file} has no ML zone; use --free all")
    if free == "ml":
        return ml
    from ase.geometry import get_distances

    cell = np.asarray(spec.structure.box_nm) if spec.structure.periodic and spec.structure.box_nm else None
    near = np.zeros(n, dtype=bool)
    for i in ml:                      # one ML atom at a time: memory stays O(N) for 1e5-atom systems
        _, d = get_distances(positions_nm[i:i + 1], positions_nm, cell=cell, pbc=None if cell is None else True)
        near |= d[0] < shell_nm
    residue_of = np.empty(n, dtype=np.int64)
    for res in topology.residues():
        for a in res.atoms():
            residue_of[a.index] = res.index
    keep = np.isin(residue_of, np.unique(residue_of[near]))
    keep[ml] = True
    return np.flatnonzero(keep)


def optimize(system: str | Path, *, model: str | Path | None = None, out: str | Path | None = None,
             name: str = "optimized", free: str = "shell", shell_nm: float = 0.6, fmax: float = 0.05,
             steps: int = 500, optimizer: str = "LBFGS", device: str = "cpu", platform: str | None = None,
             allow_embedding_mismatch: bool = False) -> dict:
    """Relax ``system`` and write ``OUT/NAME.pdb`` + ``OUT/NAME.toml``.

    Parameters
    ----------
    system : system.toml from ``mlmm prepare``
    model : network file (required if the system has an ML zone)
    out : output folder, default: the system file's folder
    name : stem of the written files
    free : ``shell`` | ``ml`` | ``all`` (see :func:`free_atoms`)
    shell_nm : float, nm
    fmax : float, eV/Å
        Convergence: the largest force on a free atom.
    steps : maximum optimiser steps
    optimizer : ``LBFGS`` (default, memory O(N)), ``BFGS`` (dense Hessian: small systems) or ``FIRE``

    Returns
    -------
    dict with ``system`` (the new toml), ``structure``, ``energy_start_kjmol``, ``energy_kjmol``, ``fmax_start``,
    ``fmax`` (eV/Å, free atoms), ``steps``, ``converged``, ``n_free``.
    """
    import ase.optimize
    from ase.constraints import FixAtoms

    from coupling.ase_calculator import MLMMCalculator
    from potentials.openmm_system import load_system

    if optimizer not in OPTIMIZERS:
        raise SetupError(f"--optimizer {optimizer!r}: choose one of {OPTIMIZERS}")
    if fmax <= 0 or steps < 0 or shell_nm < 0:
        raise SetupError(f"--fmax {fmax}, --steps {steps}, --shell {shell_nm}: need fmax > 0, steps >= 0, shell >= 0")
    spec = SystemSpec.load(system)
    out = Path(out) if out is not None else spec.root
    calc = MLMMCalculator(system, model, device=device, platform=platform,
                          allow_embedding_mismatch=allow_embedding_mismatch)
    topology, _, positions = load_system(copy.deepcopy(spec))
    structure, new_toml = _outputs(topology, out, name)
    moving = free_atoms(spec, topology, positions, free, shell_nm)
    atoms = calc.initial_atoms()
    atoms.calc = calc
    if len(moving) < len(atoms):
        atoms.set_constraint(FixAtoms(indices=np.setdiff1d(np.arange(len(atoms)), moving)))
    e0 = atoms.get_potential_energy() * KJMOL_PER_EV
    f0 = float(np.linalg.norm(atoms.get_forces(), axis=1).max())   # constrained forces: free atoms only
    log.info("optimising %d of %d atoms with %s (fmax %.3g eV/Å, at most %d steps); start: E = %.3f kJ/mol, "
             "max force %.3f eV/Å", len(moving), len(atoms), optimizer, fmax, steps, e0, f0)
    out.mkdir(parents=True, exist_ok=True)
    opt = getattr(ase.optimize, optimizer)(atoms, logfile=str(out / f"{name}.log"))
    try:
        converged = bool(opt.run(fmax=fmax, steps=steps))
    except MLMMError as exc:
        raise CalculationFailed(f"optimisation stopped at step {opt.nsteps}: {exc}. If the ML zone came apart, "
                                "the model gives it no stable geometry: check the model, or hold the zone "
                                f"(--free all moves everything; see {out / (name + '.log')})") from None
    e1 = atoms.get_potential_energy() * KJMOL_PER_EV
    f1 = float(np.linalg.norm(atoms.get_forces(), axis=1).max())

    if e1 > e0:
        log.warning("the energy went up (%.3f -> %.3f kJ/mol): the optimiser met a non-convex region; try "
                    "--optimizer FIRE or more --steps", e0, e1)
    pos_nm = atoms.get_positions() * NM_PER_ANGSTROM
    _save(spec, topology, pos_nm, structure, new_toml, out)
    return {"system": new_toml, "structure": structure, "energy_start_kjmol": e0, "energy_kjmol": e1,
            "fmax_start": f0, "fmax": f1, "steps": opt.nsteps, "converged": converged, "n_free": len(moving),
            "max_displacement_nm": float(np.linalg.norm(pos_nm - positions, axis=1).max())}


def _outputs(topology, out: Path, name: str) -> tuple[Path, Path]:
    """``OUT/NAME.pdb`` (``.cif`` when the PDB format's columns would overflow) and ``OUT/NAME.toml``; neither
    may exist."""
    big = topology.getNumAtoms() > 99_999 or any(len(str(r.id)) > 4 for r in topology.residues())
    structure = out / f"{name}.{'cif' if big else 'pdb'}"
    new_toml = out / f"{name}.toml"
    for p in (structure, new_toml):
        if p.exists():
            raise SetupError(f"{p} exists; choose another --name or --out (an optimised structure is never "
                             "overwritten)")
    return structure, new_toml


def _save(spec: SystemSpec, topology, pos_nm: np.ndarray, structure: Path, new_toml: Path, out: Path) -> None:
    """Write the optimised structure and a copy of ``spec`` pointing at it (local force-field files re-pathed)."""
    from openmm import app, unit

    writer = app.PDBxFile if structure.suffix == ".cif" else app.PDBFile
    with open(structure, "w") as fh:
        writer.writeFile(topology, pos_nm * unit.nanometer, fh, keepIds=True)
    new = copy.deepcopy(spec)
    new.structure.file = structure.name
    new.structure.forcefield = [_relocated(ff, spec.root, out) for ff in spec.structure.forcefield]
    new.save(new_toml)


def _relocated(ff: str, old_root: Path, new_root: Path) -> str:
    """A force-field entry valid from ``new_root``: local files (relative to the old toml) are re-pathed,
    OpenMM built-in names kept."""
    p = Path(ff)
    local = p if p.is_absolute() else old_root / p
    if not local.is_file():
        return ff
    return os.path.relpath(local.resolve(), Path(new_root).resolve())


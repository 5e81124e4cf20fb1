"""Build the capped side-chain fragments ACE-XXX-NME.pdb of this folder (issue #17, item 3).

Each fragment is the alanine dipeptide example (../alanine-dipeptide/input.pdb, ACE-ALA-NME) with Ala2 mutated by
PDBFixer (``applyMutations``), its hydrogens added by OpenMM's Modeller with an explicit variant for residue 2
(the protonation state), then minimised in vacuum with amber14-all (NoCutoff, LocalEnergyMinimizer, 10 kJ/mol/nm,
at most 500 steps, Reference platform: the same numbers everywhere). Written with the standard residue names
(HIS, CYS, ...; the protonation state is in the hydrogens, which is how amber14's template matching tells
HID/HIE/HIP and CYS/CYM apart) and without CONECT records (ACE/NME/amino-acid bonds come from OpenMM's
residue definitions).

    .venv/bin/python inputs/examples/fragments/make_fragments.py          # rewrites all 13 files

Deterministic: PDBFixer's and Modeller's random choices are seeded.
"""
from __future__ import annotations

import io
import random
import sys
from pathlib import Path

import numpy as np
import openmm
from openmm import app, unit

HERE = Path(__file__).resolve().parent
DIPEPTIDE = HERE.parent / "alanine-dipeptide" / "input.pdb"

# fragment name -> (residue to mutate Ala2 into, Modeller variant of residue 2)
FRAGMENTS = {
    "ASP": ("ASP", "ASP"),
    "GLU": ("GLU", "GLU"),
    "HID": ("HIS", "HID"),
    "HIE": ("HIS", "HIE"),
    "HIP": ("HIS", "HIP"),
    "SER": ("SER", None),
    "THR": ("THR", None),
    "TYR": ("TYR", None),
    "LYS": ("LYS", "LYS"),
    "ARG": ("ARG", None),
    "CYS": ("CYS", "CYS"),
    # Modeller's hydrogens.xml has no CYM variant: name the hydrogens explicitly (no HG on SG)
    "CYM": ("CYS", [("H", "N"), ("HA", "CA"), ("HB2", "CB"), ("HB3", "CB")]),
    "MET": ("MET", None),
}


def build(name: str, seed: int = 0) -> str:
    """The PDB text of ACE-<name>-NME."""
    from pdbfixer import PDBFixer

    target, variant = FRAGMENTS[name]
    random.seed(seed)
    np.random.seed(seed)
    fixer = PDBFixer(filename=str(DIPEPTIDE))
    chain = next(fixer.topology.chains()).id
    fixer.applyMutations([f"ALA-2-{target}"], chain)
    fixer.missingResidues = {}
    fixer.findMissingAtoms()
    fixer.addMissingAtoms(seed=seed)

    # hydrogens: residue 2's variant explicit; a variant list also removes hydrogens the variant lacks
    modeller = app.Modeller(fixer.topology, fixer.positions)
    modeller.delete([a for a in modeller.topology.atoms() if a.element.symbol == "H" and a.residue.index == 1])
    variants = [None] * modeller.topology.getNumResidues()
    variants[1] = variant
    reference = openmm.Platform.getPlatformByName("Reference")
    modeller.addHydrogens(pH=7.0, variants=variants, platform=reference)

    forcefield = app.ForceField("amber14-all.xml")
    system = forcefield.createSystem(modeller.topology, nonbondedMethod=app.NoCutoff, constraints=None)
    context = openmm.Context(system, openmm.VerletIntegrator(0.001), reference)
    context.setPositions(modeller.positions)
    openmm.LocalEnergyMinimizer.minimize(context, 10.0, 500)
    positions = context.getState(getPositions=True).getPositions()
    charge = sum(f.getParticleParameters(i)[0].value_in_unit(unit.elementary_charge)
                 for f in system.getForces() if isinstance(f, openmm.NonbondedForce)
                 for i in range(system.getNumParticles()))

    text = io.StringIO()
    app.PDBFile.writeFile(modeller.topology, positions, text, keepIds=True)
    lines = [ln for ln in text.getvalue().splitlines() if not ln.startswith(("CONECT", "REMARK"))]
    header = (f"REMARK   1 ACE-{name}-NME: capped {target} ({name}), net charge {round(charge):+d}; "
              "inputs/examples/fragments/make_fragments.py")
    return "\n".join([header] + lines) + "\n"


def main(names: list[str]) -> int:
    for name in names or FRAGMENTS:
        path = HERE / f"ACE-{name}-NME.pdb"
        path.write_text(build(name))
        print(path.relative_to(HERE.parents[2]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

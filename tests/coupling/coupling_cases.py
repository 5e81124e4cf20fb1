"""Small real OpenMM systems for the coupling tests (amber14 + flexible TIP3P) and OpenMM reference helpers."""
from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import openmm
from openmm import app, unit

# ACE-ALA-NME with hydrogens (fixed coordinates, so every run sees the same molecule)
DIPEPTIDE_PDB = """\
HETATM    1  CH3 ACE A   1       2.012   2.165   0.174  1.00  0.00           C
HETATM    2  H1  ACE A   1       1.373   2.818   0.766  1.00  0.00           H
HETATM    3  H2  ACE A   1       1.991   1.158   0.588  1.00  0.00           H
HETATM    4  H3  ACE A   1       1.669   2.144  -0.858  1.00  0.00           H
HETATM    5  C   ACE A   1       3.431   2.682   0.218  1.00  0.00           C
HETATM    6  O   ACE A   1       4.328   1.981   0.667  1.00  0.00           O
ATOM      7  N   ALA A   2       3.630   3.914  -0.246  1.00  0.00           N
ATOM      8  H   ALA A   2       2.835   4.446  -0.567  1.00  0.00           H
ATOM      9  CA  ALA A   2       4.923   4.598  -0.266  1.00  0.00           C
ATOM     10  HA  ALA A   2       5.505   4.275   0.599  1.00  0.00           H
ATOM     11  CB  ALA A   2       5.679   4.196  -1.541  1.00  0.00           C
ATOM     12  HB1 ALA A   2       6.659   4.673  -1.560  1.00  0.00           H
ATOM     13  HB2 ALA A   2       5.816   3.114  -1.564  1.00  0.00           H
ATOM     14  HB3 ALA A   2       5.114   4.505  -2.422  1.00  0.00           H
ATOM     15  C   ALA A   2       4.742   6.125  -0.173  1.00  0.00           C
ATOM     16  O   ALA A   2       3.667   6.645  -0.472  1.00  0.00           O
HETATM   17  N   NME A   3       5.800   6.841   0.228  1.00  0.00           N
HETATM   18  H   NME A   3       6.648   6.344   0.450  1.00  0.00           H
HETATM   19  C   NME A   3       5.799   8.296   0.362  1.00  0.00           C
HETATM   20  H1  NME A   3       6.771   8.646   0.712  1.00  0.00           H
HETATM   21  H2  NME A   3       5.028   8.600   1.074  1.00  0.00           H
HETATM   22  H3  NME A   3       5.577   8.755  -0.604  1.00  0.00           H
TER
END
"""
FORCEFIELD = ("amber14-all.xml", "amber14/tip3p.xml")


@dataclass
class MMCase:
    topology: app.Topology
    system: openmm.System
    positions: np.ndarray          # (N, 3) nm
    box: np.ndarray | None         # (3, 3) nm rows, None for a cluster
    ml: np.ndarray                 # ML-zone atom indices

    @property
    def charge(self) -> int:
        nb = next(f for f in self.system.getForces() if isinstance(f, openmm.NonbondedForce))
        q = sum(nb.getParticleParameters(int(i))[0].value_in_unit(unit.elementary_charge) for i in self.ml)
        return int(round(q))

    def numbers(self) -> np.ndarray:
        atoms = list(self.topology.atoms())
        return np.array([atoms[i].element.atomic_number for i in self.ml])


def _solvated_dipeptide(box_nm: float, with_ion: bool):
    ff = app.ForceField(*FORCEFIELD)
    pdb = app.PDBFile(io.StringIO(DIPEPTIDE_PDB))
    m = app.Modeller(pdb.topology, pdb.positions)
    if with_ion:               # a Na+ 0.6 nm from the peptide centre: a charged, two-molecule ML zone
        top = app.Topology()
        res = top.addResidue("NA", top.addChain())
        top.addAtom("NA", app.element.sodium, res)
        centre = np.mean(m.positions.value_in_unit(unit.nanometer), axis=0)
        m.add(top, [openmm.Vec3(*(centre + [0.0, 0.0, 0.6]))] * unit.nanometer)
    m.addSolvent(ff, model="tip3p", boxSize=openmm.Vec3(box_nm, box_nm, box_nm) * unit.nanometer, neutralize=False)
    return ff, m


def relax(system: openmm.System, positions: np.ndarray, box: np.ndarray | None, iterations: int) -> np.ndarray:
    """A short energy minimisation (CPU platform, one thread): waters oriented around the solute, no clashes."""
    platform = openmm.Platform.getPlatformByName("CPU")
    ctx = openmm.Context(system, openmm.VerletIntegrator(1e-3), platform, {"Threads": "1"})
    if box is not None:
        ctx.setPeriodicBoxVectors(*box)
    ctx.setPositions(positions)
    openmm.LocalEnergyMinimizer.minimize(ctx, 10.0, iterations)
    return ctx.getState(getPositions=True).getPositions(asNumpy=True).value_in_unit(unit.nanometer)


def build_dipeptide() -> tuple[app.ForceField, app.Topology, np.ndarray]:
    """ACE-ALA-NME alone: force field, topology and positions (nm)."""
    ff = app.ForceField(*FORCEFIELD)
    pdb = app.PDBFile(io.StringIO(DIPEPTIDE_PDB))
    m = app.Modeller(pdb.topology, pdb.positions)
    return ff, m.topology, np.array(m.positions.value_in_unit(unit.nanometer))


def build_cluster() -> MMCase:
    """Dipeptide + Na+ (the ML zone, charge +1) in a 1.3 nm water droplet, no box, NoCutoff, minimised."""
    ff, m = _solvated_dipeptide(3.2, with_ion=True)
    pos = np.array(m.positions.value_in_unit(unit.nanometer))
    solute = [a.index for a in m.topology.atoms() if a.residue.name != "HOH"]
    centre = pos[solute].mean(axis=0)
    far = [r for r in m.topology.residues() if r.name == "HOH"
           and np.linalg.norm(pos[next(r.atoms()).index] - centre) > 1.3]
    m.delete(far)
    m.topology.setPeriodicBoxVectors(None)
    system = ff.createSystem(m.topology, nonbondedMethod=app.NoCutoff, constraints=None, rigidWater=False)
    ml = np.array([a.index for a in m.topology.atoms() if a.residue.name != "HOH"])
    pos = relax(system, np.array(m.positions.value_in_unit(unit.nanometer)), None, 300)
    return MMCase(m.topology, system, pos, None, ml)


def build_water_box() -> MMCase:
    """The dipeptide in a periodic 3.4 nm TIP3P box, PME, ML zone = the dipeptide (neutral)."""
    ff, m = _solvated_dipeptide(3.4, with_ion=False)
    system = ff.createSystem(m.topology, nonbondedMethod=app.PME, nonbondedCutoff=1.0 * unit.nanometer,
                             constraints=None, rigidWater=False, ewaldErrorTolerance=1e-5)
    box = np.array(m.topology.getPeriodicBoxVectors().value_in_unit(unit.nanometer))
    ml = np.array([a.index for a in m.topology.atoms() if a.residue.name != "HOH"])
    # not relaxed: a minimisation of 3700 atoms costs ~10 s and is not reproducible on the CPU platform;
    # the water itself comes from OpenMM's pre-equilibrated box
    return MMCase(m.topology, system, np.array(m.positions.value_in_unit(unit.nanometer)), box, ml)


def openmm_energy_forces(system: openmm.System, positions: np.ndarray, box: np.ndarray | None = None
                         ) -> tuple[float, np.ndarray]:
    """Energy (kJ/mol) and forces (kJ/mol/nm) on the double-precision Reference platform."""
    ctx = openmm.Context(system, openmm.VerletIntegrator(1e-3), openmm.Platform.getPlatformByName("Reference"))
    if box is not None:
        ctx.setPeriodicBoxVectors(*box)
    ctx.setPositions(positions)
    st = ctx.getState(getEnergy=True, getForces=True)
    return (st.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole),
            st.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer))

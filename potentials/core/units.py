"""The one table of unit conversions.

Internal units of the project are OpenMM's: nm, ps, kJ/mol, elementary charge. Conversions happen only at
three edges: the i-PI socket codec (bohr/hartree), the network adapter (Å/eV) and input parsing.

The atomic-unit factors are i-PI's own (``ipi.utils.units``) so that a value that goes through i-PI and back
is bit-for-bit consistent; they differ from CODATA by ~1e-8 relative.
"""

BOHR_PER_ANGSTROM = 1.8897261          # i-PI UnitMap['length']['angstrom']
HARTREE_PER_EV = 0.036749326           # i-PI UnitMap['energy']['electronvolt']
HARTREE_PER_KJMOL = 3.8087989e-4       # i-PI UnitMap['energy']['j/mol'] * 1000

ANGSTROM_PER_NM = 10.0
NM_PER_ANGSTROM = 0.1
BOHR_PER_NM = BOHR_PER_ANGSTROM * ANGSTROM_PER_NM
NM_PER_BOHR = 1.0 / BOHR_PER_NM

KJMOL_PER_HARTREE = 1.0 / HARTREE_PER_KJMOL
KJMOL_PER_EV = HARTREE_PER_EV / HARTREE_PER_KJMOL
EV_PER_KJMOL = 1.0 / KJMOL_PER_EV
EV_PER_HARTREE = 1.0 / HARTREE_PER_EV

# forces: kJ/mol/nm <-> hartree/bohr, eV/Å
HARTREE_PER_BOHR_PER_KJMOL_PER_NM = HARTREE_PER_KJMOL / BOHR_PER_NM
EV_PER_ANGSTROM_PER_KJMOL_PER_NM = EV_PER_KJMOL / ANGSTROM_PER_NM

# Coulomb constant k_e in eV·Å/e² (Hartree·Bohr with the factors above) and in kJ/mol·nm/e² (OpenMM's ONE_4PI_EPS0)
COULOMB_EV_ANGSTROM = EV_PER_HARTREE / BOHR_PER_ANGSTROM
COULOMB_KJMOL_NM = 138.935456

KCALMOL_PER_EV = KJMOL_PER_EV / 4.184
KJMOL_PER_KCALMOL = 4.184              # thermochemical calorie (force-field tables in kcal/mol)

FS_PER_PS = 1000.0                     # time: MD settings in fs and ps

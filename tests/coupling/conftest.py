"""Session-wide OpenMM test systems for the coupling tests (built once: hydrogens, solvation)."""
import pytest

from coupling_cases import build_cluster, build_dipeptide, build_water_box


@pytest.fixture(scope="session")
def dipeptide():
    """(ForceField, Topology, positions nm) of ACE-ALA-NME alone."""
    return build_dipeptide()


@pytest.fixture(scope="session")
def cluster():
    """Dipeptide + Na+ (the ML zone, +1 e) in a 1.3 nm water droplet, NoCutoff (an MMCase)."""
    return build_cluster()


@pytest.fixture(scope="session")
def water_box():
    """The dipeptide (ML zone, neutral) in a periodic 3.4 nm TIP3P box, PME (an MMCase)."""
    return build_water_box()

"""How the zones meet: ML-zone selection, the MM point-charge embedding, ML–MM Lennard-Jones, energy bookkeeping."""

# embedding schemes in their own modules register themselves in coupling.schemes.SCHEMES on import (here, not at
# the end of coupling/schemes.py: the scheme module imports that one, and imports must not form cycles)
from coupling import schemes_lr  # noqa: E402,F401  ("electrostatic-lr")
from coupling import schemes_charges  # noqa: E402,F401  ("model-charges")

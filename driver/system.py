"""Compatibility alias: the system moved to :mod:`potentials.core.spec` (the bottom layer)."""
from potentials.core.spec import *  # noqa: F401,F403

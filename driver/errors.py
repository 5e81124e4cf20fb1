"""Compatibility alias: the errors moved to :mod:`potentials.core.errors` (the bottom layer)."""
from potentials.core.errors import *  # noqa: F401,F403

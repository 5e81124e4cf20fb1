"""Compatibility alias: the units moved to :mod:`potentials.core.units` (the bottom layer)."""
from potentials.core.units import *  # noqa: F401,F403

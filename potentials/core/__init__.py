"""The bottom floor: contracts every layer may import, and nothing else.

``errors`` (the project's exceptions), ``units`` (the one table of conversion factors), ``spec`` (the
system.toml schema), ``config`` (the one TOML -> dataclass loader), ``contracts`` (what an engine returns and
the engine protocol), ``registry`` (the named-registry type behind every seam). Nothing here imports from
``driver``, ``coupling`` or the rest of ``potentials``.
"""

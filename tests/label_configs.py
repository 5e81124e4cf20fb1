"""Small ``mlmm label`` configs for end-to-end tests: one QM zone in a water cluster, one 300 K chain, PySCF
STO-3G on a coarse grid, 50 fs of equilibration: seconds per frame."""
from __future__ import annotations


def cluster_toml(solute: str = "MOH", cluster_waters: int = 10, ml_waters: int = 1, frames: int = 1,
                 displaced_copies: int = 1, conv_tol: float = 1e-8, spacing_ps: float | None = None) -> str:
    """The TOML text (one trajectory of ``frames`` frames, each with ``displaced_copies`` displaced copies)."""
    spacing = f"spacing_ps = {spacing_ps}\n" if spacing_ps is not None else ""
    return f"""
solutes = ["{solute}"]
solvated_kinds = ["cluster"]
cluster_waters = {cluster_waters}
ml_waters = {ml_waters}
temperatures_K = [300.0]
gas = false
trajectories = 1
frames_per_trajectory = {frames}
displaced_copies = {displaced_copies}
split_pattern = ["train"]
equil_ps = 0.05
{spacing}[level]
basis = "sto-3g"
grid_level = 1
conv_tol = {conv_tol}
"""

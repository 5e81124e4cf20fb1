"""The `system.toml` file: everything a client needs to rebuild the system, written by `mlmm prepare`.

Paths inside the file are relative to the file's own folder. Lengths are in nm, energies in kJ/mol.
Unknown keys are errors, so a typo never silently falls back to a default.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import tomli_w

from potentials.core import config
from potentials.core.errors import SetupError

SCHEMA_VERSION = 1


@dataclass
class StructureSpec:
    file: str                                   # PDB (or PDBx) with the full prepared system
    forcefield: list[str] = field(default_factory=lambda: ["amber14-all.xml", "amber14/tip3p.xml"])
    periodic: bool = True
    box_nm: list[list[float]] | None = None     # box vectors as rows (nm); None for clusters


@dataclass
class MLSpec:
    selection: str = ""                         # the selection string the user gave
    indices: list[int] = field(default_factory=list)   # resolved 0-based atom indices of the ML zone
    charge: int = 0                             # total charge of the ML zone (e)
    zone: str = "whole-molecules"               # ML-zone mapping (coupling.zones.ZONES): whole molecules today
    lj: str = "gaff"                            # LJ of ML atoms without MM template: "gaff" typed | "element" (legacy)
    lj_table: dict[str, list[float]] = field(default_factory=dict)  # element -> [sigma_nm, epsilon_kjmol]


@dataclass
class MMSpec:
    nonbonded_method: str = "PME"               # PME | NoCutoff | CutoffNonPeriodic | CutoffPeriodic
    cutoff_nm: float = 1.0
    ewald_tolerance: float = 5e-4
    rigid_water: bool = False                   # i-PI integrates without constraints: water must be flexible
    hydrogen_mass_amu: float | None = None


# the embedding scheme (coupling.schemes.SCHEMES) of a system file that names none, by periodicity: long-range
# electrostatics (PME beyond the embedding cutoff) in a box; the cutoff-only "electrostatic" for a cluster
DEFAULT_EMBEDDING = {True: "electrostatic-lr", False: "electrostatic"}


@dataclass
class CouplingSpec:
    embedding: str = ""                         # electrostatic-lr | electrostatic | mechanical | ...; "": by periodicity
    cutoff_nm: float = 1.2                      # MM residues within this distance of any ML atom are embedded
    switch_width_nm: float = 0.2                # smooth switch over [cutoff - width, cutoff]
    skin_nm: float = 0.1                        # ML client's neighbour-list skin (0: search every step)
    mechanical_charges: str = "model"           # mechanical mode: "model" (network in vacuum) or "mm"


@dataclass
class SystemSpec:
    structure: StructureSpec
    ml: MLSpec = field(default_factory=MLSpec)
    mm: MMSpec = field(default_factory=MMSpec)
    coupling: CouplingSpec = field(default_factory=CouplingSpec)
    version: int = SCHEMA_VERSION
    root: Path = field(default=Path("."), compare=False, repr=False, metadata={"config": False})   # folder of the toml file

    def __post_init__(self):
        if not self.coupling.embedding:
            self.coupling.embedding = DEFAULT_EMBEDDING[bool(self.structure.periodic)]

    # ---------------------------------------------------------------- paths
    def path(self, name: str) -> Path:
        """Resolve a path stored in the file relative to the file's folder."""
        p = Path(name)
        return p if p.is_absolute() else (self.root / p)

    @property
    def structure_path(self) -> Path:
        return self.path(self.structure.file)

    # ---------------------------------------------------------------- I/O
    @classmethod
    def load(cls, path: str | Path) -> "SystemSpec":
        path = Path(path)
        if not path.is_file():
            raise SetupError(f"system file {path} not found; create one with `mlmm prepare PDB --out DIR`")
        raw = config.read_toml(path, "system file")
        spec = cls.from_dict(raw, where=str(path))
        spec.root = path.resolve().parent
        return spec

    @classmethod
    def from_dict(cls, raw: dict, where: str = "system") -> "SystemSpec":
        raw = dict(raw)
        version = raw.pop("version", SCHEMA_VERSION)
        if version != SCHEMA_VERSION:
            raise SetupError(f"{where}: system file version {version}, this mlmm reads version {SCHEMA_VERSION}; "
                             "re-run `mlmm prepare`")
        if "structure" not in raw:
            raise SetupError(f"{where}: missing [structure] table")
        return config.build(cls, {**raw, "version": version}, where)

    def to_dict(self) -> dict:
        return {"version": self.version, **{name: config.to_dict(getattr(self, name))
                                            for name in ("structure", "ml", "mm", "coupling")}}

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.write_text(tomli_w.dumps(self.to_dict()))
        self.root = path.resolve().parent


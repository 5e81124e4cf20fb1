"""The `system.toml` file: everything a client needs to rebuild the system, written by `mlmm prepare`.

Paths inside the file are relative to the file's own folder. Lengths are in nm, energies in kJ/mol.
Unknown keys are errors, so a typo never silently falls back to a default.
"""
from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import tomli_w

from .errors import SetupError

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
    lj: str = "element"                         # where ML atoms without MM template get LJ: "element" table
    lj_table: dict[str, list[float]] = field(default_factory=dict)  # element -> [sigma_nm, epsilon_kjmol]


@dataclass
class MMSpec:
    nonbonded_method: str = "PME"               # PME | NoCutoff | CutoffNonPeriodic | CutoffPeriodic
    cutoff_nm: float = 1.0
    ewald_tolerance: float = 5e-4
    rigid_water: bool = False                   # i-PI integrates without constraints: water must be flexible
    hydrogen_mass_amu: float | None = None


@dataclass
class CouplingSpec:
    embedding: str = "electrostatic"            # electrostatic | mechanical
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
    root: Path = field(default=Path("."), compare=False, repr=False)   # folder of the toml file

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
        try:
            raw = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise SetupError(f"{path}: not valid TOML ({exc})") from None
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
        sections = {"structure": StructureSpec, "ml": MLSpec, "mm": MMSpec, "coupling": CouplingSpec}
        unknown = set(raw) - set(sections)
        if unknown:
            raise SetupError(f"{where}: unknown table(s) {sorted(unknown)}; allowed: {sorted(sections)}")
        parts = {}
        for name, klass in sections.items():
            if name in raw:
                parts[name] = _build(klass, raw[name], f"{where} [{name}]")
        return cls(**parts, version=version)

    def to_dict(self) -> dict:
        out: dict = {"version": self.version}
        for name in ("structure", "ml", "mm", "coupling"):
            out[name] = {k: v for k, v in dataclasses.asdict(getattr(self, name)).items() if v is not None}
        return out

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.write_text(tomli_w.dumps(self.to_dict()))
        self.root = path.resolve().parent


def _build(klass, values: dict, where: str):
    if not isinstance(values, dict):
        raise SetupError(f"{where}: expected a table, got {values!r}")
    names = {f.name for f in dataclasses.fields(klass)}
    unknown = set(values) - names
    if unknown:
        raise SetupError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: {sorted(names)}")
    try:
        return klass(**values)
    except TypeError as exc:
        raise SetupError(f"{where}: {exc}") from None

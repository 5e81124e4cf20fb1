"""Embedding schemes: how the ML zone meets the MM point charges, as one object per scheme.

A scheme owns everything that differs between ways of coupling the zones:

* its rows of the ownership table (who computes which energy term: :meth:`EmbeddingScheme.terms`);
* what the ML atoms carry in the MM client's NonbondedForce (:meth:`EmbeddingScheme.ml_charges_in_mm`,
  :meth:`EmbeddingScheme.fixed_charges`), used by the MM-system surgery and checked by
  :func:`coupling.bookkeeping.check_split`;
* the network's field inputs in a simulation and their backward pass (:meth:`EmbeddingScheme.field_source`,
  used by :class:`coupling.ml_engine.MLEngine`);
* the network's energy of labelled frames (:meth:`EmbeddingScheme.network_energy`, the
  :class:`potentials.core.contracts.TrainingScheme` that training and evaluation are handed).

The ML client, training, evaluation and the bookkeeping check all take the same scheme object from
:data:`SCHEMES`. A new scheme (a long-range correction, a polarisable embedding) is one new module with a
subclass and ``@SCHEMES.register("name")``; nothing else changes (docs/architecture.md).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, NamedTuple

import numpy as np

if TYPE_CHECKING:                                    # torch is imported where it is used: the MM client
    import torch                                     # builds its system with this module and no torch

from coupling.environment import MMEnvironment
from potentials.core.errors import SetupError
from potentials.core.registry import Registry

SCHEMES: Registry = Registry("embedding mode")


class Term(NamedTuple):
    """One row of the ownership table: an energy term and who computes it."""

    term: str
    owner: str


# terms every scheme assigns the same way
COMMON_TERMS: tuple[Term, ...] = (
    Term("MM–MM bonded terms", "MM"),
    Term("MM–MM Coulomb (PME / cutoff / none)", "MM"),
    Term("MM–MM Lennard-Jones", "MM"),
    Term("ML–ML bonded + nonbonded (the ML zone's own energy)", "ML"),
    Term("ML–ML dispersion, within and between ML molecules", "ML (the model's D3(BJ) term if its file has "
                                                              "d3 = true, else whatever the model learned)"),
)
TRAILING_TERMS: tuple[Term, ...] = (
    Term("ML–MM Lennard-Jones", "MM"),
    Term("long-range LJ dispersion correction (constant, all atom types)", "MM"),
    Term("restraints and barostats (CustomExternalForce, MonteCarlo*)", "MM"),
)


class FrameInputs(NamedTuple):
    """What the network's energy of one structure depends on, beyond the ML zone itself.

    atoms : system atoms whose positions enter (ML atoms first, then embedded MM atoms)
    shift : (len(atoms), 3) nm, constant offsets (zone made whole, periodic images) added to their positions
    field : the phi/E of the embedded charges and their backward pass (None: the network sees phi = E = 0)
    n_embedded : number of embedded MM atoms (the ``ml.n_embedded`` extra)
    term : an energy the scheme adds to the model's from the model's own outputs (:class:`ModelTerm`), or None
    """

    atoms: np.ndarray
    shift: np.ndarray
    field: "EmbeddingField | None"   # coupling.embedding.EmbeddingField
    n_embedded: int
    term: "ModelTerm | None" = None


class ModelTerm:
    """An energy a scheme adds to the model's after the model call, from what the model predicted (e.g. its
    atomic charges): the ML engine's hook for terms that depend on the model's outputs.

    For each structure the engine calls :meth:`energy` inside its batched evaluation, adds the result to the
    model's energy before autograd (so forces go through the model's outputs too: dq/dR, dq/dphi), reports it in
    ``ml.energy`` under :attr:`name`, and after the backward pass adds :meth:`result` (forces on atoms the term
    itself reads, beyond the engine's leaves, and their share of the virial) to the structure's result.
    """

    name: ClassVar[str] = "term"

    def energy(self, out: dict, rows: slice, positions: torch.Tensor, phi: torch.Tensor,
               field: torch.Tensor) -> torch.Tensor:
        """0-d float64 tensor (kJ/mol). ``out``: the adapter's output dict of the whole batch (``rows``: this
        structure's model atoms in its per-atom entries, e.g. ``out["charges"][rows]``); ``positions`` (n,3) nm:
        the model atoms as the model saw them (zone made whole), differentiable; ``phi`` (n,) kJ/mol/e and
        ``field`` (n,3) kJ/mol/e/nm: the field inputs the model got (leaves: their chain rule is the field's)."""
        raise NotImplementedError

    def result(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """After the backward pass: (system atoms, forces on them (kJ/mol/nm), virial (3,3) kJ/mol) of the
        term's dependence on anything but the engine's leaves. The virial is the part the engine's sum of
        f (x) r over its own atoms does not cover: -dE/d(strain) of the term at fixed model outputs, less the
        sum of f (x) r of the term's forces on the model positions."""
        raise NotImplementedError


class EmbeddingScheme:
    """Base class of the schemes; subclasses set the class attributes and override what differs."""

    name: ClassVar[str] = ""
    field_inputs: ClassVar[bool] = False          # the network is fed phi and E of the MM charges
    # the scheme whose field inputs (and so trained models) this one shares (None: its own name), and what it adds
    # beyond the embedding cutoff at run time; read by coupling.ml_engine.check_embedding
    family: ClassVar[str | None] = None
    long_range: ClassVar[str] = "none"
    coulomb_terms: ClassVar[tuple[Term, ...]] = ()

    # ------------------------------------------------------------------ bookkeeping
    def terms(self) -> tuple[Term, ...]:
        return COMMON_TERMS + self.coulomb_terms + TRAILING_TERMS

    def ownership_table(self) -> str:
        """The ownership table as aligned text (logs, docs)."""
        rows = self.terms()
        width = max(len(t.term) for t in rows)
        return "\n".join(f"{t.term:<{width}}  {t.owner}" for t in rows)

    @classmethod
    def family_name(cls) -> str:
        """The family of this scheme's field inputs: a model trained in any scheme of the family fits it."""
        return cls.family or cls.name

    def for_zone(self, numbers) -> "EmbeddingScheme":
        """The scheme bound to a zone's atomic numbers (schemes with per-element parameters return a bound copy;
        the others are the same for every zone)."""
        return self

    # ------------------------------------------------------------------ MM side
    def fixed_charges(self, spec, topology, positions_nm, model_path=None, device="cpu") -> np.ndarray | None:
        """Charges (e) the ML atoms keep in the MM client for this system (None: the scheme's default)."""
        return None

    def ml_charges_in_mm(self, mm_charges: np.ndarray, fixed: np.ndarray | None) -> np.ndarray:
        """What the ML atoms carry in the MM client's NonbondedForce, given their force-field charges and the
        scheme's fixed charges (if any)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ ML side
    def field_source(self, env: MMEnvironment, skin: float, device) -> "FieldSource":
        """Per-structure producer of :class:`FrameInputs` (one per batch slot: it may keep a neighbour list)."""
        return VacuumField(env)

    def network_energy(self, model, numbers, positions, mol_idx, charge, phi, field):
        """Training/evaluation: (energy [B], output dict) of the model for frames whose MM charges give
        ``phi``/``field`` at the ML atoms (model units)."""
        raise NotImplementedError

    @staticmethod
    def point_charges(charges, residue, ml_indices, cutoff_nm: float, switch_nm: float, zone=None,
                      ml_charge: int | None = None) -> "PointCharges":
        """The MM point charges a QM/MM reference calculation sees (labelling): the embedding's residues
        within the cutoff, scaled by its switch. The same for every scheme: reference data are always
        electrostatically embedded, the scheme decides what the network makes of them. ``zone``: an ML-zone
        mapping with extra model atoms (link-atom caps, :mod:`coupling.link_atoms`): the QM zone is then the
        model's atoms (caps included) and the charges are the zone's boundary charges, as in a run."""
        env = MMEnvironment(np.asarray(charges), np.asarray(residue), np.asarray(ml_indices), cutoff=cutoff_nm,
                            switch_width=switch_nm)
        return PointCharges(env if zone is None else zone.environment(env, ml_charge), zone)


class FieldSource:
    """Produces the :class:`FrameInputs` of one structure (positions nm, box rows nm or None)."""

    def inputs(self, positions: np.ndarray, box: np.ndarray | None, ml_raw: np.ndarray,
               device) -> FrameInputs:
        raise NotImplementedError


class VacuumField(FieldSource):
    """No field: the zone made whole, phi = E = 0."""

    def __init__(self, env: MMEnvironment):
        self.env = env

    def inputs(self, positions, box, ml_raw, device) -> FrameInputs:
        from coupling.embedding import zone_shift

        return FrameInputs(self.env.ml_indices, zone_shift(ml_raw, box), None, 0)


class EmbeddedField(FieldSource):
    """phi and E of the embedded MM charges (:class:`coupling.embedding.EmbeddingField`), with a Verlet list."""

    def __init__(self, env: MMEnvironment, skin: float):
        from coupling.embedding import NeighbourList

        self.env, self.nlist = env, NeighbourList(env, skin)

    @property
    def builds(self) -> int:
        return self.nlist.builds

    def inputs(self, positions, box, ml_raw, device) -> FrameInputs:
        sel = self.nlist.get(positions, box)
        from coupling.embedding import EmbeddingField

        field = EmbeddingField(self.env, sel, ml_raw, positions[sel.atoms], device=device)
        return FrameInputs(np.concatenate([self.env.ml_indices, sel.atoms]),
                           np.concatenate([sel.ml_shift, sel.shift]), field, int(len(sel.atoms)))


class PointCharges:
    """The embedded MM charges of single frames, for the QM/MM reference calculations."""

    def __init__(self, env: MMEnvironment, zone=None):
        self.env, self.zone = env, zone

    def frame(self, positions_nm: np.ndarray, box_nm: np.ndarray | None
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ML positions made whole (n_ml,3) nm, embedded MM positions (M,3) nm, scaled charges (M,) e); with a
        zone that adds model atoms (caps) the first are the model's atoms, caps last."""
        if self.zone is not None:
            positions_nm = self.zone.extend(np.asarray(positions_nm, dtype=np.float64), box_nm)
        import torch

        from coupling.embedding import embedded_charges, select_environment

        sel = select_environment(self.env, positions_nm, box_nm)
        ml = positions_nm[self.env.ml_indices]
        if sel.ml_shift is not None:
            ml = ml + sel.ml_shift
        with torch.no_grad():
            q, mm_pos = embedded_charges(self.env, sel, torch.tensor(positions_nm, dtype=torch.float64))
        return ml, mm_pos.numpy(), q.numpy()


@SCHEMES.register("electrostatic")
class ElectrostaticEmbedding(EmbeddingScheme):
    """The network is fed phi and E of the MM charges within the embedding cutoff and owns the ML–MM
    Coulomb term; the ML atoms carry no charge in the MM client (PME sees none)."""

    name = "electrostatic"
    field_inputs = True
    coulomb_terms = (
        Term("ML–MM Coulomb", "ML (network fed phi, E of MM charges within the embedding cutoff)"),
        Term("ML charges with their own periodic images", "nobody (ML charges are zero in PME)"),
    )

    def ml_charges_in_mm(self, mm_charges, fixed):
        if fixed is not None:
            raise SetupError("ml_charges are only used in mechanical embedding (electrostatic mode zeroes them)")
        return np.zeros_like(np.asarray(mm_charges, dtype=np.float64))

    def field_source(self, env, skin, device) -> FieldSource:
        return EmbeddedField(env, skin)

    def network_energy(self, model, numbers, positions, mol_idx, charge, phi, field):
        out = model(numbers, positions, mol_idx, charge, phi, field)
        return out["energy"], out


@SCHEMES.register("mechanical")
class MechanicalEmbedding(EmbeddingScheme):
    """The network sees the zone in vacuum (phi = E = 0); the ML atoms keep fixed charges in the MM client,
    which computes the ML–MM Coulomb term (and the ML charges' periodic images) with PME.

    Fixed charges: ``[coupling] mechanical_charges = "model"`` (the network's vacuum charges at the starting
    geometry) or ``"mm"`` (the force field's)."""

    name = "mechanical"
    field_inputs = False
    coulomb_terms = (
        Term("ML–MM Coulomb", "MM (fixed ML charges)"),
        Term("ML charges with their own periodic images", "MM"),
    )

    def fixed_charges(self, spec, topology, positions_nm, model_path=None, device="cpu"):
        source = spec.coupling.mechanical_charges
        if source == "mm":
            return None
        if source != "model":
            raise SetupError(f"[coupling] mechanical_charges = {source!r}; choose \"model\" or \"mm\"")
        if model_path is None or positions_nm is None:
            raise SetupError("mechanical embedding with mechanical_charges = \"model\" needs the model file "
                             "(--model) for the MM client; or set [coupling] mechanical_charges = \"mm\"")
        from coupling.zones import ZONES
        from potentials.adapters import load_adapter

        zone = ZONES.get(spec.ml.zone).from_topology(topology, np.asarray(spec.ml.indices, dtype=np.int64))
        box = np.asarray(spec.structure.box_nm, dtype=np.float64) if spec.structure.periodic else None
        pos = zone.extend(np.asarray(positions_nm, dtype=np.float64), box)[zone.model_indices]
        return zone.ml_charges(load_adapter(model_path, device).vacuum_charges(zone.numbers, pos, spec.ml.charge))

    def ml_charges_in_mm(self, mm_charges, fixed):
        want = np.asarray(mm_charges if fixed is None else fixed, dtype=np.float64).reshape(-1)
        if want.shape != np.shape(mm_charges) or not np.all(np.isfinite(want)):
            raise SetupError(f"need {np.size(mm_charges)} finite ML charges (one per ML atom), got {want.shape[0]}")
        return want

    def network_energy(self, model, numbers, positions, mol_idx, charge, phi, field):
        import torch

        out = model(numbers, positions, mol_idx, charge, torch.zeros_like(phi), torch.zeros_like(field))
        energy = out["energy"]
        coul = out["charges"].detach() * phi                       # q_i phi_i with the charges held fixed
        return energy + torch.zeros_like(energy).index_add_(0, mol_idx, coul.to(energy.dtype)), out


def get_scheme(scheme: "str | EmbeddingScheme") -> EmbeddingScheme:
    """The scheme object for a name (SetupError naming the known ones) or the object itself."""
    return scheme if isinstance(scheme, EmbeddingScheme) else SCHEMES.get(scheme)()


def scheme_family(name: str) -> str:
    """The family of the scheme called ``name`` (:meth:`EmbeddingScheme.family_name`; a name this registry does not
    know, e.g. recorded in a model file by another version, is its own family)."""
    return SCHEMES.get(name).family_name() if name in SCHEMES else str(name)


# schemes in their own modules, imported (and registered) on first use: they import this module, and importing
# them here would make a cycle and put their kernels on the start-up path of every command
SCHEMES.register_lazy("electrostatic-lr", "coupling.schemes_lr")
SCHEMES.register_lazy("model-charges", "coupling.schemes_charges")
SCHEMES.register_lazy("emle", "coupling.schemes_emle")

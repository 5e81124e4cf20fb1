"""The ML client's engine: a model's energy of the ML zone, coupled to the MM charges by an embedding scheme.

The engine composes three seams: the *zone* (:mod:`coupling.zones`: which system atoms the model sees), the
*scheme* (:mod:`coupling.schemes`: the field inputs and their backward pass, e.g. phi and E of the embedded
MM charges from :class:`coupling.embedding.EmbeddingField`) and the *model adapter*
(:mod:`potentials.adapters`: the potential, in the engine's units nm / kJ/mol / e).

For each structure of a request the scheme's field source picks the MM charges and their images (numpy, a
Verlet list) and computes phi and E at the ML atoms; then ONE batched model call covers all structures
(``mol_idx``), autograd gives dE/d(ML positions, phi, E), and the field's own backward pass carries
dE/d(phi, E) on to the ML atoms and the embedded MM atoms. No unit is converted here: the adapter is that
edge; the extras are written in their documented units by :func:`ml_extras`.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch

from coupling.committee_spread import committee_extras, member_ml_forces, spread
from coupling.embedding import MMEnvironment
from coupling.schemes import FrameInputs, get_scheme, scheme_family
from coupling.zones import ZONES, WholeMolecules, warn_new_domain, zone_molecules
from potentials.adapters import adapt, torch_device, weights_dtype
from potentials.core.contracts import ForceResult
from potentials.core.errors import CalculationFailed, SetupError
from potentials.core.units import ANGSTROM_PER_NM
from potentials.electrostatics import DAMPING_RANGE, damped_field_excess

log = logging.getLogger(__name__)


model_dtype = weights_dtype      # the floating dtype a module computes in (float64 if it has no weights)


def as_adapter(model, device):
    """``model`` as a :class:`potentials.core.contracts.ModelAdapter` (a bare network module is wrapped)."""
    return adapt(model, device)


class MLEngine:
    """:class:`potentials.core.contracts.Engine` for the ML zone.

    Parameters
    ----------
    model : a model adapter (:func:`potentials.adapters.load_adapter`) or a network module with the network's
        ``forward(numbers, positions Å, mol_idx, charge, phi V, efield V/Å)`` (wrapped in its adapter).
    numbers : (n_ml,) int
        atomic numbers of the ML atoms, in the order of ``env.ml_indices``.
    charge : int
        total charge of the ML zone (e).
    env : MMEnvironment
        MM charges, residues and ML indices (:func:`coupling.mmsystem.mm_environment`).
    mode : an embedding scheme name or object (:data:`coupling.schemes.SCHEMES`).
    device : torch device string (``cpu``, ``cuda``, ``cuda:N``).
    periodic : bool
        False: boxes are ignored (clusters; i-PI always sends a cell).
    dtype : accepted for compatibility; the adapter decides its input dtype.
    skin : nm; the embedded residues are searched within ``cutoff + skin`` and the list is reused until an atom
        has moved ``skin / 2`` (:class:`coupling.embedding.NeighbourList`; 0: search on every call).
    compile : run the network through ``torch.compile`` (fixed shapes: the ML zone never changes size). If
        compiling fails the network runs eagerly (``compiled`` is then False).
    zone : the ML-zone mapping (default: whole molecules, the identity).

    Each :class:`ForceResult` carries forces on the ML atoms and on the embedded MM atoms (zero elsewhere),
    the virial ``sum_i f_i (x) r_i`` over the positions the energy saw (ML zone made whole, MM residues at
    their minimum image) and the extras of :func:`ml_extras`.
    """

    def __init__(self, model, numbers, charge: int, env: MMEnvironment, *, mode="electrostatic",
                 device: str | torch.device = "cpu", periodic: bool = True, dtype: torch.dtype | None = None,
                 skin: float = 0.1, compile: bool = False, zone=None):
        self.scheme = get_scheme(mode)
        numbers = np.asarray(numbers, dtype=np.int64).reshape(-1)
        if zone is None and len(numbers) != len(env.ml_indices):
            raise SetupError(f"{len(numbers)} atomic numbers for {len(env.ml_indices)} ML atoms")
        self.device = torch_device(device)
        self.adapter = as_adapter(model, self.device)
        if compile:
            self.adapter.compile()
        self.zone = zone if zone is not None else WholeMolecules.from_numbers(env.ml_indices, numbers)
        self.scheme = self.scheme.for_zone(self.zone.numbers)     # per-element parameters (emle) bind here
        # the embedding sees the zone's extended system (link atoms: the caps are ML atoms there); ``env`` is the
        # system's own (mm_environment), which the zone extends
        if not np.array_equal(np.asarray(env.ml_indices), self.zone.atoms):
            raise SetupError(f"the MM environment's {len(env.ml_indices)} ML atoms are not the zone's "
                             f"{len(self.zone.atoms)}: give MLEngine the system's environment (mm_environment), "
                             "the zone extends it")
        env = self.zone.environment(env, charge)
        self.env, self.periodic, self.charge = env, periodic, int(charge)
        self.dtype = self.adapter.dtype
        # the polarisation term's field damping (nm; 0: none): the engine hands the model E minus the damped part
        self._damping = float(getattr(self.adapter, "pol_damping_nm", 0.0) or 0.0) if self.scheme.field_inputs else 0.0
        self.numbers = torch.as_tensor(self.zone.numbers, device=self.device)
        self.natoms = len(env.charges) - self.zone.n_extra           # system atoms (i-PI's)
        self.skin = float(skin)
        self._batch: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._sources: dict[int, object] = {}      # one field source per structure of a batch (beads move apart)
        self.calls = 0
        self._t_terms = 0.0
        # cumulative seconds, read by the client's summary line and tests/bench: field inputs + their chain rule
        # (coupling), model forward + backward (network), forces/extras assembly (output). The first call
        # (compilation, kernel caches) is left out, as the summary's first_s.
        self.timings = {"coupling": 0.0, "network": 0.0, "output": 0.0}

    # ------------------------------------------------------------------------------------------ properties
    @property
    def model(self) -> torch.nn.Module:
        """The underlying network module."""
        return self.adapter.module

    @property
    def mode(self) -> str:
        """The embedding scheme's name."""
        return self.scheme.name

    @property
    def compiled(self) -> bool:
        return bool(getattr(self.adapter, "compiled", False))

    @property
    def list_builds(self) -> int:
        """Neighbour-list (re)builds so far, all batch slots together."""
        return sum(getattr(s, "builds", 0) for s in self._sources.values())

    # ------------------------------------------------------------------------------------------ building
    @classmethod
    def from_spec(cls, spec, model_path: str | Path, device: str = "cpu", compile: bool = False,
                  model_type: str | None = None, dtype: str | None = None,
                  allow_embedding_mismatch: bool = False) -> "MLEngine":
        """Build from a system.toml (:class:`potentials.core.spec.SystemSpec` or its path) and a model file
        (``model_type``: force a model family instead of detecting it; ``dtype``: float32/float64, default the
        model's own; see :func:`potentials.adapters.load_adapter`). A system whose embedding differs from the
        model's training embedding is refused (:func:`check_embedding`; ``allow_embedding_mismatch``: a loud
        warning instead)."""
        from coupling.mmsystem import mm_environment
        from potentials.adapters import load_adapter
        from potentials.core.spec import SystemSpec
        from potentials.openmm_system import load_system

        if not isinstance(spec, SystemSpec):
            spec = SystemSpec.load(spec)
        topology, system, _ = load_system(spec)
        ml = np.asarray(spec.ml.indices, dtype=np.int64)
        zone = ZONES.get(spec.ml.zone).from_topology(topology, ml)
        env = mm_environment(system, topology, ml, spec, zone=zone)
        adapter = load_adapter(model_path, device, model_type=model_type, dtype=dtype)
        adapter.check_zone(zone.numbers, spec.ml.charge, where=str(model_path))
        warn_many_molecules(adapter.metadata, topology, ml, where=str(model_path))
        warn_new_domain(adapter.metadata, topology, ml, spec.ml.charge, where=f"model {model_path}")
        scheme = get_scheme(spec.coupling.embedding)
        check_embedding(adapter, spec.coupling, scheme, where=f"model {model_path}", allow=allow_embedding_mismatch)
        log.info("ML client: %d ML atoms (charge %+d e), %s embedding, cutoff %.2f nm (switch %.2f nm); terms:\n%s",
                 len(ml), spec.ml.charge, scheme.name, env.cutoff, env.switch_width, scheme.ownership_table())
        return cls(adapter, zone.numbers, spec.ml.charge, env, mode=scheme, device=device,
                   periodic=spec.structure.periodic, skin=spec.coupling.skin_nm, compile=compile, zone=zone)

    def _batch_inputs(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """numbers, mol_idx and total charge for a batch of n structures (built once per n)."""
        if n not in self._batch:
            n_ml = len(self.numbers)
            self._batch[n] = (self.numbers.repeat(n),
                              torch.arange(n, device=self.device).repeat_interleave(n_ml),
                              torch.full((n,), float(self.charge), dtype=torch.float64, device=self.device))
        return self._batch[n]

    # ------------------------------------------------------------------------------------------ compute
    def compute(self, positions: np.ndarray, boxes: np.ndarray | None = None) -> list[ForceResult]:
        """Energies (kJ/mol), forces (kJ/mol/nm), virials (kJ/mol) and extras for B structures.

        positions : (B, N, 3) nm; boxes : (B, 3, 3) nm, vectors as rows, or None (ignored if not periodic).
        """
        self.calls += 1
        pos, boxes = self._inputs(positions, boxes)
        n = len(pos)
        t0 = time.perf_counter()
        frames = [self._frame(b, pos[b], boxes[b] if self.periodic else None) for b in range(n)]
        t1 = time.perf_counter()
        energies, grads, out = self._evaluate(frames)
        t2 = time.perf_counter()
        grads = [self._gradient(fr, g) for fr, g in zip(frames, grads)]
        t_chain = time.perf_counter() - t2 + self._t_terms          # the scheme's model terms count as coupling
        results = [self._result(b, frames[b], energies[b], -grads[b], out) for b in range(n)]
        t3 = time.perf_counter()
        for key, dt in (("coupling", t1 - t0 + t_chain), ("network", t2 - t1 - self._t_terms),
                        ("output", t3 - t2 - t_chain + self._t_terms)):
            self.timings[key] += dt if self.calls > 1 else 0.0
        return results

    def _inputs(self, positions, boxes) -> tuple[np.ndarray, np.ndarray | None]:
        """Positions (B, N, 3) float64 checked, boxes broadcast to (B, 3, 3) for a periodic system."""
        pos = np.asarray(positions, dtype=np.float64)
        pos = pos[None] if pos.ndim == 2 else pos
        if pos.ndim != 3 or pos.shape[1:] != (self.natoms, 3):
            raise CalculationFailed(f"ML client: got positions of shape {pos.shape}, expected (B, {self.natoms}, 3)")
        # with the embedding, the neighbour-list check reads every coordinate anyway (and rebuilds, which
        # refuses NaN/inf): one pass over 1e5 atoms less per request
        if not self.scheme.field_inputs and not np.all(np.isfinite(pos)):
            self._refuse_positions(pos)
        if self.periodic:
            if boxes is None:
                raise SetupError("periodic system but no box was sent; set [structure] periodic = false for "
                                 "a cluster")
            boxes = np.broadcast_to(np.asarray(boxes, dtype=np.float64), (len(pos), 3, 3))
        return pos, boxes

    def _frame(self, b: int, pos: np.ndarray, box: np.ndarray | None) -> "_Frame":
        """One structure's leaf tensors: the zone atoms' raw positions (nm) and, with a field, phi and E; the
        field's own chain rule (phi/E -> ML and MM positions) is its ``backward``, so autograd never touches
        (N, 3) arrays, which matters for 1e5-atom systems."""
        if b not in self._sources:
            self._sources[b] = self.scheme.field_source(self.env, self.skin, self.device)
        pos = self.zone.extend(pos, box)                  # + the zone's extra atoms (link-atom caps), if any
        ml_raw = pos[self.zone.model_indices]
        try:
            inputs: FrameInputs = self._sources[b].inputs(pos, box, ml_raw, self.device)
        except SetupError:
            if not np.all(np.isfinite(pos)):
                self._refuse_positions(pos[None])
            raise
        leaf = torch.tensor(ml_raw, device=self.device, requires_grad=True)
        n_ml = self.zone.n_model
        model_pos = self.zone.model_positions(leaf + torch.as_tensor(inputs.shift[:n_ml], device=self.device))
        field_pol = near = None
        if inputs.field is not None:
            phi = inputs.field.phi.requires_grad_(True)
            field = inputs.field.field.requires_grad_(True)
            # a uniform probe field e0 = 0 about the zone's centroid: -dE/de0 is the zone's dipole (charges,
            # induced dipoles and every other field response of the model), the ml.dipole extra
            e0 = torch.zeros(3, dtype=phi.dtype, device=self.device, requires_grad=True)
            rel = (model_pos - model_pos.mean(dim=0)).detach().to(phi.dtype)
            leaves = (leaf, phi, field, e0)
            phi, field = phi - rel @ e0, field + e0
            if self._damping > 0:         # the polarisation term's damped field: E minus its close-contact part
                x = torch.as_tensor(pos[inputs.atoms[n_ml:]] + inputs.shift[n_ml:], device=self.device)
                with torch.no_grad():
                    near = (torch.cdist(model_pos.detach().to(x.dtype), x) < DAMPING_RANGE * self._damping
                            ).any(0).nonzero(as_tuple=True)[0]
                mm_leaf = x.index_select(0, near).requires_grad_(True)
                q = torch.as_tensor(inputs.field.charges, device=self.device).index_select(0, near)
                excess = damped_field_excess(model_pos.to(x.dtype), mm_leaf, q, self._damping)
                leaves += (mm_leaf,)
                field_pol, near = field - excess.to(field.dtype), near.cpu().numpy()
        else:
            phi, field = torch.zeros_like(leaf[:, 0]), torch.zeros_like(leaf)
            leaves = (leaf,)
        return _Frame(inputs, leaves, model_pos, phi, field, pos[inputs.atoms] + inputs.shift, field_pol, near)

    def _evaluate(self, frames: list["_Frame"]):
        """One batched model call: energies (B,) kJ/mol, the gradients of each frame's leaves, the outputs."""
        n = len(frames)
        numbers, mol_idx, charge = self._batch_inputs(n)
        cat = (lambda ts: ts[0]) if n == 1 else torch.cat
        dt = self.adapter.dtype
        pol = [cat([f.field_pol for f in frames]).to(dt)] if frames[0].field_pol is not None else []
        out = self.adapter.forward(numbers, cat([f.model_pos for f in frames]).to(dt), mol_idx, charge.to(dt),
                                   cat([f.phi for f in frames]).to(dt), cat([f.field for f in frames]).to(dt), *pol)
        energy = self._add_terms(frames, out, out["energy"].to(torch.float64))
        if "member_energies" in out:             # a committee: its spread, from each member's forces on the ML atoms
            members = out["member_energies"]
            out["committee"] = spread(members, member_ml_forces(members, frames, self.zone.n_model))
        flat = [t for f in frames for t in f.leaves]
        it = iter(torch.autograd.grad(energy.sum(), flat, allow_unused=True, materialize_grads=True))
        grads = [[next(it) for _ in f.leaves] for f in frames]
        return energy.detach().cpu().numpy(), grads, out

    def _add_terms(self, frames: list["_Frame"], out: dict, energy: torch.Tensor) -> torch.Tensor:
        """The scheme's energy terms computed from the model's outputs (:class:`coupling.schemes.ModelTerm`),
        added to the model's energies before autograd and reported in ``out["terms"]`` under their names."""
        self._t_terms = 0.0
        if all(f.inputs.term is None for f in frames):
            return energy
        t0 = time.perf_counter()
        n = len(self.numbers)
        extra = torch.stack([f.inputs.term.energy(out, slice(b * n, (b + 1) * n), f.model_pos, f.phi, f.field)
                             if f.inputs.term is not None else energy.new_zeros(()) for b, f in enumerate(frames)])
        name = next(f.inputs.term.name for f in frames if f.inputs.term is not None)
        out.setdefault("terms", {})[name] = extra.detach()
        self._t_terms = time.perf_counter() - t0
        return energy + extra

    def _result(self, b: int, frame: "_Frame", energy: float, f: np.ndarray, out: dict) -> ForceResult:
        forces = np.zeros((self.natoms + self.zone.n_extra, 3))
        forces[frame.inputs.atoms] = f
        virial = f.T @ frame.images                                               # W = sum f (x) r
        if frame.inputs.term is not None:                     # what the term reads beyond the engine's leaves
            atoms, f_term, w_term = frame.inputs.term.result()
            forces[atoms] += f_term
            virial = virial + w_term
        forces = self.zone.fold(forces)        # the extra atoms' forces onto system atoms (the virial has them)
        self._check_finite(energy, forces, b)
        return ForceResult(float(energy), forces, virial, ml_extras(out, b, self.zone.n_model, energy,
                                                                   frame.images, frame.inputs.n_embedded,
                                                                   np.asarray(self.env.charges)[self.zone.model_indices],
                                                                   frame.dipole))

    def _gradient(self, frame: "_Frame", g: list) -> np.ndarray:
        """d(energy)/d(the frame's atoms) from the gradients of its leaves (ML positions, then with a field: phi,
        E, the probe field e0, and with the damped field the close MM atoms), and the frame's dipole (e·nm)."""
        if frame.inputs.field is None:
            return g[0].cpu().numpy()
        frame.dipole = -g[3].detach().to(torch.float64).cpu().numpy()
        total = _chain(frame.inputs.field, *g[:3])
        if frame.near is not None:                  # the damped field's close MM atoms (rows after the ML atoms)
            np.add.at(total, self.zone.n_model + frame.near, g[4].detach().to(torch.float64).cpu().numpy())
        return total

    def _refuse_positions(self, pos: np.ndarray) -> None:
        bad = np.unique(np.nonzero(~np.isfinite(pos))[1])
        raise CalculationFailed(f"ML client call {self.calls}: non-finite positions on atoms {bad[:10].tolist()}")

    def _check_finite(self, energy: float, forces: np.ndarray, b: int) -> None:
        if np.isfinite(energy) and np.all(np.isfinite(forces)):
            return
        bad = np.unique(np.nonzero(~np.isfinite(forces))[0])
        ml = set(self.env.ml_indices.tolist())
        where = ", ".join(f"{i}{' (ML)' if i in ml else ''}" for i in bad[:10]) or "none"
        raise CalculationFailed(f"ML client call {self.calls}, structure {b}: non-finite "
                                f"{'energy' if not np.isfinite(energy) else 'forces'} (energy {energy}); atoms "
                                f"with non-finite forces: {where}. The structure may have exploded or left the "
                                "model's domain")


class _Frame:
    """Per-structure state of one request (see :meth:`MLEngine._frame`)."""

    __slots__ = ("inputs", "leaves", "model_pos", "phi", "field", "images", "dipole", "field_pol", "near")

    def __init__(self, inputs, leaves, model_pos, phi, field, images, field_pol=None, near=None):
        self.inputs, self.leaves, self.model_pos = inputs, leaves, model_pos
        self.phi, self.field, self.images = phi, field, images
        self.dipole: np.ndarray | None = None          # -dE/de0 (e·nm) when the model is fed phi and E
        self.field_pol: torch.Tensor | None = field_pol  # damped field of the polarisation term (pol_damping)
        self.near: np.ndarray | None = near            # MM atoms (of inputs.atoms after the ML ones) it reads


def _chain(field, g_ml: torch.Tensor, g_phi: torch.Tensor, g_field: torch.Tensor) -> np.ndarray:
    """d(energy)/d(ML positions, embedded MM positions) (n_ml + M, 3): the model's own gradient plus the
    field's chain rule through phi and E."""
    g_r, g_x = field.backward(g_phi, g_field)
    return np.concatenate([g_ml.cpu().numpy() + g_r, g_x])


def ml_extras(out: dict, b: int, n_ml: int, energy: float, images: np.ndarray, n_embedded: int,
              ff_charges: np.ndarray | None = None, dipole: np.ndarray | None = None) -> dict:
    """The ML client's extras for structure ``b`` in their documented units (the output edge): ``ml.energy``
    (kJ/mol: ``total`` and the model's per-structure terms), ``ml.charges`` (e: the model's, or for a model that
    predicts none (MACE, ANI) ``ff_charges``, the force field's charges of the ML atoms, those mechanical
    embedding couples), ``ml.dipole`` (e·Å, about the ML centroid: ``dipole`` (e·nm), the response to a uniform
    field, which includes the induced dipoles, when the model is fed the MM field; else sum q (r - centroid)),
    ``ml.n_embedded``; for a committee model (:mod:`potentials.committee`) ``ml.committee``: ``energy_std``
    (kJ/mol), ``force_std_max`` (kJ/mol/nm: the largest spread of an ML atom's force) and ``n_members``, and
    ``ml.uncertainty``: ``[energy_std, force_std_max]`` (:mod:`coupling.committee_spread`)."""
    terms = out.get("terms", {})
    extras = {"ml.energy": {"total": float(energy), **{k: float(v[b]) for k, v in terms.items()}},
              "ml.n_embedded": int(n_embedded)}
    if "charges" in out or ff_charges is not None:
        q = out["charges"].detach().to(torch.float64).reshape(-1, n_ml)[b].cpu().numpy() if "charges" in out \
            else np.asarray(ff_charges, dtype=np.float64)
        r_ml = images[:n_ml]
        extras["ml.charges"] = q.tolist()
        extras["ml.dipole"] = (q @ ((r_ml - r_ml.mean(axis=0)) * ANGSTROM_PER_NM)).tolist()
    if dipole is not None:
        extras["ml.dipole"] = (np.asarray(dipole, dtype=np.float64) * ANGSTROM_PER_NM).tolist()
    if "committee" in out:
        extras.update(committee_extras(out["committee"], b))
    return extras


# ---------------------------------------------------------------------------------------------- helpers
def check_model(model, numbers, charge: int, where: str = "model") -> None:
    """Refuse a model that cannot describe this ML zone (its adapter's ``check_zone``)."""
    as_adapter(model, "cpu").check_zone(np.asarray(numbers, dtype=np.int64), charge, where=where)


def vacuum_charges(model, numbers, positions_nm, charge: int, device: str | torch.device = "cpu") -> np.ndarray:
    """The model's atomic charges (e) of the ML zone in vacuum (phi = E = 0) at one geometry (nm): the fixed
    ML charges of mechanical embedding with ``[coupling] mechanical_charges = "model"``."""
    return as_adapter(model, device).vacuum_charges(numbers, positions_nm, charge)


def warn_many_molecules(metadata: dict, topology, ml_indices, where: str = "model") -> int:
    """Warn when the ML zone holds more molecules than the model's training zones did (metadata
    ``ml_molecules``, 1 when absent: the project's pipeline labels one solute per frame). Interactions between
    ML molecules are then outside the training data; the shipped model drifts into unphysical geometries
    within a few tens of steps for zones of 10 waters. Returns the count."""
    n = zone_molecules(topology, ml_indices)
    trained = int((metadata or {}).get("ml_molecules", 1))
    if n > trained:
        log.warning("%s: the ML zone holds %d molecules, but the model's training zones held at most %d "
                    "(model metadata 'ml_molecules'); interactions between ML molecules are outside its data "
                    "and the dynamics may leave physical geometries. Train on zones like this one, or put "
                    "one molecule in the ML zone", where, n, trained)
    return n


MISMATCH_FLAG = "--allow-embedding-mismatch"


def check_embedding(adapter, coupling, scheme, where: str = "model", allow: bool = False) -> str | None:
    """Refuse a system whose embedding is not the one the model was trained with (SetupError, one line naming
    both values and the fix); with ``allow`` (``--allow-embedding-mismatch``) log it as a warning instead.

    The rule (model metadata ``embedding``, :func:`potentials.model_io.trained_embedding`): a scheme that feeds
    the network phi and E of the MM charges (the ``electrostatic`` family: ``electrostatic``,
    ``electrostatic-lr``) needs a model trained in that family with the same embedding cutoff and switch width
    (the field inputs then mean what they meant in training). The long-range treatment is not compared: the
    labels hold nothing beyond the cutoff (``long_range = "none"``) and ``electrostatic-lr`` adds PME beyond it at
    run time, on top of the short-range part the network learned. A scheme that feeds the network no field
    (``mechanical``: the model in vacuum, fixed charges in the MM client) runs any model: the cutoff plays no
    part. Any other scheme needs a model trained in it. Not checked (one info line): model files that record no
    training embedding (older files; other packages' models, which take no field inputs at all). Returns the
    mismatch message (None: compatible or unknown)."""
    coupling_desc = f"cutoff {coupling.cutoff_nm:.2f} nm (switch {coupling.switch_width_nm:.2f} nm)"
    if not getattr(adapter, "field_inputs", True):
        log.info("%s takes no MM field (no field inputs): it sees the ML zone in vacuum and the embedding cutoff "
                 "plays no part in it; %s embedding", where, scheme.name)
        return None
    from potentials.model_io import trained_embedding

    trained = trained_embedding(adapter.metadata)
    if trained is None:
        log.info("%s records no training embedding (a file from before the metadata): the system's %s embedding, "
                 "%s, is not checked against it", where, scheme.name, coupling_desc)
        return None
    message = _embedding_mismatch(trained, coupling, scheme, where)
    if message is None:
        log.info("%s was trained with %s embedding, cutoff %s nm (switch %s nm), long range %s; the system runs "
                 "%s, %s, long range %s: compatible", where, trained["scheme"], _nm(trained["cutoff_nm"]),
                 _nm(trained["switch_nm"]), trained.get("long_range") or "?", scheme.name, coupling_desc,
                 scheme.long_range)
        return None
    if not allow:
        raise SetupError(message)
    log.warning("EMBEDDING MISMATCH, running anyway (%s): %s. The model's field inputs are outside its training "
                "and its energies and forces are not validated", MISMATCH_FLAG, message.split("; " + MISMATCH_FLAG)[0])
    return message


def _nm(value) -> str:
    return "?" if value is None else f"{value:.2f}"


def _embedding_mismatch(trained: dict, coupling, scheme, where: str) -> str | None:
    """The one-line refusal of :func:`check_embedding`, or None when the system's embedding is compatible."""
    suffix = f"; {MISMATCH_FLAG} runs anyway"
    family = scheme.family_name()
    if family != scheme_family(trained["scheme"]):
        if not scheme.field_inputs:                   # mechanical: the network in vacuum, the cutoff unused
            return None
        return (f"{where} was trained with {trained['scheme']} embedding; system.toml has [coupling] embedding = "
                f"\"{scheme.name}\": set [coupling] embedding = \"{trained['scheme']}\" (or \"mechanical\"), or "
                f"retrain for {scheme.name}{suffix}")
    if family != "electrostatic":
        return None
    cutoff, switch = trained["cutoff_nm"], trained["switch_nm"]
    bad_cutoff = cutoff is not None and abs(cutoff - coupling.cutoff_nm) > 1e-6
    bad_switch = switch is not None and abs(switch - coupling.switch_width_nm) > 1e-6
    if not (bad_cutoff or bad_switch):
        return None
    return (f"{where} was trained with embedding cutoff {_nm(cutoff)} nm (switch {_nm(switch)} nm); system.toml has "
            f"cutoff {coupling.cutoff_nm:.2f} nm (switch {coupling.switch_width_nm:.2f} nm): set [coupling] "
            f"cutoff_nm = {float(coupling.cutoff_nm if cutoff is None else cutoff)!r} and switch_width_nm = "
            f"{float(coupling.switch_width_nm if switch is None else switch)!r} (the box must fit it: mlmm prepare "
            f"--solvate auto), or retrain on data labelled with the system's cutoff{suffix}")

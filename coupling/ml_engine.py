"""The ML client's engine: the network's energy of the ML zone in the field of the MM point charges.

For each structure of a request the embedding (:mod:`coupling.embedding`) picks the MM charges and their
images (numpy, a Verlet list) and computes phi and E at the ML atoms (:class:`coupling.embedding.EmbeddingField`,
compiled kernels on CPU); then ONE batched network call covers all structures (``mol_idx``), autograd gives
dE/d(ML positions, phi, E), and the embedding's own backward pass carries dE/d(phi, E) on to the ML atoms and
the embedded MM atoms. This module is the network-adapter edge: nm -> Å, kJ/mol/e -> V, kJ/mol/e/nm -> V/Å on
the way in, eV -> kJ/mol on the way out, all with :mod:`driver.units`.

Mechanical embedding: the network sees phi = E = 0 (the ML zone in vacuum); the MM client owns the ML–MM
Coulomb term with fixed ML charges (:func:`vacuum_charges` gives the network's own).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch

from coupling.embedding import EmbeddingField, MMEnvironment, NeighbourList, zone_shift
from coupling.bookkeeping import ownership_table
from coupling.mmsystem import MODES, mm_environment
from driver.client import ForceResult
from driver.errors import CalculationFailed, SetupError
from driver.units import ANGSTROM_PER_NM, EV_PER_KJMOL, KJMOL_PER_EV, NM_PER_ANGSTROM

log = logging.getLogger(__name__)

# network outputs that are not energy terms (every other output of shape [B] is one, reported in the extras)
NOT_ENERGY_TERMS = ("energy", "charges", "atomic_energies", "polarisability")
PHI_V_PER_KJMOL_E = EV_PER_KJMOL                         # kJ/mol/e -> V (1 V = 1 eV/e)
FIELD_V_A_PER_KJMOL_E_NM = EV_PER_KJMOL * NM_PER_ANGSTROM  # kJ/mol/e/nm -> V/Å


def model_dtype(model: torch.nn.Module) -> torch.dtype:
    """The floating dtype the network computes in: that of its first floating parameter (float64 if none)."""
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point():
            return t.dtype
    return torch.float64


class MLEngine:
    """:class:`driver.client.Engine` for the ML zone (electrostatic or mechanical embedding).

    Parameters
    ----------
    model : torch.nn.Module
        any module with ``forward(numbers[N] long, positions[N,3] Å, mol_idx[N] long, charge[B] e, phi[N] V,
        efield[N,3] V/Å) -> {"energy": [B] eV, "charges": [N] e, ...}``.
    numbers : (n_ml,) int
        atomic numbers of the ML atoms, in the order of ``env.ml_indices``.
    charge : int
        total charge of the ML zone (e).
    env : MMEnvironment
        MM charges, residues and ML indices (:func:`coupling.mmsystem.mm_environment`).
    mode : {"electrostatic", "mechanical"}
    device : torch device string (``cpu``, ``cuda``, ``cuda:N``).
    periodic : bool
        False: boxes are ignored (clusters; i-PI always sends a cell).
    dtype : torch dtype of the network inputs; default: the model's. Embedding sums run in float64.
    skin : nm; the embedded residues are searched within ``cutoff + skin`` and the list is reused until an atom
        has moved ``skin / 2`` (:class:`coupling.embedding.NeighbourList`; 0: search on every call).
    compile : run the network through ``torch.compile`` (fixed shapes: the ML zone never changes size). The
        first call compiles (about a minute on a CPU with a cold cache); then small zones run 2-3x faster. If
        compiling fails the network runs eagerly (``compiled`` is then False): in torch 2.13 inductor's CPU code
        for the network's float64 scatters fails with more than one torch thread, so on CPU use 1 thread.

    Each :class:`driver.client.ForceResult` carries forces on the ML atoms and on the embedded MM atoms (zero
    elsewhere), the virial ``sum_i f_i (x) r_i`` over the positions the energy saw (ML zone made whole, MM
    residues at their minimum image) and the extras ``ml.energy`` (kJ/mol: ``total`` and the model's
    per-structure terms), ``ml.charges`` (e), ``ml.dipole`` (e·Å, about the ML centroid), ``ml.n_embedded``.
    """

    def __init__(self, model: torch.nn.Module, numbers, charge: int, env: MMEnvironment, *,
                 mode: str = "electrostatic", device: str | torch.device = "cpu", periodic: bool = True,
                 dtype: torch.dtype | None = None, skin: float = 0.1, compile: bool = False):
        if mode not in MODES:
            raise SetupError(f"unknown embedding mode {mode!r}; choose one of {MODES}")
        numbers = np.asarray(numbers, dtype=np.int64).reshape(-1)
        if len(numbers) != len(env.ml_indices):
            raise SetupError(f"{len(numbers)} atomic numbers for {len(env.ml_indices)} ML atoms")
        try:
            self.device = torch.device(device)
            torch.empty(0, device=self.device)
        except (RuntimeError, AssertionError) as exc:
            raise SetupError(f"torch device {device!r} is not usable here ({exc}); use cpu or an available "
                             "cuda:N") from None
        self.model = model.to(self.device).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)          # forces need gradients w.r.t. positions only
        self.dtype = dtype or model_dtype(self.model)
        self._network = torch.compile(self.model, dynamic=False) if compile else self.model
        self.compiled = compile            # False again if compiling fails (then the network runs eagerly)
        self.env, self.mode, self.periodic = env, mode, periodic
        self.numbers = torch.as_tensor(numbers, device=self.device)
        self.charge = int(charge)
        self.natoms = len(env.charges)
        self._batch: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.skin = float(skin)
        self._lists: dict[int, NeighbourList] = {}      # one per structure of a batch (beads move apart)
        self.calls = 0
        # cumulative seconds, read by the client's summary line and tests/bench: neighbour list + phi/E forward
        # + the chain rule back from phi/E (coupling), network forward + backward (network), forces/extras
        # assembly (output). The first call (compilation, kernel caches) is left out, as the summary's first_s.
        self.timings = {"coupling": 0.0, "network": 0.0, "output": 0.0}

    @property
    def list_builds(self) -> int:
        """Neighbour-list (re)builds so far, all batch slots together."""
        return sum(nl.builds for nl in self._lists.values())

    # ------------------------------------------------------------------------------------------ building
    @classmethod
    def from_spec(cls, spec, model_path: str | Path, device: str = "cpu", compile: bool = False) -> "MLEngine":
        """Build from a system.toml (:class:`driver.system.SystemSpec` or its path) and a model file."""
        from driver.system import SystemSpec
        from potentials.model_io import load_model
        from potentials.openmm_system import load_system

        if not isinstance(spec, SystemSpec):
            spec = SystemSpec.load(spec)
        topology, system, _ = load_system(spec)
        ml = np.asarray(spec.ml.indices, dtype=np.int64)
        env = mm_environment(system, topology, ml, spec)
        numbers = ml_numbers(topology, ml)
        model = load_model(model_path, device)
        check_model(model, numbers, spec.ml.charge, where=str(model_path))
        warn_many_molecules(model, topology, ml, where=str(model_path))
        log.info("ML client: %d ML atoms (charge %+d e), %s embedding, cutoff %.2f nm (switch %.2f nm); terms:\n%s",
                 len(ml), spec.ml.charge, spec.coupling.embedding, env.cutoff, env.switch_width,
                 ownership_table(spec.coupling.embedding))
        # the network casts positions/phi/E to its weights' dtype for the features but keeps its charge
        # sums (Coulomb, q·phi, polarisation) in float64: hand it float64 inputs
        return cls(model, numbers, spec.ml.charge, env, mode=spec.coupling.embedding, device=device,
                   periodic=spec.structure.periodic, dtype=torch.float64, skin=spec.coupling.skin_nm,
                   compile=compile)

    def _batch_inputs(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """numbers, mol_idx and total charge for a batch of n structures (built once per n)."""
        if n not in self._batch:
            n_ml = len(self.numbers)
            self._batch[n] = (self.numbers.repeat(n),
                              torch.arange(n, device=self.device).repeat_interleave(n_ml),
                              torch.full((n,), float(self.charge), dtype=self.dtype, device=self.device))
        return self._batch[n]

    # ------------------------------------------------------------------------------------------ compute
    def compute(self, positions: np.ndarray, boxes: np.ndarray | None = None) -> list[ForceResult]:
        """Energies (kJ/mol), forces (kJ/mol/nm), virials (kJ/mol) and extras for B structures.

        positions : (B, N, 3) nm; boxes : (B, 3, 3) nm, vectors as rows, or None (ignored if not periodic).
        """
        self.calls += 1
        pos = np.asarray(positions, dtype=np.float64)
        pos = pos[None] if pos.ndim == 2 else pos
        if pos.ndim != 3 or pos.shape[1:] != (self.natoms, 3):
            raise CalculationFailed(f"ML client: got positions of shape {pos.shape}, expected (B, {self.natoms}, 3)")
        # with the embedding, the neighbour-list check reads every coordinate anyway (and rebuilds, which
        # refuses NaN/inf): one pass over 1e5 atoms less per request
        if self.mode != "electrostatic" and not np.all(np.isfinite(pos)):
            self._refuse_positions(pos)
        n = len(pos)
        if self.periodic:
            if boxes is None:
                raise SetupError("periodic system but no box was sent; set [structure] periodic = false for "
                                 "a cluster")
            boxes = np.broadcast_to(np.asarray(boxes, dtype=np.float64), (n, 3, 3))
        ml_idx, n_ml = self.env.ml_indices, len(self.env.ml_indices)
        t0 = time.perf_counter()
        # per structure small leaf tensors: the ML atoms' raw positions (nm) and, with the embedding, phi and E;
        # the embedding's own chain rule (phi/E -> ML and MM positions) is EmbeddingField.backward, so autograd
        # never touches (N, 3) arrays, which matters for 1e5-atom systems
        leaves, atoms, images, sels, embs, ml_pos, phis, fields = [], [], [], [], [], [], [], []
        for b in range(n):
            box = boxes[b] if self.periodic else None
            ml_raw = pos[b][ml_idx]
            ml_leaf = torch.tensor(ml_raw, device=self.device, requires_grad=True)
            if self.mode == "electrostatic":
                if b not in self._lists:
                    self._lists[b] = NeighbourList(self.env, self.skin)
                try:
                    sel = self._lists[b].get(pos[b], box)
                except SetupError:
                    if not np.all(np.isfinite(pos)):
                        self._refuse_positions(pos)
                    raise
                idx = np.concatenate([ml_idx, sel.atoms])
                shift = np.concatenate([sel.ml_shift, sel.shift])
                emb = EmbeddingField(self.env, sel, ml_raw, pos[b][sel.atoms], device=self.device,
                                     units=(PHI_V_PER_KJMOL_E, FIELD_V_A_PER_KJMOL_E_NM))       # V, V/Å
                phi, field = emb.phi.requires_grad_(True), emb.field.requires_grad_(True)
                leaves.append((ml_leaf, phi, field))
            else:
                sel, idx, emb = None, ml_idx, None
                shift = zone_shift(ml_raw, box)
                phi, field = torch.zeros_like(ml_leaf[:, 0]), torch.zeros_like(ml_leaf)
                leaves.append((ml_leaf,))
            embs.append(emb)
            atoms.append(idx)
            images.append(pos[b][idx] + shift)                                      # as the energy sees them
            sels.append(sel)
            ml_pos.append(ml_leaf + torch.as_tensor(shift[:n_ml], device=self.device))
            phis.append(phi)
            fields.append(field)
        numbers, mol_idx, charge = self._batch_inputs(n)
        t1 = time.perf_counter()
        cat = (lambda ts: ts[0]) if n == 1 else torch.cat
        out = self._run_network(numbers, (cat(ml_pos) * ANGSTROM_PER_NM).to(self.dtype), mol_idx, charge,
                                cat(phis).to(self.dtype), cat(fields).to(self.dtype))
        energy = out["energy"].to(torch.float64) * KJMOL_PER_EV                    # [B] kJ/mol
        flat = [t for group in leaves for t in group]
        it = iter(torch.autograd.grad(energy.sum(), flat, allow_unused=True, materialize_grads=True))
        grads = [[next(it) for _ in group] for group in leaves]
        energies = energy.detach().cpu().numpy()
        t2 = time.perf_counter()
        grads = [g[0].cpu().numpy() if emb is None else self._chain(emb, *g) for emb, g in zip(embs, grads)]
        t_chain = time.perf_counter() - t2
        charges = out["charges"].detach().to(torch.float64).reshape(n, -1).cpu().numpy() \
            if "charges" in out else None
        terms = {k: v.detach().to(torch.float64).cpu().numpy() * KJMOL_PER_EV for k, v in out.items()
                 if k not in NOT_ENERGY_TERMS and torch.is_tensor(v) and v.shape == (n,)}
        results = []
        for b in range(n):
            f = -grads[b]                                                           # kJ/mol/nm
            forces = np.zeros((self.natoms, 3))
            forces[atoms[b]] = f
            self._check_finite(energies[b], forces, b)
            virial = f.T @ images[b]                                                # W = sum f (x) r
            extras = {"ml.energy": {"total": float(energies[b]),
                                    **{k: float(v[b]) for k, v in terms.items()}},
                      "ml.n_embedded": 0 if sels[b] is None else int(len(sels[b].atoms))}
            if charges is not None:
                r_ml = images[b][:n_ml]
                extras["ml.charges"] = charges[b].tolist()
                extras["ml.dipole"] = (charges[b] @ ((r_ml - r_ml.mean(axis=0)) * ANGSTROM_PER_NM)).tolist()
            results.append(ForceResult(float(energies[b]), forces, virial, extras))
        t3 = time.perf_counter()
        for key, dt in (("coupling", t1 - t0 + t_chain), ("network", t2 - t1), ("output", t3 - t2 - t_chain)):
            self.timings[key] += dt if self.calls > 1 else 0.0
        return results

    @staticmethod
    def _chain(emb: EmbeddingField, g_ml: torch.Tensor, g_phi: torch.Tensor, g_field: torch.Tensor) -> np.ndarray:
        """d(energy)/d(ML positions, embedded MM positions) (n_ml + M, 3): the network's own gradient plus
        the embedding's chain rule through phi and E."""
        g_r, g_x = emb.backward(g_phi, g_field)
        return np.concatenate([g_ml.cpu().numpy() + g_r, g_x])

    def _run_network(self, *inputs) -> dict[str, torch.Tensor]:
        if self._network is self.model:
            return self.model(*inputs)
        try:
            return self._network(*inputs)
        except Exception as exc:          # inductor cannot build every graph (e.g. float64 scatter in torch 2.13)
            log.warning("torch.compile failed (%s: %s); the network runs uncompiled", type(exc).__name__,
                        str(exc).strip().splitlines()[0] if str(exc).strip() else "")
            self._network, self.compiled = self.model, False
            return self.model(*inputs)

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


# ---------------------------------------------------------------------------------------------- helpers
def ml_numbers(topology, ml_indices) -> np.ndarray:
    """Atomic numbers of the ML atoms from an OpenMM topology (SetupError for atoms without element)."""
    atoms = list(topology.atoms())
    out = []
    for i in np.asarray(ml_indices).reshape(-1):
        a = atoms[int(i)]
        if a.element is None:
            raise SetupError(f"ML atom {int(i)} ({a.name} of {a.residue.name}{a.residue.id}) has no element "
                             "(a virtual site or an untyped atom); the network needs real atoms")
        out.append(a.element.atomic_number)
    return np.asarray(out, dtype=np.int64)


def check_model(model: torch.nn.Module, numbers, charge: int, where: str = "model") -> None:
    """Refuse a model that cannot describe this ML zone: unknown elements, or a net charge it was not
    trained for (a model may say so with ``supports_charge = False``)."""
    check = getattr(model, "check_numbers", None)
    if callable(check):
        try:
            check(torch.as_tensor(np.asarray(numbers, dtype=np.int64)))
        except (ValueError, KeyError) as exc:
            raise SetupError(f"{where}: cannot describe the ML zone: {exc}") from None
    if charge and getattr(model, "supports_charge", True) is False:
        raise SetupError(f"{where}: the model was trained on neutral molecules only, but the ML zone has charge "
                         f"{charge:+d} e; use a model trained with charged species or change the ML selection")


def warn_many_molecules(model: torch.nn.Module, topology, ml_indices, where: str = "model") -> int:
    """Warn when the ML zone holds more molecules (residues: the zone never cuts a bond) than the model's
    training zones did (metadata ``ml_molecules``, 1 when absent: the project's pipeline labels one solute
    per frame). Interactions between ML molecules are then outside the training data; the shipped model
    drifts into unphysical geometries within a few tens of steps for zones of 10 waters. Returns the count."""
    atoms = list(topology.atoms())
    n = len({atoms[int(i)].residue.index for i in np.asarray(ml_indices).reshape(-1)})
    trained = int(getattr(model, "metadata", {}).get("ml_molecules", 1))
    if n > trained:
        log.warning("%s: the ML zone holds %d molecules, but the model's training zones held at most %d "
                    "(model metadata 'ml_molecules'); interactions between ML molecules are outside its data "
                    "and the dynamics may leave physical geometries. Train on zones like this one, or put "
                    "one molecule in the ML zone", where, n, trained)
    return n


def vacuum_charges(model: torch.nn.Module, numbers, positions_nm, charge: int,
                   device: str | torch.device = "cpu") -> np.ndarray:
    """The network's atomic charges (e) of the ML zone in vacuum (phi = E = 0) at one geometry (nm).

    These are the fixed ML charges of the mechanical embedding (``[coupling] mechanical_charges = "model"``).
    """
    dev = torch.device(device)
    model = model.to(dev).eval()
    dtype = model_dtype(model)
    pos = torch.as_tensor(np.asarray(positions_nm, dtype=np.float64) * ANGSTROM_PER_NM, device=dev, dtype=dtype)
    n = len(pos)
    with torch.no_grad():
        out = model(torch.as_tensor(np.asarray(numbers, dtype=np.int64), device=dev),
                    pos, torch.zeros(n, dtype=torch.long, device=dev),
                    torch.tensor([float(charge)], dtype=dtype, device=dev),
                    torch.zeros(n, dtype=dtype, device=dev), torch.zeros(n, 3, dtype=dtype, device=dev))
    if "charges" not in out:
        raise SetupError("the model predicts no atomic charges; give mechanical_charges = \"mm\" instead")
    q = out["charges"].to(torch.float64).cpu().numpy()
    if not np.all(np.isfinite(q)):
        raise SetupError("the model's vacuum charges are not finite for this ML zone")
    return q

"""EMLE-style electrostatic coupling of a model's predicted charges: the scheme ``emle``.

For a potential that predicts atomic charges but takes no MM field (AIMNet2; any adapter with
``predicts_charges`` and no ``field_inputs``), the ML client adds to the model's vacuum energy, every step, with
the charges q_i(R) the model predicts for the current geometry,

    E = E_model(R) + E_es + E_ind

    E_es  = k sum_i sum_j q_i Q_j  V(r_ij; s_i)                 V(r; s) = [1 - (1 + r/(2s)) exp(-r/s)] / r
    E_ind = -1/2 F^T A^-1 F / k                                  F_i = k sum_j Q_j  L(r_ij; s_i) d_ij / r_ij^3
                                                                 L(r; s) = 1 - (1 + r/s + r^2/(2 s^2)) exp(-r/s)

over the MM charges Q_j within the embedding cutoff (whole residues, switched to zero over the last
``switch_width``: the same embedding as every other scheme, :func:`coupling.embedding.embedded_charges_at`),
d_ij = r_i - x_j, k the Coulomb constant, alpha_i a polarisability volume (4 pi eps0 absorbed). F_i/k is the
damped field of the MM charges at ML atom i, and A = diag(1/alpha) - T the relay matrix of Thole's model (T the
Thole-damped dipole field tensors between the ML atoms, :func:`thole_matrix`): the induced dipoles
mu = A^-1 F / k are self-consistent with each other's fields, and E_ind = -1/2 sum_i mu_i . F_i is their
polarisation energy. A lone atom at distance r from a charge Q gets -1/2 alpha k Q^2 / r^4; a molecule in a
uniform field gets -1/2 F . alpha_mol . F / k with Thole's molecular polarisability (water 1.49 Å^3, methane
2.61 Å^3 with the parameters below; experiment 1.47, 2.59).

Damping. Each ML atom's charge is spread over the normalised Slater (exponential) density
exp(-r/s)/(8 pi s^3), the charge distribution of Thole's exponential model (B. T. Thole, Chem. Phys. 59, 341
(1981)), which is also the form of the valence density in EMLE (K. Zinovjev, "Electrostatic embedding of machine
learning potentials", J. Chem. Theory Comput. 19 (2023); K. Zinovjev, L. Hedges, R. Montagud Andreu, C. Woods,
I. Tunon, M. W. van der Kamp, J. Chem. Theory Comput. 20 (2024), the ``emle-engine`` package).
V is the exact potential of that density at a point charge and L/r^2 its field (the charge inside radius r), so
F_i = -grad_i of the damped potential, and both stay finite as r -> 0: V -> 1/(2s), L/r^3 -> 1/(6 s^3); at large r
they are 1/r and 1/r^2 up to exp(-r/s). The width follows Thole's exponential model, s_i = alpha_i^(1/3) / a, with
a = 2.1304 and the atomic polarisabilities of P. Th. van Duijnen and M. Swart, J. Phys. Chem. A 102, 2399 (1998)
(their exponential-model fit to molecular polarisabilities; a.u., converted with potentials/core/units.py), the
only parameters: s_H = 0.035 nm, s_C = 0.051 nm, s_N = 0.046 nm, s_O = 0.044 nm. Only the ML site is smeared
(the MM charges stay points, as in the MM force field); unlike EMLE the whole predicted charge is smeared (no
point core charge) and the widths and polarisabilities are per element, fixed, not predicted per atom.

Induction is self-consistent among the induced dipoles (as in EMLE, and as van Duijnen and Swart fitted their
polarisabilities: with the mutual coupling on; direct induction, alpha_i F_i, would overestimate water's
polarisability by 13 %), solved exactly (a 3n x 3n linear solve per step, cheap for zones of tens to a few
hundred atoms). The dipoles respond to the MM charges only, not to the ML charges (the model's own energy
describes the zone in vacuum, its polarisation by its own charges included), and the polarisabilities are
isotropic, per element, and not fitted to the model's level of theory.

Forces: through q(R) by autograd (the charges follow the geometry), through the damping, the dipoles' coupling
and the switch scales on the ML and the MM atoms. The term takes its gradients (charges, ML and MM positions) in
one backward pass of its own and hands the engine its first-order expansion in q and r (same value and first
derivatives), so the engine's pass carries dE/dq into the model; the MM forces and their share of the virial
(sum f (x) r over the images the energy saw) come back through :meth:`EmleTerm.result`. The ML atoms carry no
charge in the MM client (PME sees none), so nothing is counted twice.

Training and evaluation (:meth:`EmleEmbedding.network_energy`) see only phi and E of the labelled frames' MM
charges at the ML atoms (:class:`potentials.core.contracts.TrainingScheme`), not the MM positions, so there the
MM charges are not damped: sum_i q_i phi_i - 1/2 E^T A^-1 E / k with the undamped phi and E (the induced dipoles
still couple through A). The damping changes what the ML client computes only for MM charges within a few widths
of an ML atom (about 0.25 nm).

The parameters are per element, so the scheme needs the ML zone's atomic numbers: :meth:`EmleEmbedding.for_zone`
binds them (elements without a published polarisability, e.g. Na, P or Si, are refused with one line).
"""
from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch

from coupling.embedding import MMEnvironment, NeighbourList, embedded_charges_at
from coupling.schemes import SCHEMES, ElectrostaticEmbedding, FieldSource, FrameInputs, ModelTerm, Term
from potentials.core.errors import SetupError
from potentials.core.units import BOHR_PER_ANGSTROM, COULOMB_EV_ANGSTROM, COULOMB_KJMOL_NM, NM_PER_BOHR

# P. Th. van Duijnen, M. Swart, J. Phys. Chem. A 102, 2399 (1998): atomic polarisabilities (bohr^3) of Thole's
# exponential model and its screening factor a (dimensionless, with lengths in units of alpha^(1/3))
POLARISABILITY_BOHR3 = {1: 2.7927, 6: 8.6959, 7: 6.5565, 8: 5.7494, 9: 3.0013, 16: 16.6984, 17: 16.1979,
                        35: 23.5714, 53: 36.9880}
THOLE_A = 2.1304
SYMBOLS = {1: "H", 6: "C", 7: "N", 8: "O", 9: "F", 16: "S", 17: "Cl", 35: "Br", 53: "I"}

_SERIES_U = 5e-3          # below this u = r/s the damping functions use their Taylor series (r -> 0 finite)


def element_parameters(numbers) -> tuple[np.ndarray, np.ndarray]:
    """(polarisability volumes alpha (nm^3), Slater widths s = alpha^(1/3)/a (nm)) per atom; SetupError, one line,
    for an element without a published polarisability."""
    numbers = np.asarray(numbers, dtype=np.int64).reshape(-1)
    missing = sorted(set(int(z) for z in numbers) - set(POLARISABILITY_BOHR3))
    if missing:
        known = " ".join(SYMBOLS[z] for z in sorted(POLARISABILITY_BOHR3))
        raise SetupError(f"emle embedding has no polarisability for element Z={missing[0]} of the ML zone (van "
                         f"Duijnen & Swart 1998 give {known}); use [coupling] embedding = \"model-charges\"")
    alpha_bohr3 = np.array([POLARISABILITY_BOHR3[int(z)] for z in numbers], dtype=np.float64)
    return alpha_bohr3 * NM_PER_BOHR ** 3, np.cbrt(alpha_bohr3) / THOLE_A * NM_PER_BOHR


def slater_potential(r: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """V(r; s) = [1 - (1 + r/(2s)) exp(-r/s)] / r: the potential of the unit Slater density exp(-r/s)/(8 pi s^3)
    at distance r (1/length), 1/(2s) at r = 0, 1/r up to exp(-r/s) far away."""
    u = r / s
    small = u < _SERIES_U
    if not bool(small.any()):                                    # the usual case: no MM charge on an ML atom
        return (-torch.expm1(-u) - 0.5 * u * torch.exp(-u)) / r
    us = torch.where(small, torch.ones_like(u), u)
    direct = (-torch.expm1(-us) - 0.5 * us * torch.exp(-us)) / us
    series = 0.5 - u * u / 12.0 + u * u * u / 24.0
    return torch.where(small, series, direct) / s


def slater_field(r: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """L(r; s) / r^3 with L = 1 - (1 + r/s + r^2/(2 s^2)) exp(-r/s) the fraction of the Slater density within r:
    the field of a point charge at distance r on the smeared site is this times the displacement (1/length^3);
    1/(6 s^3) at r = 0, 1/r^3 up to exp(-r/s) far away."""
    u = r / s
    small = u < _SERIES_U
    if not bool(small.any()):
        return (-torch.expm1(-u) - torch.exp(-u) * u * (1.0 + 0.5 * u)) / (r * r * r)
    us = torch.where(small, torch.ones_like(u), u)
    direct = (-torch.expm1(-us) - torch.exp(-us) * us * (1.0 + 0.5 * us)) / (us * us * us)
    series = 1.0 / 6.0 - u / 8.0 + u * u / 20.0 - u * u * u / 72.0
    return torch.where(small, series, direct) / (s * s * s)


def thole_matrix(r: torch.Tensor, alpha: torch.Tensor, group: torch.Tensor | None = None) -> torch.Tensor:
    """The (3n, 3n) relay matrix A = diag(1/alpha) - T of n polarisable sites at r (n,3) with polarisability
    volumes alpha (n,) (lengths and volumes in one unit): T_ij the dipole field tensor between sites i != j with
    Thole's exponential damping (v = a r / (alpha_i alpha_j)^(1/6); lambda3 = 1 - (1 + v + v^2/2) e^-v,
    lambda5 = lambda3 - v^3/6 e^-v; T = 3 lambda5 d d^T / r^5 - lambda3 I / r^3). Sites of different ``group``
    (structures of a batch) do not couple."""
    n = len(r)
    d = r[:, None, :] - r[None, :, :]
    off = ~torch.eye(n, dtype=torch.bool, device=r.device)
    if group is not None:
        off = off & (group[:, None] == group[None, :])
    dist = torch.sqrt(torch.where(off, (d * d).sum(-1), torch.ones_like(d[..., 0])))
    v = THOLE_A * dist / (alpha[:, None] * alpha[None, :]) ** (1.0 / 6.0)
    ev = torch.exp(-v)
    l3 = 1.0 - (1.0 + v + 0.5 * v * v) * ev
    l5 = l3 - v * v * v / 6.0 * ev
    eye3 = torch.eye(3, dtype=r.dtype, device=r.device)
    t = (3.0 * l5 / dist ** 5)[..., None, None] * d[..., :, None] * d[..., None, :] \
        - (l3 / dist ** 3)[..., None, None] * eye3
    t = torch.where(off[..., None, None], t, torch.zeros_like(t))
    a = torch.diag_embed(1.0 / alpha)[:, :, None, None] * eye3 - t                 # (n, n, 3, 3)
    return a.permute(0, 2, 1, 3).reshape(3 * n, 3 * n)


def induced(field: torch.Tensor, r: torch.Tensor, alpha: torch.Tensor, group: torch.Tensor | None = None,
            mutual: bool = True) -> torch.Tensor:
    """A^-1 F (n,3) for fields F (n,3) at sites r (n,3) (:func:`thole_matrix`): the induced dipoles times the
    Coulomb constant, self-consistent with the dipoles' own Thole-damped fields; ``mutual=False``: alpha_i F_i
    (direct induction)."""
    if not mutual:
        return alpha[:, None] * field
    return torch.linalg.solve(thole_matrix(r, alpha, group), field.reshape(-1)).reshape(-1, 3)


def damped_energies(q_ml: torch.Tensor, r_ml: torch.Tensor, s: torch.Tensor, alpha: torch.Tensor,
                    q_mm: torch.Tensor, x_mm: torch.Tensor, k: float, mutual: bool = True
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(E_es, E_ind) of the module docstring for ML charges q_ml (n,) at r_ml (n,3) with widths s (n,) and
    polarisability volumes alpha (n,), and MM point charges q_mm (M,) at x_mm (M,3); any consistent units
    (lengths as r, k the Coulomb constant in energy x length / charge^2). Differentiable in every input."""
    r = torch.cdist(r_ml, x_mm, compute_mode="donot_use_mm_for_euclid_dist")       # (n, M), exact differences
    w = s[:, None]
    phi = k * (slater_potential(r, w) @ q_mm)                                      # damped potential (n,)
    lq = slater_field(r, w) * q_mm[None, :]
    field = k * (r_ml * lq.sum(1, keepdim=True) - lq @ x_mm)                       # sum_j lq_ij (r_i - x_j)
    e_es = (q_ml * phi).sum()
    e_ind = -0.5 * (field * induced(field, r_ml, alpha, mutual=mutual)).sum() / k
    return e_es, e_ind


@SCHEMES.register("emle")
class EmleEmbedding(ElectrostaticEmbedding):
    """The model in vacuum plus the damped Coulomb energy of its charges q(R) with the embedded MM charges and
    the induction energy of fixed atomic polarisabilities (Thole's model) in their damped field (module
    docstring); zero ML charges in the MM client."""

    name = "emle"
    field_inputs = True            # the ML client owns the ML–MM Coulomb term (the ML atoms carry no MM charge)
    coulomb_terms: ClassVar[tuple[Term, ...]] = (
        Term("ML–MM Coulomb", "ML (the model's charges q(R) of every step, Slater-damped (Thole exponential "
                              "widths), with the MM charges within the embedding cutoff)"),
        Term("ML–MM induction (polarisation of the ML zone by the MM charges)",
             "ML (Thole induced dipoles, self-consistent, fixed van Duijnen–Swart polarisabilities, in the damped "
             "field of the MM charges within the embedding cutoff)"),
        Term("ML charges with their own periodic images", "nobody (ML charges are zero in PME)"),
    )

    def __init__(self, numbers=None):
        self.numbers = None if numbers is None else np.asarray(numbers, dtype=np.int64).reshape(-1)
        self.alpha, self.width = (None, None) if numbers is None else element_parameters(self.numbers)

    def for_zone(self, numbers) -> "EmleEmbedding":
        """This scheme for an ML zone with the model's atomic numbers ``numbers`` (the parameters are per
        element); refuses elements without a polarisability."""
        return EmleEmbedding(numbers)

    def field_source(self, env, skin, device) -> "EmleField":
        if self.numbers is None:
            raise SetupError("emle embedding needs the ML zone's atomic numbers (its parameters are per element): "
                             "give the ML engine the scheme bound to them, EmleEmbedding().for_zone(numbers)")
        return EmleField(env, skin, self.alpha, self.width)

    def network_energy(self, model, numbers, positions, mol_idx, charge, phi, field):
        """Training/evaluation (model units: Å, e, V, V/Å -> eV): the model in vacuum plus sum_i q_i phi_i -
        1/2 E^T A^-1 E / k of each frame, the MM charges undamped (their positions are not handed over)."""
        adapter = getattr(model, "adapter", None)
        if adapter is not None and not getattr(adapter, "predicts_charges", True):
            raise SetupError(_NO_CHARGES)
        out = model(numbers, positions, mol_idx, charge, torch.zeros_like(phi), torch.zeros_like(field))
        if "charges" not in out:
            raise SetupError(_NO_CHARGES)
        energy = out["energy"]
        alpha_bohr3 = torch.as_tensor([POLARISABILITY_BOHR3.get(int(z), np.nan) for z in numbers.cpu()],
                                      dtype=energy.dtype, device=energy.device)
        if torch.isnan(alpha_bohr3).any():
            element_parameters(numbers.cpu().numpy())                                  # raises, naming it
        alpha = alpha_bohr3 / BOHR_PER_ANGSTROM ** 3                                   # Å^3
        f = field.to(energy.dtype)
        mu = induced(f, positions.to(energy.dtype), alpha, mol_idx)
        per_atom = out["charges"].to(energy.dtype) * phi.to(energy.dtype) \
            - 0.5 * (f * mu).sum(-1) / COULOMB_EV_ANGSTROM
        return energy + torch.zeros_like(energy).index_add_(0, mol_idx, per_atom), out


_NO_CHARGES = ("emle embedding needs a model that predicts atomic charges (AIMNet2); this one predicts none "
               "(MACE, ANI): use [coupling] embedding = \"mechanical\" with mechanical_charges = \"mm\"")


class EmleField(FieldSource):
    """The embedded MM charges of each structure (a Verlet list) and the EMLE term that couples them to the
    model's charges; the model itself is fed no field (phi = E = 0)."""

    def __init__(self, env: MMEnvironment, skin: float, alpha: np.ndarray, width: np.ndarray):
        self.env, self.nlist = env, NeighbourList(env, skin)
        self.alpha, self.width = alpha, width

    @property
    def builds(self) -> int:
        return self.nlist.builds

    def inputs(self, positions, box, ml_raw, device) -> FrameInputs:
        sel = self.nlist.get(positions, box)
        term = EmleTerm(self, sel, positions[sel.atoms])
        return FrameInputs(self.env.ml_indices, sel.ml_shift, None, int(len(sel.atoms)), term=term)


class EmleTerm(ModelTerm):
    """E_es + E_ind of one structure (kJ/mol; module docstring). Reported as ``emle`` in ``ml.energy``, its
    induction part also as ``emle_induction``."""

    name = "emle"

    def __init__(self, source: EmleField, sel, mm_raw: np.ndarray):
        self.source, self.sel, self.mm_raw = source, sel, np.asarray(mm_raw, np.float64)
        self._result = (np.zeros(0, dtype=np.int64), np.zeros((0, 3)), np.zeros((3, 3)))

    def energy(self, out, rows, positions, phi, field):
        if "charges" not in out:
            raise SetupError(_NO_CHARGES)
        if "external" in out.get("terms", {}):
            raise SetupError("emle embedding: this model takes the MM potential and field itself (it owns the "
                             "ML–MM Coulomb term already); use [coupling] embedding = \"electrostatic\"")
        src, sel, f64 = self.source, self.sel, torch.float64
        r = positions.to(f64)
        if len(r) != len(src.alpha):
            raise SetupError(f"emle embedding: the model sees {len(r)} atoms but the ML zone has "
                             f"{len(src.alpha)}; it supports zones whose model atoms are the ML atoms")
        q = out["charges"][rows].to(f64)
        if len(sel.atoms) == 0:
            self._report(out, rows, 0.0)
            return r.new_zeros(())
        # one backward pass of its own for all three gradients; the engine's pass then only meets the term's
        # first-order expansion in q and r, which has the same value and first derivatives (all it takes)
        q_in, r_in = q.detach().requires_grad_(True), r.detach().requires_grad_(True)
        x = torch.tensor(self.mm_raw, dtype=f64, device=r.device, requires_grad=True)
        shift = torch.as_tensor(sel.ml_shift, dtype=f64, device=r.device)
        q_mm, x_img = embedded_charges_at(src.env, sel, r_in - shift, x)              # switched charges, images
        e_es, e_ind = damped_energies(q_in, r_in, torch.as_tensor(src.width, device=r.device),
                                      torch.as_tensor(src.alpha, device=r.device), q_mm, x_img, COULOMB_KJMOL_NM)
        g_q, g_r, g_x = torch.autograd.grad(e_es + e_ind, (q_in, r_in, x))
        f_mm = -g_x.cpu().numpy()
        self._result = (sel.atoms, f_mm, f_mm.T @ x_img.detach().cpu().numpy())
        self._report(out, rows, float(e_ind.detach()))
        return (e_es + e_ind).detach() + (g_q * (q - q.detach())).sum() + (g_r * (r - r.detach())).sum()

    @staticmethod
    def _report(out: dict, rows: slice, e_ind: float) -> None:
        """The induction part in ``out["terms"]["emle_induction"]`` ([B] kJ/mol, this structure's entry)."""
        n_struct = out["energy"].shape[0]
        b = rows.start // max(rows.stop - rows.start, 1)
        terms = out.setdefault("terms", {})
        if "emle_induction" not in terms:
            terms["emle_induction"] = torch.zeros(n_struct, dtype=torch.float64)
        terms["emle_induction"][b] = e_ind

    def result(self):
        return self._result

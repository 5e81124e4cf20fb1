"""Electrostatic embedding with long-range ML–MM electrostatics: the scheme ``electrostatic-lr``.

The network keeps what it was trained on: phi and E of the MM charges within the embedding cutoff (whole
residues, switched to zero over the last ``switch_width``), and with them the term sum_i q_i phi_i^sw of its
predicted charges q_i. This scheme adds, after the model call (:class:`coupling.schemes.ModelTerm`),

    E_LR = E_zone(q, r; all MM charges, periodic images) - sum_i q_i phi_i^sw

where E_zone is :func:`potentials.ewald.zone_ewald` in a periodic box: the Ewald energy of the ML charges with
every MM charge and with the zone's own periodic images (its in-box pairs excluded: the network owns them),
including the neutralising background of the zone's net charge and its cross term with the MM part's net charge
(both Ewald energies, with and without the zone, carry their background, as OpenMM's PME for the MM client
does). For a cluster E_zone is the plain Coulomb sum over every MM charge. So the switched ML–MM Coulomb of the
network is replaced by the full (periodic) one, with nothing counted twice, and the result does not depend on
where the zone sits in the box.

Forces: on the ML atoms through q_i(R, phi, E) (the model's autograd) and directly; on every charged MM atom
(Ewald/Coulomb, from the term) and on the embedded ones through phi^sw (the field's backward); the virial from
both. The polarisation term and the charges' response stay short-range (the network's, within the cutoff).
Training (:meth:`network_energy`) is the electrostatic scheme's: the long-range part is not trained.
"""
from __future__ import annotations

import numpy as np

from coupling.schemes import SCHEMES, ElectrostaticEmbedding, EmbeddedField, ModelTerm, Term
from potentials.core.errors import SetupError


@SCHEMES.register("electrostatic-lr")
class LongRangeElectrostatic(ElectrostaticEmbedding):
    """Electrostatic embedding (the network within the cutoff) + the long-range correction of the module
    docstring. The ML atoms carry no charge in the MM client, as in electrostatic embedding."""

    name = "electrostatic-lr"
    field_inputs = True
    family = "electrostatic"      # the network's inputs are electrostatic's; the long-range part is a run-time term
    long_range = "pme"
    coulomb_terms = (
        Term("ML–MM Coulomb within the embedding cutoff", "ML (network fed phi, E of the MM charges there)"),
        Term("ML–MM Coulomb beyond the cutoff and in the switching shell (predicted ML charges with every MM "
             "charge, PME; plain Coulomb for clusters)", "ML (long-range term)"),
        Term("ML charges with their own periodic images + neutralising background", "ML (long-range term, PME)"),
    )

    def field_source(self, env, skin, device) -> "LongRangeField":
        return LongRangeField(env, skin)


class LongRangeField(EmbeddedField):
    """The embedding's phi/E (with its Verlet list) plus the long-range term of each structure."""

    def __init__(self, env, skin: float):
        from potentials.ewald import ZoneCoulomb        # torch: imported by the ML client only, not the MM client

        super().__init__(env, skin)
        is_ml = np.zeros(len(env.charges), bool)
        is_ml[env.ml_indices] = True
        self.mm_atoms = np.flatnonzero(~is_ml & (np.asarray(env.charges) != 0))
        self.coulomb = ZoneCoulomb(np.asarray(env.charges)[self.mm_atoms], cutoff=env.cutoff, skin=skin)
        self.checked = False

    def inputs(self, positions, box, ml_raw, device):
        base = super().inputs(positions, box, ml_raw, device)
        return base._replace(term=LongRangeTerm(self, positions[self.mm_atoms], box))


class LongRangeTerm(ModelTerm):
    """E_LR of one structure (module docstring)."""

    name = "long_range"

    def __init__(self, source: LongRangeField, mm_positions: np.ndarray, box: np.ndarray | None):
        self.source, self.x, self.box = source, mm_positions, box
        self._r = None

    def energy(self, out, rows, positions, phi, field):
        import torch

        if "charges" not in out:
            raise SetupError("electrostatic-lr embedding needs a model that predicts atomic charges; use "
                             "[coupling] embedding = \"electrostatic\"")
        q = out["charges"][rows].to(torch.float64)
        r = positions.to(torch.float64)
        own = (q * phi.to(torch.float64)).sum()               # the network's sum_i q_i phi_i^sw
        if not self.source.checked:
            self._check_external(out, rows, own)
        self._r = r.detach().cpu().numpy()
        return self.source.coulomb.energy(q, r, self.x, self.box) - own

    def _check_external(self, out, rows, own) -> None:
        """The model must own exactly sum_i q_i phi_i of its charges (checked where the adapter reports it as
        the energy term ``external``): that is what this term takes away."""
        ext = out.get("terms", {}).get("external")
        if ext is not None:
            b = rows.start // max(rows.stop - rows.start, 1)
            e_ext, e_own = float(ext[b].detach()), float(own.detach())
            if abs(e_ext - e_own) > 1e-6 * (1.0 + abs(e_own)):
                raise SetupError(f"the model's energy term 'external' ({e_ext:.6f} kJ/mol) is not sum_i q_i phi_i "
                                 f"of its charges ({e_own:.6f}); electrostatic-lr cannot tell which Coulomb energy "
                                 "the model owns")
        self.source.checked = True

    def result(self):
        last = self.source.coulomb.last
        f_model = -last.dr                                       # fixed charges: what the engine sums as f (x) r
        return self.source.mm_atoms, -last.dx, last.virial - f_model.T @ self._r

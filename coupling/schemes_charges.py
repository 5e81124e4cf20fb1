"""Mechanical embedding with the model's own charges, updated every step: the scheme ``model-charges``.

For a potential that predicts atomic charges but takes no MM field (AIMNet2; any adapter with
``predicts_charges`` and no ``field_inputs``), the ML client computes the ML–MM Coulomb term of the charges the
model predicts for the current geometry,

    E = E_model(R) + sum_i q_i(R) phi_i,

where phi_i is the potential of the MM point charges within the embedding cutoff at ML atom i (whole residues,
switched to zero over the last ``switch_width``: :class:`coupling.embedding.EmbeddingField`, the same
embedding as electrostatic embedding). Forces: through q(R) by autograd (the charges depend on the positions),
and through phi by the field's chain rule, on the ML atoms and on the embedded MM atoms. The ML atoms carry
no charge in the MM client (PME sees none), so nothing is counted twice.

What it captures, and what it does not: the ML–MM electrostatics of charges that follow the ML zone's
geometry (conformational and proton-transfer changes of the charge distribution), which fixed force-field
charges miss. The charges do not respond to the MM field (no polarisation of the ML zone by its environment),
there is no short-range damping of the point-charge interaction, no Coulomb beyond the embedding cutoff, and no
interaction of the ML charges with their own periodic images. Our field-aware network captures the polarisation
(it is fed phi and E); it cannot run in this scheme (it would count sum q phi twice): use ``electrostatic``.
"""
from __future__ import annotations

import numpy as np
import torch

from coupling.schemes import SCHEMES, ElectrostaticEmbedding, EmbeddedField, ModelTerm, Term
from potentials.core.errors import SetupError


@SCHEMES.register("model-charges")
class ModelChargesEmbedding(ElectrostaticEmbedding):
    """The model's charges q(R) of each step times phi of the MM charges within the embedding cutoff (module
    docstring); zero ML charges in the MM client."""

    name = "model-charges"
    field_inputs = True            # the ML engine computes phi (and E) of the embedded MM charges
    coulomb_terms = (
        Term("ML–MM Coulomb", "ML (the model's charges q(R), updated every step, x phi of the MM charges within "
                              "the embedding cutoff)"),
        Term("ML charges with their own periodic images", "nobody (ML charges are zero in PME)"),
    )

    def field_source(self, env, skin, device) -> "ChargeCouplingField":
        return ChargeCouplingField(env, skin)

    def network_energy(self, model, numbers, positions, mol_idx, charge, phi, field):
        """Training/evaluation (model units: V, e -> eV): the model in vacuum plus sum_i q_i phi_i with the
        charges of the frame's geometry."""
        out = model(numbers, positions, mol_idx, charge, torch.zeros_like(phi), torch.zeros_like(field))
        if "charges" not in out:
            raise SetupError("model-charges embedding needs a model that predicts atomic charges")
        energy = out["energy"]
        coul = out["charges"].to(energy.dtype) * phi.to(energy.dtype)
        return energy + torch.zeros_like(energy).index_add_(0, mol_idx, coul), out


class ChargeCouplingField(EmbeddedField):
    """The embedding's phi/E (with its Verlet list) plus the coupling term of each structure."""

    def inputs(self, positions, box, ml_raw, device):
        return super().inputs(positions, box, ml_raw, device)._replace(term=ChargeCouplingTerm())


class ChargeCouplingTerm(ModelTerm):
    """sum_i q_i phi_i of one structure (kJ/mol: e x kJ/mol/e); it reads nothing beyond the engine's leaves."""

    name = "ml_mm_coulomb"

    def energy(self, out, rows, positions, phi, field):
        if "charges" not in out:
            raise SetupError("model-charges embedding needs a model that predicts atomic charges (AIMNet2, our "
                             "network); use [coupling] embedding = \"mechanical\" with mechanical_charges = \"mm\"")
        if "external" in out.get("terms", {}):
            raise SetupError("model-charges embedding: this model takes the MM potential and field itself (it "
                             "owns sum q phi already); use [coupling] embedding = \"electrostatic\"")
        return (out["charges"][rows].to(torch.float64) * phi.to(torch.float64)).sum()

    def result(self):
        return np.zeros(0, dtype=np.int64), np.zeros((0, 3)), np.zeros((3, 3))

"""The spread of a committee's predictions (:class:`potentials.committee.CommitteeAdapter`): the uncertainty
the ML engine reports in the ``ml.committee`` and ``ml.uncertainty`` extras (:func:`coupling.ml_engine.ml_extras`).

The engine's forces are those of the committee's mean energy (one backward pass, as for any model). For the
spread, every member's energy is differentiated on its own (one more backward pass per member, through the
same graph) with respect to the ML atoms' positions and, where the model is fed the MM field, through phi and E
back to the ML positions (the field's own chain rule), so a member's force on an ML atom is exactly the force a
run with that member alone would give. Left out of the spread: the forces on the embedded MM atoms and any
energy term the scheme adds from the model's outputs (:class:`coupling.schemes.ModelTerm`, e.g. the PME term of
``electrostatic-lr``, computed from the mean charges).

Definitions, per structure, over the K members (population statistics, 1/K):

* ``energy_std`` (kJ/mol): the standard deviation of the members' energies;
* ``force_std`` of atom i (kJ/mol/nm): sqrt(mean_k |F_k,i - mean_k F_k,i|^2), the norm of the per-component
  standard deviations of its force; ``force_std_max``: its largest value over the ML atoms.
"""
from __future__ import annotations

import numpy as np
import torch


def member_ml_forces(member_energies: torch.Tensor, frames: list, n_ml: int) -> np.ndarray:
    """Forces (kJ/mol/nm) of each member on the ML atoms of each frame: (K, B, n_ml, 3).

    ``member_energies`` [K, B] (in the graph of the frames' leaves, kept: the engine's own backward pass comes
    after); ``frames``: the engine's per-structure state (``leaves``: ML positions first, then phi and E when
    ``inputs.field`` is set)."""
    flat = [t for f in frames for t in f.leaves]
    out = np.zeros((len(member_energies), len(frames), n_ml, 3))
    for k, e in enumerate(member_energies):
        it = iter(torch.autograd.grad(e.sum(), flat, retain_graph=True, allow_unused=True, materialize_grads=True))
        grads = [[next(it) for _ in f.leaves] for f in frames]
        for b, (f, g) in enumerate(zip(frames, grads)):
            g_ml = g[0].detach().to(torch.float64).cpu().numpy()
            if f.inputs.field is not None:
                g_ml = g_ml + f.inputs.field.backward(g[1], g[2], retain=True)[0][:n_ml]
            out[k, b] = -g_ml[:n_ml]
    return out


def spread(member_energies: torch.Tensor, member_forces: np.ndarray) -> dict:
    """``{"energy_std": (B,) kJ/mol, "force_std_max": (B,) kJ/mol/nm, "force_std": (B, n_ml) kJ/mol/nm,
    "n_members": K}`` of the members' energies [K, B] and ML forces (K, B, n_ml, 3)."""
    e = member_energies.detach().to(torch.float64).cpu().numpy()
    dev = member_forces - member_forces.mean(axis=0, keepdims=True)
    per_atom = np.sqrt((dev ** 2).sum(axis=-1).mean(axis=0))                    # (B, n_ml)
    return {"energy_std": e.std(axis=0), "force_std": per_atom,
            "force_std_max": per_atom.max(axis=1) if per_atom.shape[1] else np.zeros(len(per_atom)),
            "n_members": int(e.shape[0])}


def committee_extras(stats: dict, b: int) -> dict:
    """The extras of structure ``b``: ``ml.committee`` (``{"energy_std": kJ/mol, "force_std_max": kJ/mol/nm,
    "n_members": K}``, self-describing) and ``ml.uncertainty`` (``[energy_std, force_std_max]``, the same two
    numbers as a plain list: what an i-PI ``<trajectory extra_type='ml.uncertainty'>`` writes as columns)."""
    e_std, f_std = float(stats["energy_std"][b]), float(stats["force_std_max"][b])
    return {"ml.committee": {"energy_std": e_std, "force_std_max": f_std, "n_members": int(stats["n_members"])},
            "ml.uncertainty": [e_std, f_std]}

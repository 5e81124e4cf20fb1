"""A stand-in ML potential that reproduces the MM force field's own terms for the ML zone.

It has the network's interface (Å, eV, V, V/Å) and computes, in float64 torch, what the full OpenMM system
assigns to the ML zone beyond the MM client's part: the bonded terms among ML atoms (harmonic bonds and
angles, periodic torsions), every ML–ML nonbonded pair (Coulomb + LJ, exceptions applied, NoCutoff) and the
ML–MM electrostatics sum_i q_i phi_i with the fixed MM charges. With an optional polarisability alpha it adds
-1/2 alpha |E_i|^2 so the field input is exercised too (not part of the force field).

Written independently of the engine: parameters are read from the OpenMM system by type, units converted
here with the OpenMM unit system.
"""
from __future__ import annotations

import itertools

import numpy as np
import openmm
import torch
from openmm import unit

KJMOL_PER_EV = (1.0 * unit.elementary_charge * unit.volt * unit.AVOGADRO_CONSTANT_NA).value_in_unit(
    unit.kilojoule_per_mole)
COULOMB = 138.935456            # OpenMM's ONE_4PI_EPS0, kJ/mol nm / e^2


def _v(q, u):
    return q.value_in_unit(u) if unit.is_quantity(q) else q


def _dihedral(p0, p1, p2, p3):
    """IUPAC dihedral angle (trans = pi), as OpenMM's torsion forces define it."""
    b1, b2, b3 = p1 - p0, p2 - p1, p3 - p2
    n1, n2 = torch.cross(b1, b2, dim=-1), torch.cross(b2, b3, dim=-1)
    m1 = torch.cross(n1, b2 / b2.norm(dim=-1, keepdim=True), dim=-1)
    return torch.atan2((m1 * n2).sum(-1), (n1 * n2).sum(-1))


class ForceFieldOracle(torch.nn.Module):
    """The force field's ML-zone terms, as a network-shaped potential (see module docstring)."""

    def __init__(self, system: openmm.System, ml_indices, polarizability: float = 0.0, n_caps: int = 0,
                 cap_charge: float = 0.0):
        super().__init__()
        ml = [int(i) for i in ml_indices]
        local = {a: k for k, a in enumerate(ml)}
        self.n_ml = len(ml)
        # link-atom caps (coupling.link_atoms): model atoms after the ML atoms, outside the force field; they
        # get a charge cap_charge (energy q phi) and the polarisability, so the field at the caps is exercised
        self.n_caps = int(n_caps)
        nm, kj, rad, e = unit.nanometer, unit.kilojoule_per_mole, unit.radian, unit.elementary_charge
        bonds, angles, torsions = [], [], []
        nb = None
        for f in system.getForces():
            if isinstance(f, openmm.HarmonicBondForce):
                for k in range(f.getNumBonds()):
                    i, j, r0, kb = f.getBondParameters(k)
                    if i in local and j in local:
                        bonds.append((local[i], local[j], _v(r0, nm), _v(kb, kj / nm**2)))
            elif isinstance(f, openmm.HarmonicAngleForce):
                for k in range(f.getNumAngles()):
                    i, j, l, t0, ka = f.getAngleParameters(k)
                    if i in local and j in local and l in local:
                        angles.append((local[i], local[j], local[l], _v(t0, rad), _v(ka, kj / rad**2)))
            elif isinstance(f, openmm.PeriodicTorsionForce):
                for k in range(f.getNumTorsions()):
                    i, j, l, m, per, ph, kt = f.getTorsionParameters(k)
                    if all(a in local for a in (i, j, l, m)):
                        torsions.append((local[i], local[j], local[l], local[m], per, _v(ph, rad), _v(kt, kj)))
            elif isinstance(f, openmm.NonbondedForce):
                nb = f
            elif not isinstance(f, openmm.CMMotionRemover):
                raise ValueError(f"oracle does not model {type(f).__name__}")
        params = [nb.getParticleParameters(a) for a in ml]
        q = np.array([_v(p[0], e) for p in params])
        sig = np.array([_v(p[1], nm) for p in params])
        eps = np.array([_v(p[2], kj) for p in params])
        pairs = {(i, j): (q[i] * q[j], 0.5 * (sig[i] + sig[j]), np.sqrt(eps[i] * eps[j]))
                 for i, j in itertools.combinations(range(self.n_ml), 2)}
        for k in range(nb.getNumExceptions()):
            i, j, qq, s, ep = nb.getExceptionParameters(k)
            if i in local and j in local:
                a, b = sorted((local[i], local[j]))
                pairs[(a, b)] = (_v(qq, e**2), _v(s, nm), _v(ep, kj))
        t = lambda rows, cols: torch.tensor(np.array(rows, dtype=np.float64).reshape(-1, cols))  # noqa: E731
        self.register_buffer("bonds", t(bonds, 4))
        self.register_buffer("angles", t(angles, 5))
        self.register_buffer("torsions", t(torsions, 7))
        idx = np.array(list(pairs), dtype=np.int64).reshape(-1, 2)
        self.register_buffer("pair_idx", torch.as_tensor(idx))
        self.register_buffer("pair_par", t(list(pairs.values()), 3))
        self.register_buffer("q", torch.as_tensor(np.concatenate([q, np.full(self.n_caps, float(cap_charge))])))
        self.alpha = float(polarizability)          # e·Å²/V, energy -1/2 alpha |E|^2 in eV
        self.numbers = None

    def check_numbers(self, numbers: torch.Tensor) -> None:
        if len(numbers) != self.n_ml + self.n_caps:
            raise ValueError(f"oracle built for {self.n_ml} ML atoms and {self.n_caps} caps, got {len(numbers)}")

    def forward(self, numbers, positions, mol_idx, charge, phi, efield):
        n_mol = charge.shape[0]
        x = positions.reshape(n_mol, self.n_ml + self.n_caps, 3)[:, :self.n_ml].to(torch.float64) / 10.0  # Å -> nm
        e = torch.zeros(n_mol, dtype=torch.float64, device=positions.device)
        if len(self.bonds):
            i, j = self.bonds[:, 0].long(), self.bonds[:, 1].long()
            r = (x[:, i] - x[:, j]).norm(dim=-1)
            e = e + (0.5 * self.bonds[:, 3] * (r - self.bonds[:, 2]) ** 2).sum(-1)
        if len(self.angles):
            i, j, k = (self.angles[:, c].long() for c in range(3))
            u, w = x[:, i] - x[:, j], x[:, k] - x[:, j]
            theta = torch.atan2(torch.cross(u, w, dim=-1).norm(dim=-1), (u * w).sum(-1))
            e = e + (0.5 * self.angles[:, 4] * (theta - self.angles[:, 3]) ** 2).sum(-1)
        if len(self.torsions):
            a = [x[:, self.torsions[:, c].long()] for c in range(4)]
            phi_t = _dihedral(*a)
            per, ph, kt = self.torsions[:, 4], self.torsions[:, 5], self.torsions[:, 6]
            e = e + (kt * (1 + torch.cos(per * phi_t - ph))).sum(-1)
        if len(self.pair_idx):
            r = (x[:, self.pair_idx[:, 0]] - x[:, self.pair_idx[:, 1]]).norm(dim=-1)
            qq, s, ep = self.pair_par.unbind(-1)
            sr6 = (s / r) ** 6
            e = e + (COULOMB * qq / r + 4 * ep * (sr6 * sr6 - sr6)).sum(-1)
        e = e / KJMOL_PER_EV                                                          # kJ/mol -> eV
        q = self.q.repeat(n_mol)
        e = e + torch.zeros_like(e).index_add_(0, mol_idx, q * phi.to(torch.float64))
        if self.alpha:
            e2 = (efield.to(torch.float64) ** 2).sum(-1)
            e = e - 0.5 * self.alpha * torch.zeros_like(e).index_add_(0, mol_idx, e2)
        return {"energy": e, "charges": q}

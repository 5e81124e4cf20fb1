"""The MM client's engine: energies and forces of an OpenMM ``System`` for positions sent by i-PI.

One OpenMM ``Context`` is kept for the whole run; each request only sets positions (and the box of a periodic
system) and reads a float64 state back. The context's integrator is never stepped: i-PI integrates.

Virial: non-periodic systems get the exact ``W = sum_i f_i (x) r_i = -dE/d(strain)`` (free). Periodic systems
get ZEROS: OpenMM exposes no box derivative, and a finite-difference strain derivative is both expensive
(12 extra evaluations) and noisy, because every pair crossing the truncated real-space Ewald/LJ cutoff during
the strain adds an energy jump (measured on a 480-atom PME water box, with or without an LJ switching
function: tr W moved by 0.2-4 % with the strain step). i-PI needs the virial only for pressure and NPT, not
for NVT/NVE/PIMD-NVT, so NPT with this MM client is not supported.
"""
from __future__ import annotations

import logging

import numpy as np
import openmm
from openmm import unit
from openmm.app.internal.unitcell import reducePeriodicBoxVectors

from driver.client import ForceResult
from driver.errors import CalculationFailed, SetupError

log = logging.getLogger(__name__)

_KJ = unit.kilojoule_per_mole
_KJ_NM = unit.kilojoule_per_mole / unit.nanometer


def available_platforms() -> list[str]:
    """Names of the OpenMM platforms that loaded on this machine."""
    return [openmm.Platform.getPlatform(i).getName() for i in range(openmm.Platform.getNumPlatforms())]


class OpenMMEngine:
    """:class:`driver.client.Engine` around an OpenMM ``Context``.

    Parameters
    ----------
    system : openmm.System
        The MM system (for ML/MM: the MM client's system from ``coupling.mmsystem``). It must have no
        constraints and no virtual sites, as i-PI integrates every particle freely.
    platform : str, optional
        OpenMM platform name (CUDA, OpenCL, CPU, Reference). Default: CUDA if it can create a context here,
        else CPU. CPU and CUDA run in mixed precision; Reference is double precision.
    properties : dict of str, optional
        Platform properties, e.g. ``{"Threads": "2"}`` (CPU) or ``{"DeviceIndex": "1"}`` (CUDA).
    threads : int, optional
        CPU threads, applied only if the context ends up on the CPU platform (default: OpenMM's, i.e.
        ``OPENMM_CPU_THREADS`` or all cores).
    """

    def __init__(self, system: openmm.System, platform: str | None = None, properties: dict | None = None,
                 threads: int | None = None):
        if system.getNumConstraints():
            raise SetupError(
                f"OpenMM system has {system.getNumConstraints()} constraints, but i-PI integrates without "
                "constraints: build it with constraints=None, rigidWater=False ([mm] rigid_water = false)")
        vsites = [i for i in range(system.getNumParticles()) if system.isVirtualSite(i)]
        if vsites:
            raise SetupError(f"OpenMM system has {len(vsites)} virtual sites (first: particle {vsites[0]}); i-PI "
                             "cannot integrate massless sites: use a water model without extra sites (tip3p)")
        self.natoms: int = system.getNumParticles()
        self.periodic: bool = system.usesPeriodicBoundaryConditions()
        self._default_box = np.array([v.value_in_unit(unit.nanometer)
                                      for v in system.getDefaultPeriodicBoxVectors()])
        self._box: np.ndarray | None = None          # box currently set in the context (nm rows, unreduced)
        self._integrator = openmm.VerletIntegrator(0.001)   # a Context needs one; it is never stepped
        self.threads = threads
        self.context = self._make_context(system, platform, dict(properties or {}))
        self.platform: str = self.context.getPlatform().getName()
        log.info("OpenMM engine: %d atoms, %s, platform %s", self.natoms,
                 "periodic" if self.periodic else "non-periodic", self.platform)

    def _make_context(self, system: openmm.System, platform: str | None, properties: dict) -> openmm.Context:
        names = available_platforms()
        if platform is not None:
            if platform not in names:
                raise SetupError(f"OpenMM platform {platform!r} is not available here; available: {names}")
            candidates = [platform]
        else:
            candidates = [p for p in ("CUDA", "CPU", "Reference") if p in names]
        for i, name in enumerate(candidates):
            props = properties if platform is not None or name != "Reference" else {}
            if name == "CPU" and self.threads:
                props = {**props, "Threads": str(self.threads)}
            try:
                return openmm.Context(system, self._integrator, openmm.Platform.getPlatformByName(name), props)
            except openmm.OpenMMException as exc:
                if platform is not None or i == len(candidates) - 1:
                    raise SetupError(f"OpenMM cannot create a context on platform {name} "
                                     f"(properties {properties}): {exc}") from None
                log.info("OpenMM platform %s unusable here (%s); trying %s", name, str(exc).splitlines()[0],
                         candidates[i + 1])
        raise SetupError(f"no usable OpenMM platform among {names}")   # pragma: no cover - empty list

    # ------------------------------------------------------------------ Engine API
    def compute(self, positions: np.ndarray, boxes: np.ndarray | None = None) -> list[ForceResult]:
        """Energies, forces and virials of B structures.

        Parameters
        ----------
        positions : (B, N, 3) or (N, 3) nm; unwrapped positions are fine.
        boxes : (B, 3, 3) or (3, 3) nm, lattice vectors as rows; ignored by a non-periodic system. None keeps
            the system's default box.
        """
        positions = np.asarray(positions, dtype=np.float64)
        if positions.ndim == 2:
            positions = positions[None]
        if positions.shape[1:] != (self.natoms, 3):
            raise CalculationFailed(f"OpenMMEngine: positions of shape {positions.shape[1:]}, "
                                    f"the system has ({self.natoms}, 3)")
        if boxes is not None:
            boxes = np.broadcast_to(np.asarray(boxes, dtype=np.float64), (len(positions), 3, 3))
        out = []
        for b, pos in enumerate(positions):
            box = self._default_box if (boxes is None or not self.periodic) else boxes[b]
            energy, forces = self._evaluate(pos, box)
            # exact cluster virial W_ab = sum_i f_ia r_ib; zeros with PBC (module docstring)
            virial = np.zeros((3, 3)) if self.periodic else forces.T @ pos
            out.append(ForceResult(energy, forces, virial, {}))
        return out

    # ------------------------------------------------------------------ internals
    def _evaluate(self, pos: np.ndarray, box: np.ndarray) -> tuple[float, np.ndarray]:
        """Energy (kJ/mol) and forces (N,3 kJ/mol/nm) at ``pos`` (nm) in ``box`` (nm rows)."""
        try:
            if self.periodic:
                self._set_box(box)
            self.context.setPositions(pos)
            state = self.context.getState(getEnergy=True, getForces=True)
        except openmm.OpenMMException as exc:
            raise CalculationFailed(f"OpenMM evaluation failed: {exc}") from None
        return (state.getPotentialEnergy().value_in_unit(_KJ),
                np.asarray(state.getForces(asNumpy=True).value_in_unit(_KJ_NM), dtype=np.float64))

    def _set_box(self, box: np.ndarray) -> None:
        if self._box is not None and np.array_equal(box, self._box):
            return
        if abs(box[0, 1]) + abs(box[0, 2]) + abs(box[1, 2]) > 1e-12 * np.abs(box).max() \
                or not np.all(np.diag(box) > 0):
            raise CalculationFailed(
                f"box {box.tolist()} nm is not in i-PI's standard orientation (a along x, b in the xy plane, "
                "positive diagonal); give the cell as abcABC or an upper-triangular h in the i-PI input")
        if self._box is None and not np.allclose(box, self._default_box, rtol=0, atol=1e-4):
            log.warning("the cell from i-PI (%s nm) differs from the system's box (%s nm); using i-PI's",
                        np.round(box, 4).tolist(), np.round(self._default_box, 4).tolist())
        # OpenMM wants reduced triclinic vectors; reduction changes no lattice point, so no energy
        reduced = reducePeriodicBoxVectors([openmm.Vec3(*row) for row in box]).value_in_unit(unit.nanometer)
        self.context.setPeriodicBoxVectors(*reduced)
        self._box = box.copy()

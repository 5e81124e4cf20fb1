"""The MM client's engine: energies, forces and virials of an OpenMM ``System`` for positions sent by i-PI.

One OpenMM ``Context`` is kept for the whole run; each request only sets positions (and the box of a periodic
system) and reads a float64 state back. The context's integrator is never stepped: i-PI integrates.

Virial (``W_ab = -dE/dF_ab`` for the homogeneous deformation ``r -> F r``, cell ``h -> F h``; kJ/mol, not
divided by the volume; i-PI's pressure is ``(2 K + tr W) / 3V`` and its barostats read the upper triangle,
``engine/barostats.py``):

* **Non-periodic systems**: the exact ``W = sum_i f_i (x) r_i`` (free).
* **Periodic systems** (``virial="full"``, the default): the forces that do not use periodic boundary conditions
  (bonds, angles, torsions: their energy does not depend on the cell) get the exact ``sum_i f_i (x) r_i`` from
  one extra force call on their own force group (~0.2 ms at 2.6 k atoms). The box-dependent forces
  (NonbondedForce with PME, LJ, dispersion correction; any periodic custom force) get central finite differences
  of their energy under homogeneous strain, positions and cell scaled together exactly as i-PI's barostats scale
  them (every atom, not molecular centres): ``W_ab = -[E(I + s e_ab) - E(I - s e_ab)] / 2s`` for the 6
  upper-triangular components a <= b (these deformations keep OpenMM's and i-PI's cell orientation: a along x,
  b in the xy plane), mirrored into the lower triangle (a rotation-invariant energy has a symmetric virial).
  The fractional coordinates do not change under the strain, and OpenMM fixes the PME grid and alpha when the
  context is made (checked: a 15 % larger cell keeps them), so the reciprocal part is a smooth function of the
  strain; over an NPT run the grid stays the one chosen for the starting cell, as with OpenMM's own
  MonteCarloBarostat (a few % of volume change moves the PME error very little). **Cost: 12 energy evaluations of
  the box-dependent forces per structure, about 14x the plain force call** (each new cell also rebuilds OpenMM's
  neighbour list). Measured on the shipped example (inputs/examples/methanol/prepared, 2637 atoms, CPU platform,
  1 or 2 threads on a shared 2-core machine, ``tests/bench/bench_virial.py``, results/virial_cpu.md): 15 ms per
  plain call, 210 ms with "full", 45 ms with "isotropic" (8-18x and 2.4-3x over repeated runs).
* ``virial="isotropic"``: only the isotropic strain is differenced (2 evaluations, about 3x the force call): the
  trace of W is the same as with "full", the box-dependent part of the anisotropic (traceless) virial is dropped,
  the box-independent part stays exact.
  Enough for i-PI's isotropic barostats (``isotropic``, ``stochastic-rescaling``) and ``pressure_md``; wrong
  for ``flexible``/``anisotropic`` barostats and ``stress_md``/``virial_md`` off-diagonals.
* ``virial="none"``: zeros for a periodic system (NVT/NVE/PIMD-NVT never read the virial). i-PI then reports
  a meaningless pressure: only use it when the input has no barostat and prints no pressure
  (``driver.xmlinput.needs_virial``).

Accuracy of the strain step ``s`` (default :data:`STRAIN_STEP` = 2e-3): the energy is truncated at the
real-space cutoff (erfc Coulomb tail, LJ without switch), so every pair that crosses the cutoff between
``-s`` and ``+s`` adds a small energy jump. The difference therefore measures the energy's *thermodynamic*
strain derivative (jumps included on average: the same energy OpenMM's MonteCarloBarostat samples, including the
LJ truncation's impulsive term, estimated at -100 bar for TIP3P at 1 nm and -180 bar at 0.8 nm, that a
pair-force virial would miss) with a random error that falls as 1/sqrt(s) (the few pairs crossing), while the
O(s^2) truncation error grows as s^2. Measured on the shipped example (tr W = -2.36e4 kJ/mol, -1.53e5 of it bonded
and exact) against a fit over 81 strains: the error of the box-dependent trace is ~+650 kJ/mol at s = 1e-2,
100-150 at 1e-3 (noise), 300-700 at 2.5e-4; at s = 2e-3 about 100 kJ/mol, i.e. 0.4 % of tr W or ~20 bar in the
27 nm^3 box (its instantaneous pressure fluctuates by hundreds of bar). The noise grows relatively in small boxes
with short cutoffs: ~1.5 % of tr W (~70 bar) for 555 atoms with a 0.7 nm cutoff. It is a zero-mean random force
on the barostat, which its own thermostat absorbs (over 50 ps of i-PI NPT the conserved quantity stayed within
2 kJ/mol). Validation: i-PI's isotropic barostat with this virial gives flexible TIP3P (555 atoms, 0.8 nm) a
density of 1.0063 +- 0.0017 g/cm^3, OpenMM's MonteCarloBarostat 1.0072 +- 0.0017 (tests/bench/bench_npt_density.py,
results/npt_density.md); a pair-force virial would be ~0.008 denser. Energies are read in float64 (the CPU platform's mixed
precision moves tr W by ~1e-4 relative to the Reference platform). A strained box must stay wider than twice the
cutoff.

Parts (``part``), for ring-polymer contraction: ``"fast"`` is every bonded term plus the real-space nonbonded
terms (erfc-screened Coulomb within the cutoff, LJ, exceptions, exclusion corrections, dispersion correction);
``"slow"`` is the reciprocal-space sum of the NonbondedForce (``setReciprocalSpaceForceGroup``), a smooth,
long-ranged force: even inside a water molecule its erf(αr)/r term is a spring of ~5e2 kJ/mol/nm² (α = 3.1/nm at
a 1 nm cutoff), 1e-3 of the O–H bond's; stretching an O–H bond by 2 pm changes it ~1 % as much as the whole
force (tests/potentials/test_openmm_parts.py). fast + slow = all, energy, forces and virial: each virial mode
computes its part's share (the exact Σ f⊗r of the bonded terms goes with "fast", the strain differences act on
the part's own box-dependent groups). "slow" needs a periodic system with PME, LJPME or Ewald.
"""
from __future__ import annotations

import copy
import logging

import numpy as np
import openmm
from openmm import unit
from openmm.app.internal.unitcell import reducePeriodicBoxVectors

from potentials.core.contracts import ForceResult
from potentials.core.errors import CalculationFailed, SetupError

log = logging.getLogger(__name__)

_KJ = unit.kilojoule_per_mole
_KJ_NM = unit.kilojoule_per_mole / unit.nanometer

VIRIAL_MODES = ("full", "isotropic", "none")
PARTS = ("all", "fast", "slow")          # which part of the MM force an engine serves (module docstring: parts)
STRAIN_STEP = 2e-3            # relative strain of the finite differences (module docstring: accuracy)
# force groups of a grouped context: box-independent (bonded), box-dependent direct space (real-space PME,
# LJ, dispersion correction, periodic custom forces), reciprocal space of the NonbondedForce (PME, LJPME, Ewald)
_FREE_GROUP, _BOX_GROUP, _RECIP_GROUP = 0, 1, 2
_PART_GROUPS = {"all": (_FREE_GROUP, _BOX_GROUP, _RECIP_GROUP), "fast": (_FREE_GROUP, _BOX_GROUP),
                "slow": (_RECIP_GROUP,)}
# upper-triangular unit strains (a <= b): they keep a along x and b in the xy plane
_STRAINS = tuple((a, b) for a in range(3) for b in range(a, 3))


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
    virial : {"full", "isotropic", "none"}
        How a periodic system's virial is computed (module docstring: route, cost, accuracy). "full" (default)
        is right for every i-PI input; "isotropic" costs 2 instead of 12 extra energy evaluations and is right
        for isotropic barostats and the scalar pressure; "none" returns zeros. Non-periodic systems always get
        the exact (free) cluster virial.
    strain_step : float
        Relative strain of the finite differences (default :data:`STRAIN_STEP`).
    part : {"all", "fast", "slow"}
        The part of the force computed (module docstring: parts); "all" (default) is the whole system.
    """

    def __init__(self, system: openmm.System, platform: str | None = None, properties: dict | None = None,
                 threads: int | None = None, virial: str = "full", strain_step: float = STRAIN_STEP,
                 part: str = "all"):
        if system.getNumConstraints():
            raise SetupError(
                f"OpenMM system has {system.getNumConstraints()} constraints, but i-PI integrates without "
                "constraints: build it with constraints=None, rigidWater=False ([mm] rigid_water = false)")
        vsites = [i for i in range(system.getNumParticles()) if system.isVirtualSite(i)]
        if vsites:
            raise SetupError(f"OpenMM system has {len(vsites)} virtual sites (first: particle {vsites[0]}); i-PI "
                             "cannot integrate massless sites: use a water model without extra sites (tip3p)")
        if virial not in VIRIAL_MODES:
            raise SetupError(f"virial = {virial!r}; choose one of {', '.join(VIRIAL_MODES)}")
        if not 0.0 < strain_step <= 0.05:
            raise SetupError(f"strain_step = {strain_step}; use a small positive relative strain (default "
                             f"{STRAIN_STEP})")
        if part not in PARTS:
            raise SetupError(f"part = {part!r}; choose one of {', '.join(PARTS)}")
        self.natoms: int = system.getNumParticles()
        self.periodic: bool = system.usesPeriodicBoundaryConditions()
        self.virial: str = virial if self.periodic else "cluster"
        self.strain_step = float(strain_step)
        self.part = part
        self._groups = -1                                 # force-group mask of the part's energy and forces
        if part != "all" and not _has_reciprocal(system):
            raise SetupError("a fast/slow split of the MM force needs reciprocal space: a periodic system with "
                             "[mm] nonbonded_method = PME, LJPME or Ewald")
        if (self.periodic and virial != "none") or part != "all":
            system = self._grouped(system)
            self._groups = sum(1 << g for g in _PART_GROUPS[part])
        self._default_box = np.array([v.value_in_unit(unit.nanometer)
                                      for v in system.getDefaultPeriodicBoxVectors()])
        self._box: np.ndarray | None = None          # box currently set in the context (nm rows, unreduced)
        self._integrator = openmm.VerletIntegrator(0.001)   # a Context needs one; it is never stepped
        self.threads = threads
        self.context = self._make_context(system, platform, dict(properties or {}))
        self.platform: str = self.context.getPlatform().getName()
        log.info("OpenMM engine: %d atoms, %s, platform %s, virial %s%s", self.natoms,
                 "periodic" if self.periodic else "non-periodic", self.platform, self.virial,
                 "" if part == "all" else f", part {part} (force groups {_PART_GROUPS[part]})")

    @property
    def provides_virial(self) -> bool:
        """Whether the virial it returns is the real one (False: a periodic system with ``virial="none"``)."""
        return self.virial != "none"

    @staticmethod
    def _grouped(system: openmm.System) -> openmm.System:
        """A copy of ``system`` whose box-dependent forces are in group _BOX_GROUP (their reciprocal space in
        _RECIP_GROUP) and the others in _FREE_GROUP."""
        system = copy.deepcopy(system)
        for force in system.getForces():
            force.setForceGroup(_BOX_GROUP if force.usesPeriodicBoundaryConditions() else _FREE_GROUP)
            if isinstance(force, openmm.NonbondedForce):
                force.setReciprocalSpaceForceGroup(_RECIP_GROUP)
        return system

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
            if not self.periodic:
                energy, forces = self._evaluate(pos, box)
                virial = forces.T @ pos                 # exact cluster virial W_ab = sum_i f_ia r_ib
            elif self.virial == "none":
                energy, forces = self._evaluate(pos, box)
                virial = np.zeros((3, 3))
            else:
                strained = self._strain_virial(pos, box)
                energy, forces = self._evaluate(pos, box)    # last: the context is left at this structure
                virial = strained
                if _FREE_GROUP in _PART_GROUPS[self.part]:
                    virial = virial + self._free_forces().T @ pos
            out.append(ForceResult(energy, forces, virial, {}))
        return out

    # ------------------------------------------------------------------ internals
    def _evaluate(self, pos: np.ndarray, box: np.ndarray) -> tuple[float, np.ndarray]:
        """Energy (kJ/mol) and forces (N,3 kJ/mol/nm) at ``pos`` (nm) in ``box`` (nm rows)."""
        try:
            if self.periodic:
                self._set_box(box)
            self.context.setPositions(pos)
            state = self.context.getState(getEnergy=True, getForces=True, groups=self._groups)
        except openmm.OpenMMException as exc:
            raise CalculationFailed(f"OpenMM evaluation failed: {exc}") from None
        return (state.getPotentialEnergy().value_in_unit(_KJ),
                np.asarray(state.getForces(asNumpy=True).value_in_unit(_KJ_NM), dtype=np.float64))

    def _strain_virial(self, pos: np.ndarray, box: np.ndarray) -> np.ndarray:
        """-dE/dF of the box-dependent forces by central differences of their energy (module docstring)."""
        s = self.strain_step
        strains = [None] if self.virial == "isotropic" else _STRAINS
        w = np.zeros((3, 3))
        try:
            self._set_box(box)                          # checks the cell before it is strained
        except openmm.OpenMMException as exc:
            raise CalculationFailed(f"OpenMM evaluation failed: {exc}") from None
        try:
            for ab in strains:
                unit_strain = np.eye(3) if ab is None else np.zeros((3, 3))
                if ab is not None:
                    unit_strain[ab] = 1.0
                e = []
                for sign in (1.0, -1.0):
                    deform = np.eye(3) + sign * s * unit_strain
                    self._apply_box(box @ deform.T)
                    self.context.setPositions(pos @ deform.T)
                    state = self.context.getState(getEnergy=True, groups=self._box_groups)
                    e.append(state.getPotentialEnergy().value_in_unit(_KJ))
                dw = -(e[0] - e[1]) / (2.0 * s)
                if ab is None:
                    w += np.eye(3) * dw / 3.0
                else:
                    w[ab] = w[ab[::-1]] = dw
        except openmm.OpenMMException as exc:
            raise CalculationFailed(f"OpenMM evaluation failed while straining the cell by {s:g} for the virial "
                                    f"(the box must stay wider than twice the cutoff): {exc}") from None
        return w

    @property
    def _box_groups(self) -> int:
        """Force-group mask of the part's box-dependent forces (what the strain differences act on)."""
        return sum(1 << g for g in _PART_GROUPS[self.part] if g != _FREE_GROUP)

    def _free_forces(self) -> np.ndarray:
        """Forces (kJ/mol/nm) of the box-independent forces at the context's current state."""
        state = self.context.getState(getForces=True, groups=1 << _FREE_GROUP)
        return np.asarray(state.getForces(asNumpy=True).value_in_unit(_KJ_NM), dtype=np.float64)

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
        self._apply_box(box)

    def _apply_box(self, box: np.ndarray) -> None:
        """Set ``box`` (nm rows, i-PI's orientation) in the context."""
        # OpenMM wants reduced triclinic vectors; reduction changes no lattice point, so no energy
        reduced = reducePeriodicBoxVectors([openmm.Vec3(*row) for row in box]).value_in_unit(unit.nanometer)
        self.context.setPeriodicBoxVectors(*reduced)
        self._box = box.copy()


def _has_reciprocal(system: openmm.System) -> bool:
    """Whether ``system`` has a NonbondedForce with a reciprocal-space part (PME, LJPME, Ewald)."""
    kinds = (openmm.NonbondedForce.PME, openmm.NonbondedForce.LJPME, openmm.NonbondedForce.Ewald)
    return any(isinstance(f, openmm.NonbondedForce) and f.getNonbondedMethod() in kinds for f in system.getForces())

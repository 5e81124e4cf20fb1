"""The uncertainty guard of the ML client: stop (or flag) a run whose committee disagrees for too long.

A committee model (:mod:`potentials.committee`) reports its spread in the ``ml.committee`` extra
(:mod:`coupling.committee_spread`): ``force_std_max``, the largest spread of an ML atom's force (kJ/mol/nm).
With ``--max-force-uncertainty F`` the ML client counts the consecutive requests whose largest
``force_std_max`` over the request's structures (beads) exceeds F; after ``--uncertainty-steps N`` of them it
stops with one line naming the request, the value and the threshold (``--uncertainty-action stop``, the
default: exit code 2, so `mlmm run` stops without restarting and saves ``last_good.pdb``), or logs that line
once per episode and marks ``"flagged": true`` in the ``ml.committee`` extra of every structure over the
threshold while the episode lasts (``flag``). A request below the threshold resets the count.
"""
from __future__ import annotations

import logging

from potentials.core.errors import CalculationFailed, SetupError

log = logging.getLogger(__name__)

UNCERTAINTY_STEPS = 10          # --uncertainty-steps default: consecutive requests over the threshold
ACTIONS = ("stop", "flag")


class UncertaintyGuard:
    """Counts consecutive requests whose committee force spread exceeds ``max_force_std`` (kJ/mol/nm)."""

    def __init__(self, max_force_std: float, steps: int = UNCERTAINTY_STEPS, action: str = "stop"):
        if not max_force_std > 0:
            raise SetupError(f"--max-force-uncertainty {max_force_std}: must be a positive force in kJ/mol/nm")
        if steps < 1:
            raise SetupError(f"--uncertainty-steps {steps}: must be >= 1")
        if action not in ACTIONS:
            raise SetupError(f"--uncertainty-action {action!r}: choose one of {', '.join(ACTIONS)}")
        self.max_force_std, self.steps, self.action = float(max_force_std), int(steps), action
        self.count = 0              # consecutive requests over the threshold so far
        self.tripped = 0            # episodes that reached `steps`

    @classmethod
    def from_args(cls, args) -> "UncertaintyGuard | None":
        """The guard of ``--max-force-uncertainty/--uncertainty-steps/--uncertainty-action`` (None: not asked)."""
        value = getattr(args, "max_force_uncertainty", None)
        if value is None:
            return None
        steps = getattr(args, "uncertainty_steps", None)
        return cls(value, UNCERTAINTY_STEPS if steps is None else steps,
                   getattr(args, "uncertainty_action", None) or "stop")

    def check_engine(self, engine) -> None:
        """Refuse an ML engine whose model is no committee (it reports no spread to watch)."""
        adapter = getattr(engine, "adapter", None)
        if adapter is not None and getattr(adapter, "n_members", None) is None:
            raise SetupError("--max-force-uncertainty needs a committee model (mlmm train --committee K); the model "
                             f"given is a single {getattr(adapter, 'architecture', 'model')!r} model")

    def observe(self, results: list, request: int) -> None:
        """Update the count with one request's results (their ``ml.committee`` extras); raise CalculationFailed
        (stop) or log and flag (flag) once the count reaches ``steps``."""
        spreads = [(r.extras.get("ml.committee") or {}).get("force_std_max") for r in results]
        if not any(s is not None for s in spreads):
            return
        b, value = max(((i, float(s)) for i, s in enumerate(spreads) if s is not None), key=lambda t: t[1])
        if not value > self.max_force_std:
            self.count = 0
            return
        self.count += 1
        if self.count < self.steps:
            return
        message = (f"uncertain structure at request {request} (structure {b}): the committee's force spread "
                   f"force_std_max = {value:.3g} kJ/mol/nm has stayed above --max-force-uncertainty "
                   f"{self.max_force_std:.3g} kJ/mol/nm for {self.count} consecutive requests (--uncertainty-steps "
                   f"{self.steps}); likely cause: the ML zone left the committee's training data (add such frames: "
                   "label them and retrain, or lower the temperature / time step)")
        if self.action == "stop":
            raise CalculationFailed(message + ". Not sending it to i-PI.")
        for s, r in zip(spreads, results):
            if s is not None and float(s) > self.max_force_std:
                r.extras["ml.committee"]["flagged"] = True
        if self.count == self.steps:
            self.tripped += 1
            log.warning("%s; flagged, running on (--uncertainty-action flag)", message)


def uncertainty_options(args) -> dict:
    """The guard's options of `mlmm run` as the ML clients' ``model_options`` (checked here, before anything
    starts; keys absent when not given)."""
    UncertaintyGuard.from_args(args)
    names = ("max_force_uncertainty", "uncertainty_steps", "uncertainty_action")
    return {k: getattr(args, k) for k in names if getattr(args, k, None) is not None}

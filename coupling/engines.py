"""The engine seam: what a force client computes, by kind (``mlmm client KIND``, the launcher's sockets).

:data:`ENGINES` maps a kind to a builder ``(spec, options) -> Engine`` (:class:`potentials.core.contracts.Engine`).
A new kind of client is one module with a builder and one ``ENGINES.register(...)``; the CLI's choices, the
launcher's client commands and the ASE calculator all look kinds up here.

``options`` is an :class:`EngineOptions`: the command-line settings a builder may use (model path, torch
device, OpenMM platform, threads, compile). Builders ignore what they do not need.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from potentials.core.errors import SetupError
from potentials.core.registry import Registry

log = logging.getLogger(__name__)

ENGINES: Registry = Registry("client kind")


@dataclass
class EngineOptions:
    """Settings of one client (defaults = the CLI's)."""

    model: str | None = None          # model file (ML client; MM client in mechanical embedding with model charges)
    device: str = "cpu"               # torch device
    platform: str | None = None       # OpenMM platform (MM client)
    threads: int | None = None        # CPU threads (torch or OpenMM)
    compile: bool = False             # torch.compile the network (ML client)
    virial: str = "full"              # MM client, periodic: "full" | "isotropic" | "none" (see OpenMMEngine)
    model_type: str | None = None     # model family (potentials.adapters.MODEL_TYPES); None: detected from the file
    dtype: str | None = None          # float32 / float64 for the model (ML client); None: the model's own
    allow_embedding_mismatch: bool = False   # ML client: warn instead of refusing a system whose embedding
    #                                          differs from the model's training embedding (ml_engine.check_embedding)


@ENGINES.register("mm")
def build_mm_engine(spec, options: EngineOptions | None = None, part: str = "all"):
    """The MM client's engine: the full OpenMM system, or the ML/MM-split one if the spec has an ML zone.

    ``options.model``/``device`` are only used by mechanical embedding with network charges on the ML atoms;
    ``options.threads``: OpenMM CPU threads (ignored on GPU platforms). ``part``: the whole MM force ("all"),
    or its fast or slow part (``potentials.openmm_engine``: parts).
    """
    from potentials.openmm_engine import OpenMMEngine
    from potentials.openmm_system import load_system

    options = options or EngineOptions()
    topology, system, positions = load_system(spec)
    if spec.ml.indices:
        system = mm_system_from_spec(spec, topology, system, positions, model_path=options.model,
                                     device=options.device)
    return OpenMMEngine(system, platform=options.platform, threads=options.threads, virial=options.virial,
                        part=part)


def mm_system_from_spec(spec, topology, system, positions_nm=None, *, model_path=None, device: str = "cpu"):
    """The MM client's system for a system.toml: :func:`coupling.mmsystem.mlmm_mm_system` in the spec's
    embedding scheme, checked by :func:`coupling.bookkeeping.check_split`.

    A scheme that keeps fixed ML charges taken from the model (mechanical embedding with
    ``mechanical_charges = "model"``) needs the model (``model_path``) and the structure's positions (nm).
    """
    from coupling.bookkeeping import check_split
    from coupling.mmsystem import check_selection, mlmm_mm_system
    from coupling.schemes import get_scheme

    from coupling.zones import ZONES

    scheme = get_scheme(spec.coupling.embedding)
    cut = ZONES.get(spec.ml.zone).from_topology(topology, spec.ml.indices).cut_pairs() if spec.ml.indices else set()
    check_selection(system, spec.ml.indices, topology, cut_pairs=cut)
    charges = scheme.fixed_charges(spec, topology, positions_nm, model_path, device)
    mm = mlmm_mm_system(system, spec.ml.indices, scheme, charges, cut_pairs=cut)
    check_split(mm, spec.ml.indices, scheme, full_system=system, ml_charges=charges)
    log.info("MM client: ML/MM split for %d ML atoms, %s embedding; terms:\n%s", len(spec.ml.indices), scheme.name,
             scheme.ownership_table())
    return mm


@ENGINES.register("ml")
def build_ml_engine(spec, options: EngineOptions | None = None):
    """The ML client's engine (model + the spec's embedding scheme)."""
    options = options or EngineOptions()
    if not options.model:
        raise SetupError("`mlmm client ml` needs --model PATH (a model written by `mlmm train`, or a MACE, AIMNet2 "
                         "or ANI model file)")
    if not spec.ml.indices:
        raise SetupError("the system file has an empty ML zone ([ml] indices); nothing for the ML client to "
                         "compute (select one with `mlmm prepare --ml ...`)")
    if options.threads:
        import torch
        torch.set_num_threads(options.threads)
    from coupling.ml_engine import MLEngine

    return MLEngine.from_spec(spec, options.model, options.device, compile=options.compile,
                              model_type=options.model_type, dtype=options.dtype,
                              allow_embedding_mismatch=options.allow_embedding_mismatch)


@ENGINES.register("mm-fast")
def build_mm_fast_engine(spec, options: EngineOptions | None = None):
    """The fast part of the MM force: bonded terms + real-space nonbonded (PME direct space, LJ); for ring-polymer
    contraction, on every bead (pair with mm-slow)."""
    return build_mm_engine(spec, options, part="fast")


@ENGINES.register("mm-slow")
def build_mm_slow_engine(spec, options: EngineOptions | None = None):
    """The slow part of the MM force: PME reciprocal space; for ring-polymer contraction, on few beads (pair with
    mm-fast)."""
    return build_mm_engine(spec, options, part="slow")


def build_engine(kind: str, spec, options: EngineOptions | None = None):
    """The engine of client ``kind`` for ``spec`` (SetupError naming the known kinds for an unknown one)."""
    return ENGINES.get(kind)(spec, options)

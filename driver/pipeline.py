"""The data-and-model pipeline commands: ``mlmm label``, ``mlmm train`` and ``mlmm evaluate``.

The work lives in the potentials layer (:mod:`potentials.qmmm_reference`, :mod:`potentials.train`,
:mod:`potentials.evaluate`), which knows no embedding scheme; this module parses the command's arguments and
hands it the coupling layer's objects: the embedding's point charges for labelling and the
:class:`potentials.core.contracts.TrainingScheme` objects of :data:`coupling.schemes.SCHEMES` for training
and evaluation. ``--print-config`` (label, train) prints the effective configuration and exits.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path

from potentials.core.config import describe
from potentials.core.errors import SetupError

# the rows of the `mlmm evaluate` table, in this order: what the ML client runs, and the mechanical baseline
EVALUATED_SCHEMES = ("electrostatic", "mechanical")
# reference data are always electrostatically embedded: the scheme whose point charges `mlmm label` uses
LABEL_SCHEME = "electrostatic"


def label_main(args: argparse.Namespace) -> int:
    """``mlmm label --out FILE [--config TOML] [--frames N] [--shard K/N] [--solutes A,B] [--qm-device auto|cpu|gpu]
    [--export-jobs JOBS.npz | --import-labels RESULTS.npz] [--print-config]``."""
    import torch

    from coupling.schemes import SCHEMES
    from potentials.qmmm_reference import DEFAULT_CONFIG, LabelConfig, only_solutes, run

    config_path = args.config if args.config is not None else (DEFAULT_CONFIG if DEFAULT_CONFIG.exists() else None)
    cfg = only_solutes(LabelConfig.from_toml(config_path), getattr(args, "solutes", None))
    if getattr(args, "qm_device", None):
        cfg = dataclasses.replace(cfg, qm_device=args.qm_device)
    if getattr(args, "print_config", False):
        print(describe(cfg, title=f"mlmm label configuration ({config_path or 'defaults'})"))
        return 0
    threads = int(os.environ.get("OMP_NUM_THREADS", "1"))
    torch.set_num_threads(threads)
    config_text = Path(config_path).read_text() if config_path else ""
    if getattr(args, "import_labels", None):
        from potentials.qm_jobs import import_labels
        import_labels(args.import_labels, args.out)
        return 0
    if getattr(args, "export_jobs", None):
        from potentials.qm_jobs import export
        export(cfg, args.out, args.export_jobs, SCHEMES.get(LABEL_SCHEME).point_charges, frames=args.frames,
               config_text=config_text, shard=_shard(getattr(args, "shard", None)))
        return 0
    run(cfg, args.out, SCHEMES.get(LABEL_SCHEME).point_charges, frames=args.frames, config_text=config_text,
        threads=threads, shard=_shard(getattr(args, "shard", None)))
    return 0


def _shard(text: str | None) -> tuple[int, int]:
    """``--shard K/N`` as (K, N); None = the whole plan."""
    if text is None:
        return (1, 1)
    k, _, n = text.partition("/")
    if not (k.strip().isdigit() and n.strip().isdigit()) or not 1 <= int(k) <= int(n):
        raise SetupError(f"--shard {text!r}: give K/N with 1 <= K <= N (two jobs: --shard 1/2 and --shard 2/2)")
    return int(k), int(n)


def train_main(args: argparse.Namespace) -> int:
    """``mlmm train CONFIG [--device D] [--resume] [--committee K] [--print-config]``; ``--committee K`` (or
    ``[train] committee = K`` in the config; the flag wins): K members (seeds seed..seed+K-1, their own splits) in one committee file (:mod:`potentials.committee_train`)."""
    from coupling.schemes import SCHEMES
    from potentials.train import TrainConfig, train

    cfg = TrainConfig.from_toml(args.config)
    if getattr(args, "print_config", False):
        print(describe(cfg, title=f"mlmm train configuration ({args.config})"))
        return 0
    scheme = SCHEMES.get(cfg.embedding)()
    committee = getattr(args, "committee", None)
    committee = committee if committee is not None else (cfg.committee if cfg.committee > 1 else None)
    if committee is not None:
        from potentials.committee_train import train_committee

        train_committee(cfg, committee, device=args.device, resume=args.resume, scheme=scheme)
        return 0
    train(cfg, device=args.device, resume=args.resume, scheme=scheme)
    return 0


def evaluated_model(path, device: str, model_type: str | None = None):
    """(model in the network's units, the schemes to evaluate it in) for ``mlmm evaluate``: our network in
    electrostatic and mechanical embedding; another package's model (no field inputs) in vacuum plus its own
    charges coupled to the MM charges (``model-charges``: held fixed -> ``mechanical``, following the geometry ->
    ``model-charges``; damped, with induction -> ``emle``) where it predicts charges, else in ``mechanical`` embedding with no ML charges (the zone in
    vacuum: its errors then include the whole ML–MM interaction)."""
    from potentials.adapter_base import ModelUnitsModule
    from potentials.adapters import EmbeddedAIMNet2Adapter, load_adapter

    adapter = load_adapter(path, device, model_type=model_type)
    if isinstance(adapter, EmbeddedAIMNet2Adapter):
        return adapter.module, EVALUATED_SCHEMES
    if getattr(adapter, "n_members", None) is not None:           # a committee of the network: its mean
        from potentials.committee import CommitteeNetwork
        return CommitteeNetwork([m.module for m in adapter.members]), EVALUATED_SCHEMES
    return ModelUnitsModule(adapter), (("model-charges", "emle", "mechanical") if adapter.predicts_charges
                                       else ("mechanical",))


def evaluate_main(args: argparse.Namespace) -> int:
    """``mlmm evaluate MODEL DATASET [--split test] [--device D]``: print the error table per solute."""
    import torch

    from coupling.schemes import SCHEMES
    from potentials.evaluate import evaluate, format_table, load_frames, read_gas_energies

    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    model, names = evaluated_model(args.model, args.device, getattr(args, "model_type", None))
    frames = load_frames(args.dataset, args.split)
    if not frames:
        raise SetupError(f"{args.dataset}: no frames in split {args.split!r}")
    schemes = {name: SCHEMES.get(name)() for name in names}
    res = evaluate(model, frames, args.device, gas_energy=read_gas_energies(args.dataset), schemes=schemes)
    print(f"{args.model} on {args.dataset} (split {args.split}, {len(frames)} frames)\n")
    print(format_table(res))
    return 0

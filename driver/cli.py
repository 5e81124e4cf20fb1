"""The `mlmm` command line. Argument parsing only; each subcommand's work lives in its own module and is
imported lazily, so `mlmm --help` stays fast and a missing optional dependency only hits its own command.

Every failure ends with one line on stderr (`mlmm: error: ...`) and a non-zero exit code.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import logging
import sys

from coupling.engines import ENGINES, EngineOptions
from potentials.core.errors import MLMMError
from potentials.core.spec import CouplingSpec, MMSpec, StructureSpec

# subcommand -> "module:function"; the function takes the parsed argparse.Namespace and returns an exit code
TARGETS = {
    "prepare": "driver.prepare:main",
    "run": "driver.launch:main",
    "client": "driver.client:main",
    "label": "driver.pipeline:label_main",
    "train": "driver.pipeline:train_main",
    "evaluate": "driver.pipeline:evaluate_main",
    "analyze": "driver.analyze:main",
    "optimize": "driver.optimize:main",
    "learn": "driver.learn:main",
}


def _default(klass, name: str):
    """The default of dataclass field ``name`` of ``klass`` (the one source of the CLI's defaults for
    system.toml settings)."""
    f = next(f for f in dataclasses.fields(klass) if f.name == name)
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _add_print_config(s: argparse.ArgumentParser) -> None:
    s.add_argument("--print-config", action="store_true",
                   help="print the effective configuration (TOML, defaults filled in) and exit without running")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mlmm", description="Multiscale ML/MM molecular dynamics driven by i-PI.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in (_add_prepare, _add_run, _add_client, _add_label, _add_train, _add_evaluate, _add_analyze,
                _add_optimize, _add_learn):
        add(sub)
    return p


def _add_prepare(sub) -> None:
    """``mlmm prepare`` (driver/prepare.py)."""
    s = sub.add_parser("prepare", help="fix a PDB, solvate it, select the ML zone, write system.toml")
    s.add_argument("pdb", help="input structure (PDB or PDBx/mmCIF)")
    s.add_argument("--ml", default="", help='ML-zone selection, e.g. "resname MOL", "resid 3 5", "index 0-20", '
                                            '"resname LIG or resid 12"')
    s.add_argument("--ml-charge", type=int, default=None,
                   help="total ML-zone charge (e); default: from the force field / formal charges")
    s.add_argument("--out", required=True, help="output folder (created)")
    s.add_argument("--forcefield", nargs="+", default=_default(StructureSpec, "forcefield"),
                   help="OpenMM force-field XML files (names or paths; default: %(default)s)")
    s.add_argument("--ph", type=float, default=7.0, help="pH for adding hydrogens")
    s.add_argument("--no-fix", action="store_true", help="do not run PDBFixer (missing atoms are then an error)")
    s.add_argument("--no-minimize", action="store_true",
                   help="skip relaxing the MM atoms (solvent clashes) with the ML zone held fixed")
    s.add_argument("--solvate", type=_padding, nargs="?", const="auto", default=None, metavar="PADDING_NM",
                   help="solvate in TIP3P with this padding (nm); without a value (or 'auto') the smallest padding "
                        "the MM cutoff and the embedding of the ML zone need; omit to keep the structure as is")
    s.add_argument("--seed", type=int, default=0, help="seed of every random step (hydrogen placement, "
                   "minimisations' starting points, ion placement); recorded in DIR/prepare.log (default %(default)s)")
    s.add_argument("--ionic-strength", type=float, default=0.0, help="molar salt concentration (NaCl)")
    s.add_argument("--no-neutralize", action="store_true", help="do not add neutralising ions")
    s.add_argument("--nonperiodic", action="store_true", help="cluster/droplet: no box, NoCutoff electrostatics")
    s.add_argument("--mm-cutoff", type=float, default=_default(MMSpec, "cutoff_nm"),
                   help="MM nonbonded cutoff (nm; default %(default)s)")
    s.add_argument("--embedding-cutoff", type=float, default=_default(CouplingSpec, "cutoff_nm"),
                   help="ML–MM embedding cutoff (nm; default %(default)s): the one the model was trained with "
                        "(the ML client refuses another; a small box needs more --solvate padding, not a smaller "
                        "cutoff)")


def _padding(text: str) -> float | str:
    """``--solvate``'s value: a padding in nm, or ``auto``."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a padding in nm nor 'auto'") from None


def _add_run(sub) -> None:
    """``mlmm run`` (driver/launch.py)."""
    s = sub.add_parser("run", help="run i-PI with the XML and one client per <ffsocket>")
    s.add_argument("xml", nargs="?", default=None, help="i-PI input XML (e.g. inputs/templates/nvt_bussi.xml)")
    s.add_argument("--system", default=None, help="system.toml written by `mlmm prepare` (required unless --resume)")
    s.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue the run in RUN_DIR from i-PI's "
                   "RESTART (outputs are appended; with --steps N the run goes on to step N)")
    s.add_argument("--max-restarts", type=int, default=3, help="when a client dies (killed, crashed) or hangs, or "
                   "i-PI is killed, restart i-PI and the clients from the last saved state at most this many times "
                   "(0: stop with an error)")
    s.add_argument("--client-timeout", type=float, default=None, metavar="S", help="watchdog: a client whose "
                   "request stays unanswered longer than max(S, 10 x its slowest recent request) (10 x S before its "
                   "first answer) is hung: killed and restarted (default 60; 0: off; the run's own on --resume). "
                   "Remote ML clients: i-PI stops the run after 10 x S")
    s.add_argument("--checkpoint-stride", type=int, default=None, metavar="N", help="i-PI saves its state every N "
                   "steps (sim.autosave_K, newest 2 kept), the state a run continues from when i-PI itself was killed "
                   "(default 1000; 0: off)")
    s.add_argument("--model", default=None, help="model file for the ML client: ours, or a MACE, AIMNet2 or ANI "
                   "file (the family is detected from the file)")
    _add_model_options(s)
    s.add_argument("--out", default=None, help="run folder (default: runs/run-<timestamp> in the current directory)")
    s.add_argument("--steps", type=int, default=None, help="override <total_steps>")
    s.add_argument("--device", default=None, help="torch device for the ML client (cpu, cuda, cuda:N; default cpu, "
                   "or the resumed run's); a "
                   "comma-separated list (cuda:0,cuda:1) spreads several --ml-clients over devices")
    s.add_argument("--platform", default=None, help="OpenMM platform for the MM client (CPU, CUDA, Reference)")
    s.add_argument("--seed", type=int, default=None, help="override the i-PI <prng><seed>")
    s.add_argument("--beads", type=int, default=None, help="override the number of path-integral beads "
                   "(<initialize nbeads>)")
    s.add_argument("--ml-clients", type=int, default=1, help="start this many ML clients on the 'ml' socket; "
                   "i-PI shares the beads among them; 0 = none here (all remote)")
    s.add_argument("--remote-ml-clients", type=int, default=0, help="ML clients that connect from other nodes "
                   "(`mlmm client ml --address HOST:PORT`); needs an inet 'ml' socket; sizes the batches")
    s.add_argument("--threads", default=None, metavar="ML+MM", help="CPU threads of each local ML client and of "
                   "the MM client, e.g. 1+2 (default: half the cores for the ML clients on the CPU, all of them for "
                   "OpenMM; the clients run at the same time)")
    s.add_argument("--compile", action="store_true", help="torch.compile the network in the ML clients (the first "
                   "step takes about a minute; small ML zones then run 2-3x faster on CPU, where it needs 1 ML "
                   "thread, e.g. --threads 1+1)")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.add_argument("--max-force", type=float, default=None, help="clients stop the run if an atom's force exceeds "
                   "this (kJ/mol/nm; default 1e6): exploding structure; the last good frame goes to last_good.pdb")
    _add_print_config(s)


def _add_model_options(s: argparse.ArgumentParser) -> None:
    """``--model-type`` and ``--dtype`` of the ML client's model (potentials/adapters.py load_adapter),
    ``--allow-embedding-mismatch`` (coupling/ml_engine.py check_embedding) and the uncertainty guard of a
    committee (driver/uncertainty.py)."""
    from potentials.model_formats import MODEL_TYPES

    s.add_argument("--model-type", default=None, choices=MODEL_TYPES, help="model family of --model, instead of "
                   "detecting it from the file")
    s.add_argument("--dtype", default=None, choices=("float32", "float64"), help="precision of the model's "
                   "weights and inputs (default: the file's own; AIMNet2 runs in float32 only)")
    s.add_argument("--allow-embedding-mismatch", action="store_true", help="run a model whose recorded training "
                   "embedding (scheme, cutoff, switch width) differs from the system's [coupling], with a loud "
                   "warning, instead of refusing it (its field inputs are then outside its training)")
    s.add_argument("--max-force-uncertainty", type=float, default=None, metavar="F", help="committee models: stop "
                   "the run (see --uncertainty-action) when the committee's force spread (ml.committee "
                   "force_std_max, kJ/mol/nm) stays above F for --uncertainty-steps consecutive requests")
    s.add_argument("--uncertainty-steps", type=int, default=None, metavar="N", help="consecutive requests over "
                   "--max-force-uncertainty before it acts (default 10)")
    s.add_argument("--uncertainty-action", default=None, choices=("stop", "flag"), help="stop (default: one-line "
                   "error, exit code 2) or flag (one warning line per episode, \"flagged\": true in the extra)")


def _kind_help() -> str:
    """``mm: ...; ml: ...`` from the first line of each registered engine builder's docstring."""
    def first(doc: str | None) -> str:
        line = (doc or "").strip().split("\n")[0].rstrip(".")
        return line[:1].lower() + line[1:]
    return "; ".join(f"{k}: {first(ENGINES.get(k).__doc__)}" for k in ENGINES.names())


def _add_client(sub) -> None:
    """``mlmm client KIND`` (driver/client.py); the kinds are the registered engines (coupling/engines.py)."""
    options = EngineOptions()
    s = sub.add_parser("client", help="run one force client that connects to i-PI")
    s.add_argument("kind", choices=ENGINES.names(), help=_kind_help())
    s.add_argument("--system", required=True, help="system.toml")
    s.add_argument("--address", default=None, help="unix:NAME (socket /tmp/ipi_NAME), unix:/path/to/socket, or "
                   "HOST:PORT for inet (required unless --print-config)")
    s.add_argument("--model", default=options.model, help="model file (ML client): ours, or a MACE, AIMNet2 or ANI "
                   "file (the family is detected from the file)")
    _add_model_options(s)
    s.add_argument("--device", default=options.device, help="torch device (ML client; default %(default)s)")
    s.add_argument("--platform", default=options.platform,
                   help="OpenMM platform (MM client): CPU, CUDA, OpenCL, Reference")
    s.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the server to appear")
    s.add_argument("--threads", type=int, default=options.threads, help="CPU threads: torch (ML client) or "
                   "OpenMM's CPU platform (MM client); default: the libraries' own (all cores)")
    s.add_argument("--compile", action="store_true", default=options.compile, help="ML client: torch.compile the "
                   "network (slow first step, then 2-3x faster for small ML zones; on CPU only with --threads 1 in "
                   "torch 2.13, else it runs uncompiled)")
    s.add_argument("--virial", choices=["full", "isotropic", "none"], default=options.virial,
                   help="MM client, periodic system: the virial i-PI needs for pressure and NPT, by finite "
                        "differences of the box-dependent energy: the tensor (full, ~14x a force call on CPU), its "
                        "trace (isotropic, ~3x) or none (NVT/NVE: zeros). `mlmm run` chooses from the input; "
                        "default %(default)s")
    s.add_argument("--max-force", type=float, default=None, help="stop with an error (naming atoms and cause) if an "
                   "atom's force exceeds this (kJ/mol/nm; default 1e6, driver.client.MAX_FORCE_KJMOL_NM): a "
                   "blown-up structure")
    _add_print_config(s)


def _add_label(sub) -> None:
    """``mlmm label`` (driver/pipeline.py -> potentials/qmmm_reference.py)."""
    s = sub.add_parser("label", help="generate QM/MM reference data (PySCF B3LYP/def2-SVP, TIP3P embedding)")
    s.add_argument("--out", required=True, help="dataset file (NetCDF4), appended to if it exists (resumable)")
    s.add_argument("--config", default=None, help="TOML with solutes, frame counts, temperatures, seeds")
    s.add_argument("--frames", type=int, default=None, help="stop after this many new frames")
    s.add_argument("--shard", default=None, metavar="K/N", help="label only shard K of N of the planned frames "
                   "(split by a hash of the frame id): run N jobs, one per core or node, with the same --out and "
                   "config")
    s.add_argument("--solutes", default=None, metavar="A,B", help="label only these of the config's solutes (same "
                   "frame ids, splits and shards as the full plan; a later run without it fills in the rest)")
    s.add_argument("--qm-device", choices=("auto", "cpu", "gpu"), default=None,
                   help="QM on the CPU (PySCF) or a CUDA GPU (gpu4pyscf); default: the config's qm_device (auto: "
                        "the GPU when gpu4pyscf and a device are there)")
    s.add_argument("--export-jobs", default=None, metavar="JOBS.npz", help="sample the MD and write the QM inputs of "
                   "the frames --out lacks to JOBS.npz instead of labelling; label them elsewhere (a GPU node "
                   "needs only PySCF/gpu4pyscf) with `python -m potentials.qm_jobs JOBS.npz RESULTS.npz --qm-device "
                   "gpu --workers 8`")
    s.add_argument("--import-labels", default=None, metavar="RESULTS.npz", help="append the frames labelled by "
                   "`python -m potentials.qm_jobs` to --out (no sampling, no QM)")
    _add_print_config(s)


def _add_train(sub) -> None:
    """``mlmm train`` (driver/pipeline.py -> potentials/train.py)."""
    s = sub.add_parser("train", help="train the embedding-aware network from a TOML config")
    s.add_argument("config", help="training config (TOML)")
    s.add_argument("--device", default="cpu")
    s.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    s.add_argument("--committee", type=int, default=None, metavar="K", help="train K models (seeds seed..seed+K-1, "
                   "train/val re-split by trajectory) and write them as one committee file at [output] model, each "
                   "also as <stem>.member<k>.pt; with --resume finished members are kept")
    _add_print_config(s)


def _add_evaluate(sub) -> None:
    """``mlmm evaluate`` (driver/pipeline.py -> potentials/evaluate.py)."""
    from potentials.model_formats import MODEL_TYPES

    s = sub.add_parser("evaluate", help="print held-out errors of a model on a dataset")
    s.add_argument("model", help="model file: ours, or a MACE, AIMNet2 or ANI file")
    s.add_argument("dataset")
    s.add_argument("--split", default="test")
    s.add_argument("--device", default="cpu")
    s.add_argument("--model-type", default=None, choices=MODEL_TYPES, help="model family, instead of detecting it")


def _add_analyze(sub) -> None:
    """``mlmm analyze`` (driver/analyze.py)."""
    s = sub.add_parser("analyze", help="plots (PNG) and a text summary of a run folder written by `mlmm run`")
    s.add_argument("run_dir", help="run folder (input.xml, sim.out, sim.pos_0.nc, ...)")
    s.add_argument("--system", default=None,
                   help="system.toml of the run (default: the one in RUN_DIR/run.json): water and ML atoms for the RDF")
    s.add_argument("--out", default=None, help="folder for the PNGs and summary.txt (default: RUN_DIR/analysis)")
    s.add_argument("--skip", type=float, default=0.0, metavar="PS",
                   help="equilibration time left out of averages and drift (ps)")


def _add_optimize(sub) -> None:
    """``mlmm optimize`` (driver/optimize.py)."""
    s = sub.add_parser("optimize", help="relax a prepared structure on the ML/MM potential (ASE), write a new "
                                        "structure + system.toml")
    s.add_argument("system", help="system.toml written by `mlmm prepare`")
    s.add_argument("--model", default=None, help="network model file (required if the system has an ML zone)")
    s.add_argument("--out", default=None, help="output folder (default: the system file's folder)")
    s.add_argument("--name", default="optimized", help="stem of the written files: NAME.pdb, NAME.toml, NAME.log")
    s.add_argument("--free", choices=["shell", "ml", "all"], default="shell",
                   help="atoms that move: the ML zone and MM residues within --shell of it (default), the ML "
                        "zone only, or all atoms")
    s.add_argument("--shell", type=float, default=0.6, metavar="NM", help="shell radius for --free shell (nm)")
    s.add_argument("--fmax", type=float, default=0.05, help="convergence: largest force on a free atom (eV/Å)")
    s.add_argument("--steps", type=int, default=500, help="maximum optimiser steps")
    s.add_argument("--optimizer", choices=["LBFGS", "BFGS", "FIRE"], default="LBFGS", help="ASE optimiser")
    s.add_argument("--device", default="cpu", help="torch device for the network")
    s.add_argument("--platform", default=None, help="OpenMM platform (CPU, CUDA, Reference)")
    s.add_argument("--allow-embedding-mismatch", action="store_true",
                   help="relax with a model whose recorded training embedding (cutoff, switch width) differs from "
                        "the system's: a loud warning instead of the refusal")


def _add_learn(sub) -> None:
    """``mlmm learn`` (driver/learn.py)."""
    s = sub.add_parser("learn", help="active learning: from a prepared system.toml to a trained committee DIR/model.pt "
                                     "(MM seed sampling, QM/MM labels, committee training, ML/MM exploration)")
    s.add_argument("system", help="system.toml written by `mlmm prepare` (any ML zone of whole molecules)")
    s.add_argument("--out", required=True, help="output folder; run the same command again to continue a stopped run")
    s.add_argument("--config", default=None, help="TOML with [seed] [explore] [level] [train] [targets] [budget] "
                   "(every key optional; see --print-config)")
    s.add_argument("--max-frames", type=int, default=None, metavar="N", help="label at most N frames in all "
                   "(overrides [budget] max_frames)")
    s.add_argument("--validate", type=int, default=None, metavar="N", help="after the loop, label N QM/MM clusters "
                   "sampled independently of it (fresh MM chain + ML/MM MD with the final committee) and report the "
                   "final committee's errors on them (overrides [validate] frames; default 40, 0: none)")
    s.add_argument("--seed-only", action="store_true", help="only sample and label round 0 (the MM seed) into "
                   "DIR/data.nc and stop: a dataset for `mlmm train`, e.g. capped fragments for a general model (a "
                   "DIR/data.nc that already holds [budget] max_frames is not sampled again)")
    s.add_argument("--export-jobs", default=None, metavar="JOBS.npz", help="with --seed-only: sample round 0 and "
                   "write the QM inputs of its frames to JOBS.npz instead of labelling them (label elsewhere with "
                   "`python -m potentials.qm_jobs`, import with `mlmm label --out DIR/data.nc --import-labels`)")
    s.add_argument("--seed-model", default=None, metavar="MODEL", help="seed round 0 by ML/MM MD with this model "
                   "(ours, a committee, MACE, AIMNet2 or ANI) instead of MM (overrides [seed] model)")
    _add_print_config(s)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s: %(message)s", datefmt="%H:%M:%S")
    module, func = TARGETS[args.command].split(":")
    try:
        return int(getattr(importlib.import_module(module), func)(args) or 0)
    except MLMMError as exc:
        print(f"mlmm: error: {exc}", file=sys.stderr)
        return 2
    except FileNotFoundError as exc:
        print(f"mlmm: error: file not found: {exc.filename or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mlmm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""`mlmm run`: start i-PI and one force client per `<ffsocket>`, show progress, stop everything cleanly and
convert the outputs.

The run folder (i-PI's working directory) ends up with::

    input.xml        the patched i-PI input          init.extxyz   starting structure (Å, masses)
    run.json         absolute paths of the XML, system.toml and model the run was started with
    ipi.log          i-PI's output                   client_mm.log, client_ml.log
    sim.out          i-PI's properties table (units in its header; the templates use kJ/mol, ps, K)
    properties.csv   the same table with plain column names (conserved_kjmol, pot_mm_kjmol, ...)
    sim.pos_0.xyz    i-PI's positions                sim.pos_0.nc  the same as AMBER NetCDF
    RESTART          i-PI's restart file, written on every exit (the state a resumed run starts from)
    resume.xml       the RESTART a resumed or automatically restarted run was started from (with new sockets)
    last_good.pdb    after an exploding structure: the last accepted state (RESTART's step)

Supervision: every child runs in its own process group; the loop watches all of them. A client that dies
makes i-PI hang forever with consolidated messages (ipi.md §2.7), so the supervisor then stops i-PI itself:
SIGTERM (i-PI writes RESTART), SIGKILL after a grace period. Ctrl-C/SIGTERM do the same; a second Ctrl-C
kills at once. Unix sockets live in a fresh 0700 directory per i-PI process, removed when it ends.

Recovery: after a client death that is not the client's own one-line error (exit code 2), the run continues
from RESTART with a new i-PI and new clients (``max_restarts`` times at most). i-PI appends to its outputs from
the RESTART's step, which lags the last written step by up to ``safe_stride``; `trim_outputs` first cuts the
properties, trajectories and extras back to that step, so each step appears once. `resume_simulation`
(``mlmm run --resume``) does the same for a stopped run. NetCDF files are rewritten from the i-PI trajectories
after every run. A client that refuses a blown-up structure (driver.client.ForceGuard) stops the run; the RESTART
state is then saved as ``last_good.pdb``.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import ase.io
import numpy as np

from . import trajectory, xmlinput
from .errors import CalculationFailed, SetupError
from .system import SystemSpec
from .units import ANGSTROM_PER_NM, NM_PER_BOHR

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SOCKET_WAIT_S = 120.0       # i-PI must open its unix sockets within this (it reads the structure first)
POLL_S = 0.2                # supervisor loop period
IPI_GRACE_S = 20.0          # SIGTERM -> SIGKILL for i-PI (its soft exit checks every 1 s, then writes RESTART)
CLIENT_GRACE_S = 10.0       # after i-PI is gone, clients get this long to exit on their own
EARLY_EXIT_GRACE_S = 30.0   # a client that exits cleanly while i-PI runs: i-PI must finish within this
MAX_UNIX_PATH = 107         # sun_path is 108 bytes including the terminating NUL
CLUSTER_BOX_MIN_A = 100.0   # edge (Å) of the dummy box i-PI needs for non-periodic systems (ipi.md §1.4)

ClientArgv = Callable[[str, str], list[str]]   # (forcefield name, client address) -> command line


@dataclass
class RunResult:
    """What `run_simulation` did. ``steps_done`` counts MD steps (i-PI's ``step``); times in s."""

    folder: Path
    steps_done: int
    total_steps: int
    wall_s: float
    timestep_ps: float | None = None
    trajectories: list[Path] = field(default_factory=list)
    properties_csv: Path | None = None

    @property
    def ns_per_day(self) -> float | None:
        """Throughput over the whole run, start-up included."""
        if not self.timestep_ps or self.wall_s <= 0:
            return None
        return self.steps_done * self.timestep_ps * 1e-3 / (self.wall_s / 86400.0)


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped the run; everything was shut down and i-PI wrote RESTART."""

    def __init__(self, message: str, signum: int = signal.SIGINT):
        super().__init__(message)
        self.signum = int(signum)


# ------------------------------------------------------------------------------------------------- CLI
def main(args) -> int:
    """``mlmm run XML --system S [--model M] [--steps N] [--out DIR] [--seed K] [--no-progress]`` or
    ``mlmm run --resume RUN_DIR [--steps N]``."""
    resume = getattr(args, "resume", None)
    max_restarts = getattr(args, "max_restarts", 3)
    if max_restarts < 0:
        raise SetupError(f"--max-restarts {max_restarts}: must be >= 0")
    try:
        if resume:
            given = [f for f, v in (("XML", args.xml), ("--system", args.system), ("--model", args.model),
                                    ("--out", args.out), ("--seed", args.seed), ("--beads", args.beads))
                     if v is not None]
            if given:
                raise SetupError(f"--resume {resume}: {', '.join(given)} cannot change a run being continued "
                                 "(they come from its RESTART and run.json); give only --steps and devices")
            result = resume_simulation(resume, steps=args.steps, device=args.device, platform=args.platform,
                                       progress=not args.no_progress, verbose=getattr(args, "verbose", False),
                                       max_restarts=max_restarts, max_force=args.max_force,
                                       threads=getattr(args, "threads", None),
                                       compile=getattr(args, "compile", False) or None)
        else:
            if args.xml is None or args.system is None:
                raise SetupError("mlmm run needs an i-PI XML and --system TOML (or --resume RUN_DIR)")
            result = run_simulation(args.xml, args.system, out=args.out, model=args.model, steps=args.steps,
                                    seed=args.seed, device=args.device or "cpu", platform=args.platform,
                                    progress=not args.no_progress, verbose=getattr(args, "verbose", False),
                                    beads=getattr(args, "beads", None), ml_clients=getattr(args, "ml_clients", 1),
                                    remote_ml_clients=getattr(args, "remote_ml_clients", 0),
                                    max_restarts=max_restarts, max_force=args.max_force,
                                    threads=getattr(args, "threads", None), compile=getattr(args, "compile", False))
    except RunInterrupted as exc:
        print(f"mlmm: interrupted: {exc}", file=sys.stderr)
        return 128 + exc.signum          # 130 for Ctrl-C, 143 for SIGTERM (shell convention)
    rate = result.ns_per_day
    log.info("done: %d steps in %.1f s%s; outputs in %s", result.steps_done, result.wall_s,
             f" ({rate:.3g} ns/day)" if rate else "", result.folder)
    return 0


# ------------------------------------------------------------------------------------------------- API
def run_simulation(xml: str | Path, system: str | Path, *, out: str | Path | None = None,
                   model: str | Path | None = None, steps: int | None = None, seed: int | None = None,
                   device: str = "cpu", platform: str | None = None, progress: bool = True,
                   verbose: bool = False, client_argv: ClientArgv | None = None, beads: int | None = None,
                   ml_clients: int = 1, remote_ml_clients: int = 0, max_restarts: int = 3,
                   max_force: float | None = None, threads: str | None = None, compile: bool = False) -> RunResult:
    """Run i-PI with the input ``xml`` on ``system`` and one client per `<ffsocket>`; block until done.

    Parameters
    ----------
    xml : i-PI input (e.g. ``inputs/templates/nvt_bussi.xml``); run-specific parts are filled in.
    system : ``system.toml`` written by ``mlmm prepare``.
    out : run folder (created; must be new or empty). Default: ``runs/run-<timestamp>`` in the current directory.
    model : network file for the ``ml`` client (required if the XML has an ``ml`` socket).
    steps, seed : override ``<total_steps>`` and ``<prng><seed>``.
    threads : ``"ML+MM"``, CPU threads of each local ML client and of the MM client (see :func:`client_threads`).
    compile : torch.compile the network in the ML clients.
    device, platform : passed to the ML (torch device) and MM (OpenMM platform) clients. ``device`` may list
        several devices, comma-separated (``cuda:0,cuda:1``): ML client k gets device k modulo their number.
    progress : show a tqdm bar (steps, temperature, ns/day).
    client_argv : replaces the client command lines ``mlmm client NAME ...``; gets the forcefield name and
        the address (``unix:/path`` or ``HOST:PORT``). For running i-PI's own drivers in tests.
    beads : override the ring-polymer size ``<initialize nbeads>`` (path integrals; contracted forces that ask for
        more beads are lowered to it).
    ml_clients : number of ML clients started on the ``ml`` socket (i-PI shares the beads among them,
        ipi.md §2.4). Batched sockets (``<batch_size>`` > 1) get ``batch_size`` = the beads their forcefield
        sees divided among its clients (`xmlinput.fit_batches`). 0: no local ML client (all remote).
    max_force : kJ/mol/nm; a client stops the run when an atom's force exceeds it (exploding structure; default
        `driver.client.MAX_FORCE_KJMOL_NM`); the state of the last RESTART is then saved as ``last_good.pdb``.
    max_restarts : when a client dies (killed, or crashed other than with its own one-line error), stop i-PI
        (it writes RESTART) and continue from RESTART with fresh clients, at most this many times.
    remote_ml_clients : ML clients that will connect from other nodes (``mlmm client ml --address HOST:PORT``,
        not started here; the ``ml`` socket must be ``mode='inet'``). Only used to size the batches; i-PI waits
        for them. A remote client that dies is not noticed by the supervisor (i-PI waits; see README).

    Raises
    ------
    SetupError : bad input, before anything is started.
    CalculationFailed : a client or i-PI died, or i-PI stopped before ``total_steps``.
    RunInterrupted : Ctrl-C / SIGTERM; all processes were stopped, i-PI wrote RESTART.
    """
    where = str(xml)
    tree = xmlinput.load(xml)
    root = tree.getroot()
    socks = xmlinput.sockets(root, where)
    components = xmlinput.force_components(root, where)
    spec = SystemSpec.load(system)
    if not spec.structure_path.is_file():
        raise SetupError(f"{system}: structure file {spec.structure_path} not found; re-run `mlmm prepare`")
    if client_argv is None and ml_clients > 0 and any(s.name == "ml" for s in socks):
        if not model:
            raise SetupError(f"{where} has an <ffsocket name='ml'>: pass the network with --model FILE "
                             "(or use a pure-MM template such as inputs/templates/nvt_bussi_mm.xml)")
        if not Path(model).is_file():
            raise SetupError(f"model file {model} not found; train one with `mlmm train CONFIG`")
    if steps is not None and steps < 1:
        raise SetupError(f"--steps {steps}: must be a positive number of MD steps")
    if max_force is not None and not max_force > 0:
        raise SetupError(f"--max-force {max_force}: must be a positive force in kJ/mol/nm")
    ml_sock = next((s for s in socks if s.name == "ml"), None)
    if ml_clients < 0 or remote_ml_clients < 0:
        raise SetupError(f"--ml-clients {ml_clients} / --remote-ml-clients {remote_ml_clients}: must be >= 0")
    if (ml_clients != 1 or remote_ml_clients) and ml_sock is None:
        raise SetupError(f"--ml-clients/--remote-ml-clients: {where} has no <ffsocket name='ml'>")
    if ml_sock is not None and ml_clients + remote_ml_clients < 1:
        raise SetupError(f"--ml-clients 0 and no --remote-ml-clients: nobody would serve the 'ml' forcefield of "
                         f"{where}; pass --remote-ml-clients N for clients started on other nodes")
    if remote_ml_clients and ml_sock.mode != "inet":
        raise SetupError(f"--remote-ml-clients {remote_ml_clients}: the 'ml' <ffsocket> of {where} is "
                         f"mode='{ml_sock.mode}'; clients on other nodes need mode='inet' with this node's "
                         "<address> and a <port>")
    if beads is not None:
        xmlinput.set_beads(root, beads, where)
    n_clients = {s.name: (ml_clients if s.name == "ml" else 1) for s in socks}         # started here
    sharing = {**n_clients, "ml": ml_clients + remote_ml_clients}
    batches = xmlinput.fit_batches(root, sharing)
    seen = xmlinput.beads_per_forcefield(root, where)
    for name, n in sharing.items():
        if n > 1 and seen.get(name, 0) % n:
            log.warning("%d clients on '%s' which sees %d beads per step: the clients get unequal shares "
                        "(choose a number of clients that divides the beads)", n, name, seen.get(name, 0))
    if batches:
        log.info("batched sockets: %s (structures per request)", batches)
    total = steps if steps is not None else (xmlinput.total_steps(root) or 1000)   # 1000: i-PI's default
    folder = _run_folder(out, spec)
    start = initial_structure(spec)         # builds the OpenMM system: force-field problems show up here
    if client_argv is None and ml_clients > 0 and ml_sock is not None:
        _check_model(model, spec, start)
    _check_socket_paths(socks)
    _check_ports(socks)
    _ipi_argv("input.xml")                  # i-PI must be installed
    folder.mkdir(parents=True, exist_ok=True)
    ase.io.write(str(folder / "init.extxyz"), start, format="extxyz")
    xmlinput.patch(root, init_file="init.extxyz", sockets_prefix=None, steps=steps, seed=seed)
    # what the run was made from, so `mlmm analyze RUN_DIR` / `mlmm run --resume RUN_DIR` (and a person) can
    # find the system, the model and the clients
    (folder / "run.json").write_text(json.dumps({
        "xml": str(Path(xml).resolve()), "system": str(Path(system).resolve()),
        "model": str(Path(model).resolve()) if model else None, "steps": steps, "seed": seed,
        "device": device, "platform": platform, "ml_clients": ml_clients,
        "remote_ml_clients": remote_ml_clients, "max_force": max_force, "threads": threads,
        "compile": compile}, indent=1) + "\n")
    argv = client_argv or _client_argv_factory(Path(system).resolve(), model, device, platform, verbose, max_force,
                                               client_threads(threads, device, ml_clients), compile)
    run = _Run(folder, socks, n_clients, argv, total, progress, bool(start.pbc.all()), components, spec)
    return run.drive(tree, "input.xml", max_restarts=_no_restarts_with_remote(max_restarts, remote_ml_clients),
                     append=False)


def _no_restarts_with_remote(max_restarts: int, remote: int) -> int:
    """A restarted i-PI would wait forever for remote clients nobody restarts: no automatic restarts then."""
    if remote and max_restarts:
        log.info("remote ML clients: no automatic restart after a client death (resume by hand with --resume and "
                 "restart the remote clients)")
        return 0
    return max_restarts


def resume_simulation(run_dir: str | Path, *, steps: int | None = None, device: str | None = None,
                      platform: str | None = None, progress: bool = True, verbose: bool = False,
                      client_argv: ClientArgv | None = None, max_restarts: int = 3,
                      max_force: float | None = None, threads: str | None = None,
                      compile: bool | None = None) -> RunResult:
    """Continue the run in ``run_dir`` from i-PI's ``RESTART`` (``mlmm run --resume RUN_DIR``).

    The outputs i-PI appends to are first cut back to the RESTART's step (it may lag the last written step by
    up to ``safe_stride``), so every step's properties and frames appear once; the NetCDF files are rewritten
    from the continued i-PI trajectories. The thermostat's random state comes from RESTART: a seeded run
    continued this way matches the uninterrupted one to i-PI's printed precision.

    Parameters
    ----------
    run_dir : a run folder written by `run_simulation` (``run.json``, ``RESTART``).
    steps : new ``total_steps`` (must exceed the RESTART's step); default: the run's own total.
    device, platform, max_force, threads, compile : as in `run_simulation`; default: what the run was started
        with (``run.json``).
    Other parameters as in `run_simulation`.
    """
    folder = Path(run_dir).resolve()
    try:
        info = json.loads((folder / "run.json").read_text())
    except (OSError, ValueError) as exc:
        raise SetupError(f"{folder}: no readable run.json ({exc}); --resume needs a folder written by mlmm run") \
            from None
    step = xmlinput.restart_step(folder / "RESTART")
    if step is None:
        raise SetupError(f"{folder}: no readable RESTART (i-PI was killed before writing one); start a new run")
    root = xmlinput.load(folder / "RESTART").getroot()
    where = str(folder / "RESTART")
    socks = xmlinput.sockets(root, where)
    components = xmlinput.force_components(root, where)
    total = steps if steps is not None else (xmlinput.total_steps(root) or 1000)
    if total <= step:
        raise SetupError(f"{folder}: the run already reached step {step} of {total}; pass --steps N with N > "
                         f"{step} to continue it")
    system, model = info.get("system"), info.get("model")
    spec = SystemSpec.load(system)
    ml_clients = int(info.get("ml_clients", 1))
    if client_argv is None and ml_clients > 0 and any(s.name == "ml" for s in socks) and \
            not (model and Path(model).is_file()):
        raise SetupError(f"{folder}: the model the run was started with ({model}) is gone; restore it to resume")
    n_clients = {s.name: (ml_clients if s.name == "ml" else 1) for s in socks}
    _check_socket_paths(socks)
    _check_ports(socks)
    device = device or info.get("device") or "cpu"
    argv = client_argv or _client_argv_factory(
        Path(system), model, device, platform or info.get("platform"), verbose, max_force or info.get("max_force"),
        client_threads(threads or info.get("threads"), device, ml_clients),
        bool(info.get("compile")) if compile is None else compile)
    run = _Run(folder, socks, n_clients, argv, total, progress, bool(spec.structure.periodic), components, spec)
    return run.drive(run.resume_input(), "resume.xml", append=True,
                     max_restarts=_no_restarts_with_remote(max_restarts, int(info.get("remote_ml_clients") or 0)))


def _check_model(model: str | Path, spec: SystemSpec, start: ase.Atoms) -> None:
    """The ML client would refuse a model file of another format version or one that does not know an element
    (or the charge) of the ML zone; find out before anything is started, so the error is one line and no run
    folder is written. Weights-only loading (no pickled code)."""
    from coupling.ml_engine import check_model
    from potentials.model_io import load_model

    numbers = start.numbers[np.asarray(spec.ml.indices, dtype=int)]
    check_model(load_model(model, "cpu"), numbers, spec.ml.charge, where=f"model file {model}")


def _check_ports(socks: list[xmlinput.SocketSpec]) -> None:
    """An inet <ffsocket> whose host:port is already taken: i-PI would die with a traceback after the run folder
    was written. Probe by binding (and releasing) the same address i-PI will bind."""
    import socket

    for s in socks:
        if s.mode != "inet":
            continue
        try:
            infos = socket.getaddrinfo(s.address, s.port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise SetupError(f"<ffsocket name='{s.name}'>: cannot resolve <address>{s.address}</address> ({exc}); "
                             "give this node's host name or IP") from None
        family, _, _, _, addr = infos[0]
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)     # as i-PI does: TIME_WAIT is no conflict
            try:
                probe.bind(addr)
            except OSError as exc:
                raise SetupError(f"<ffsocket name='{s.name}'>: {s.address}:{s.port} is not free ({exc.strerror}); "
                                 "another i-PI or program uses it: choose another <port>, or use mode='unix'") \
                    from None


def _check_socket_paths(socks: list[xmlinput.SocketSpec]) -> None:
    """Unix socket paths must fit in sun_path; the private folder of every attempt has the same length."""
    probe = tempfile.mkdtemp(prefix="mlmm-", dir=_short_tmpdir())
    os.rmdir(probe)
    for s in socks:
        path = f"{probe}/{s.name}"
        if s.mode == "unix" and len(os.fsencode(path)) > MAX_UNIX_PATH:
            raise SetupError(f"unix socket path {path} is longer than {MAX_UNIX_PATH} bytes; set TMPDIR to a "
                             "short folder")


def _recoverable(child: "_Child") -> bool:
    """A client death worth an automatic restart: killed by a signal (OOM killer, kill -9, node trouble) or an
    unexpected crash. Exit code 2 is a client's own one-line error (bad input, exploding structure): restarting
    would only repeat it."""
    rc = child.rc
    return rc is not None and rc != 0 and rc != 2


@dataclass
class _Run:
    """One run folder, driven through one or more i-PI processes (the first start, automatic restarts)."""

    folder: Path
    socks: list[xmlinput.SocketSpec]
    n_clients: dict[str, int]
    argv: ClientArgv
    total: int
    progress: bool
    periodic: bool
    components: list[str]
    spec: SystemSpec

    def resume_input(self) -> ET.ElementTree:
        """i-PI's RESTART with ``total_steps`` set, after cutting the outputs back to its step."""
        step = xmlinput.restart_step(self.folder / "RESTART")
        tree = xmlinput.load(self.folder / "RESTART")
        trim_outputs(self.folder, tree.getroot(), step)
        xmlinput.patch(tree.getroot(), init_file=None, sockets_prefix=None, steps=self.total)
        return tree

    def drive(self, tree: ET.ElementTree, input_name: str, *, max_restarts: int, append: bool) -> RunResult:
        """Run i-PI on ``tree`` (written as ``input_name``); after a recoverable client death, restart from
        RESTART up to ``max_restarts`` times. Then convert the outputs and report."""
        wall, restarts = 0.0, 0
        while True:
            outcome, sup, dt = self._attempt(tree, input_name, append)
            wall += dt
            if outcome is None or sup.interrupted or sup.crashed is None:
                break
            step = xmlinput.restart_step(self.folder / "RESTART")
            if restarts >= max_restarts or not _recoverable(sup.crashed) or step is None or step >= self.total:
                break
            restarts += 1
            log.warning("%s; restarting i-PI and the clients from RESTART at step %d (automatic restart %d of %d)",
                        outcome, step, restarts, max_restarts)
            tree, input_name, append = self.resume_input(), "resume.xml", True
        if outcome is not None and restarts:
            outcome += f" (after {restarts} automatic restart(s))"
        if outcome is not None:
            saved = save_last_good(self.folder, self.spec)
            if saved is not None:
                outcome += f"; last good frame (step {saved[1]}, from RESTART): {saved[0]}"

        root = tree.getroot()
        folder = self.folder
        done = xmlinput.restart_step(folder / "RESTART")
        result = RunResult(folder, done if done is not None else sup.last_step, self.total, wall,
                           xmlinput.timestep_ps(root))
        props = xmlinput.properties_file(root)
        try:
            result.trajectories = _convert_trajectories(folder, root, self.periodic)
            if props and (folder / props).is_file():
                result.properties_csv = folder / "properties.csv"
                trajectory.write_properties_csv(folder / props, result.properties_csv, self.components)
        except (OSError, ValueError, RuntimeError) as exc:
            if outcome is None and not sup.interrupted:
                raise CalculationFailed(f"the run finished but converting its outputs in {folder} failed: {exc}") \
                    from exc
            log.warning("converting the outputs of the stopped run failed: %s", exc)

        if sup.interrupted:
            raise RunInterrupted(f"stopped at step {result.steps_done} of {self.total}; i-PI saved its state in "
                                 f"{folder / 'RESTART'} (continue with mlmm run --resume {folder})", sup.interrupted)
        if outcome is not None:
            raise CalculationFailed(outcome)
        if done is None or done < self.total:
            raise CalculationFailed(f"i-PI stopped ({sup.ipi.describe_exit()}) at step {result.steps_done} of "
                                    f"{self.total}: {_last_lines(sup.ipi.log)}; see {sup.ipi.log}")
        return result

    def _attempt(self, tree: ET.ElementTree, input_name: str, append: bool) -> tuple[str | None, "_Supervisor",
                                                                                      float]:
        """One i-PI process and its clients, with a fresh private socket folder."""
        root = tree.getroot()
        sockdir = Path(tempfile.mkdtemp(prefix="mlmm-", dir=_short_tmpdir()))     # mode 0700
        try:
            prefix = f"{sockdir}/"
            xmlinput.patch(root, init_file=None, sockets_prefix=prefix)
            xmlinput.write(tree, self.folder / input_name)

            def address(s: xmlinput.SocketSpec) -> str:
                return f"unix:{prefix}{s.name}" if s.mode == "unix" else f"{s.address}:{s.port}"

            clients = {(s.name if k == 0 else f"{s.name}-{k + 1}"): self.argv(s.name, address(s))
                       for s in self.socks for k in range(self.n_clients[s.name])}
            endpoints = [Path(prefix + s.name) if s.mode == "unix" else s.port for s in self.socks]
            props = xmlinput.properties_file(root)
            sup = _Supervisor(self.folder, _ipi_argv(input_name), clients, endpoints,
                              self.folder / props if props else None, self.total, self.progress, append=append)
            t0 = time.monotonic()
            outcome = sup.run()
            return outcome, sup, time.monotonic() - t0
        finally:
            shutil.rmtree(sockdir, ignore_errors=True)


def save_last_good(folder: Path, spec: SystemSpec) -> tuple[Path, int] | None:
    """Write the state of i-PI's RESTART (the last step whose forces were all accepted; the centroid for a ring
    polymer) as ``last_good.pdb`` in ``folder`` with the system's topology. Returns (path, step), or None if
    there is no usable RESTART (nothing is written then)."""
    from openmm import app, unit

    try:
        root = ET.parse(folder / "RESTART").getroot()
        beads = root.find("system/beads")
        q = np.array([float(v) for v in re.split(r"[\s,\[\]]+", beads.findtext("q", "")) if v])
        q = q.reshape(int(beads.get("nbeads")), int(beads.get("natoms")), 3).mean(axis=0) * NM_PER_BOHR
        top = app.PDBFile(str(spec.structure_path)).topology
        step = xmlinput.restart_step(folder / "RESTART")
    except (OSError, ET.ParseError, AttributeError, TypeError, ValueError) as exc:
        log.warning("could not save the last good frame from %s: %s", folder / "RESTART", exc)
        return None
    if len(q) != top.getNumAtoms() or not np.isfinite(q).all():
        return None
    out = folder / "last_good.pdb"
    with open(out, "w") as fh:
        app.PDBFile.writeFile(top, q * unit.nanometer, fh)
    return out, step if step is not None else 0          # i-PI writes no <step> before the first one


def trim_outputs(folder: Path, root: ET.Element, step: int) -> None:
    """Cut i-PI's text outputs in ``folder`` (properties, trajectories, extras; as listed in ``root``'s
    ``<output>``) back to ``step``, the step of the RESTART a run is resumed from: i-PI appends to them."""
    prefix = xmlinput.output_prefix(root)
    for el in root.findall("output/properties"):
        f = folder / f"{prefix}.{el.get('filename', xmlinput.DEFAULT_PROPERTIES)}"
        if f.is_file():
            trajectory.trim_properties(f, step)
    for el in root.findall("output/trajectory"):
        name = re.escape(f"{prefix}.{el.get('filename', xmlinput.DEFAULT_TRAJECTORY)}")
        pattern = re.compile(rf"{name}(_\d+)?(\.[A-Za-z]+)?")
        for f in sorted(folder.iterdir()):
            if pattern.fullmatch(f.name) and f.suffix != ".nc" and f.is_file():
                trajectory.trim_trajectory(f, step)


# ------------------------------------------------------------------------------------------- set-up helpers
def _run_folder(out: str | Path | None, spec: SystemSpec) -> Path:
    """The run folder to create: ``out`` (must be new or empty) or a fresh ``runs/run-<timestamp>`` in the current
    directory (never inside the system's folder, which may be a read-only or version-controlled input)."""
    if out is None:
        base = Path("runs") / time.strftime("run-%Y%m%d-%H%M%S")
        folder, k = base, 1
        while folder.exists():
            folder, k = base.with_name(f"{base.name}-{k}"), k + 1
    else:
        folder = Path(out)
        if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
            raise SetupError(f"run folder {folder} exists and is not empty; choose a new --out (i-PI would mix "
                             "its outputs with the old ones)")
    return folder.resolve()


def _short_tmpdir() -> str:
    """A temp folder short enough for AF_UNIX paths (TMPDIR on clusters can be very long)."""
    tmp = tempfile.gettempdir()
    return tmp if len(tmp) < 60 else "/tmp"


def initial_structure(spec: SystemSpec):
    """The system's starting structure for i-PI as an ``ase.Atoms`` (written as extended XYZ, which i-PI
    reads with ``<file mode='ase'>``); ``atoms.pbc`` tells whether the system is periodic.

    Positions and cell in Å, masses in dalton, all taken from the OpenMM system the MM client builds
    (`potentials.openmm_system.load_system`), so i-PI integrates with exactly the MM force field's masses
    (including hydrogen mass repartitioning). Non-periodic systems get a large dummy cubic box: i-PI needs a
    cell, the sockets use ``pbc='false'`` and the clients ignore it.
    """
    import ase
    from openmm import unit

    from potentials.openmm_system import load_system

    topology, system, pos_nm = load_system(spec)
    atoms = list(topology.atoms())
    for a in atoms:
        if a.element is None or system.isVirtualSite(a.index):
            raise SetupError(f"{spec.structure_path}: atom {a.index + 1} ({a.name}, residue {a.residue.name} "
                             f"{a.residue.id}) is a virtual site; i-PI cannot integrate extra points")
    pos = np.asarray(pos_nm, dtype=float) * ANGSTROM_PER_NM
    masses = np.array([system.getParticleMass(i).value_in_unit(unit.dalton) for i in range(len(atoms))])
    if spec.structure.periodic:
        box = np.asarray(topology.getPeriodicBoxVectors().value_in_unit(unit.nanometer)) * ANGSTROM_PER_NM
    else:
        span = float(np.ptp(pos, axis=0).max()) if len(pos) else 0.0
        box = np.eye(3) * max(CLUSTER_BOX_MIN_A, 2.0 * span)
    out = ase.Atoms([a.element.symbol for a in atoms], positions=pos, cell=box, pbc=spec.structure.periodic)
    out.set_masses(masses)
    return out


def client_threads(threads: str | None, device: str, ml_clients: int) -> tuple[int, int]:
    """CPU threads of each local ML client and of the MM client from ``"ML+MM"`` (either may be empty: auto).

    Auto: half the cores this process may use go to the local CPU ML clients (shared), all of them to the MM
    client. i-PI runs the clients at the same time; torch's OpenMP threads spin while they wait, so giving the
    ML client every core too makes the two fight (1.3-1.5x slower steps on 2 cores), whereas OpenMM's threads
    sleep and reuse the cores whenever the ML client is idle (fastest split on every benchmark case,
    tests/bench/results/step_cpu.md). An ML client on a GPU gets 1 thread.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    ml, mm = None, None
    if threads:
        parts = str(threads).split("+")
        try:
            ml, mm = (int(x) if x.strip() else None for x in parts) if len(parts) == 2 else (None, None)
        except ValueError:
            ml = mm = -1
        if len(parts) != 2 or (ml is not None and ml < 1) or (mm is not None and mm < 1):
            raise SetupError(f"--threads {threads!r}: expected ML+MM thread counts such as 1+1, 2+6 or +4")
    local_cpu_ml = max(ml_clients, 0) if any(d.strip().startswith("cpu") for d in device.split(",")) else 0
    if ml is None:
        ml = max(1, (cores // 2) // local_cpu_ml) if local_cpu_ml else 1
    if mm is None:
        mm = cores
    return ml, mm


def _client_argv_factory(system: Path, model, device: str, platform: str | None, verbose: bool,
                         max_force: float | None = None, threads: tuple[int, int] | None = None,
                         compile: bool = False) -> ClientArgv:
    devices = [d.strip() for d in device.split(",") if d.strip()] or ["cpu"]
    started = {"ml": 0}             # ML clients made so far: the next one gets the next device

    def argv(name: str, address: str) -> list[str]:
        cmd = [sys.executable, "-m", "driver.cli"] + (["-v"] if verbose else [])
        cmd += ["client", name, "--system", str(system), "--address", address]
        if max_force is not None:
            cmd += ["--max-force", repr(float(max_force))]
        if threads is not None:
            cmd += ["--threads", str(threads[0] if name == "ml" else threads[1])]
        if name == "ml":
            dev = devices[started["ml"] % len(devices)]
            started["ml"] += 1
            cmd += ["--model", str(Path(model).resolve()), "--device", dev] + (["--compile"] if compile else [])
        elif platform:
            cmd += ["--platform", platform]
        return cmd
    return argv


def _ipi_argv(input_name: str) -> list[str]:
    script = Path(sys.executable).parent / "i-pi"
    if not script.is_file():
        found = shutil.which("i-pi")
        if found is None:
            raise SetupError("i-PI's `i-pi` script is neither next to this Python nor on PATH; pip install ipi")
        script = Path(found)
    return [sys.executable, str(script), input_name]


# ------------------------------------------------------------------------------------------- processes
def _set_pdeathsig() -> None:
    """In the child before exec (Linux): get SIGTERM when mlmm dies, even by SIGKILL, so no i-PI or client
    is left holding a GPU or a socket."""
    if _LIBC is not None:
        _LIBC.prctl(1, signal.SIGTERM)        # PR_SET_PDEATHSIG


try:
    import ctypes
    _LIBC = ctypes.CDLL(None) if sys.platform.startswith("linux") else None
except OSError:
    _LIBC = None


class _Child:
    """One child process in its own process group, output to a log file."""

    def __init__(self, name: str, argv: list[str], cwd: Path, logfile: Path, env: dict[str, str],
                 append: bool = False, umask: int = -1):
        self.name, self.log = name, logfile
        with open(logfile, "ab" if append else "wb") as fh:
            self.proc = subprocess.Popen(argv, cwd=cwd, stdout=fh, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=env, start_new_session=True,
                                         preexec_fn=_set_pdeathsig if _LIBC is not None else None, umask=umask)
        self.exited_at: float | None = None

    @property
    def rc(self) -> int | None:
        return self.proc.poll()

    def signal(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def wait(self, timeout: float) -> bool:
        try:
            self.proc.wait(max(timeout, 0.0))
            return True
        except subprocess.TimeoutExpired:
            return False

    def kill(self) -> None:
        """SIGKILL the whole group (also anything the leader left behind) and reap the leader."""
        self.signal(signal.SIGKILL)
        self.wait(5.0)

    def describe_exit(self) -> str:
        rc = self.rc
        if rc is not None and rc < 0:
            try:
                return f"killed by {signal.Signals(-rc).name}"
            except ValueError:
                return f"killed by signal {-rc}"
        return f"exit code {rc}"


def _listening(endpoint: Path | int) -> bool:
    """A unix socket file exists, or a TCP socket listens on the port (Linux ``/proc/net/tcp*``; elsewhere
    assumed, the clients then retry connecting for ``mlmm client --timeout`` seconds)."""
    if isinstance(endpoint, Path):
        return endpoint.exists()
    seen = False
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as fh:
                rows = fh.read().splitlines()[1:]
        except OSError:
            continue
        seen = True
        # columns: sl local_address(hex ip:hex port) rem_address st(0A = LISTEN) ...
        if any(r.split()[3] == "0A" and int(r.split()[1].rsplit(":", 1)[1], 16) == endpoint for r in rows):
            return True
    return not seen


def _last_lines(path: Path, n: int = 3, width: int = 400) -> str:
    """The last ``n`` non-empty lines of a log, joined into one line (for a one-line error message)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(max(0, fh.seek(0, os.SEEK_END) - 8192))
            lines = [ln.strip() for ln in fh.read().decode(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "(no log)"
    errors = [ln for ln in lines if ln.startswith("mlmm: error: ")]
    if errors:                          # a client's own one-line error says it all
        text = errors[-1].removeprefix("mlmm: error: ")
        return text if len(text) <= 3 * width else text[:3 * width] + "..."
    text = " | ".join(lines[-n:]) or "(empty log)"
    return text if len(text) <= width else "..." + text[-width:]


class _PropertiesTail:
    """Reads the complete new rows of i-PI's properties file while it grows."""

    def __init__(self, path: Path | None):
        self.path, self.pos, self.partial = path, 0, b""
        self.columns: dict[str, int] = {}

    def rows(self) -> list[dict[str, float]]:
        if self.path is None or not self.path.is_file():
            return []
        with open(self.path, "rb") as fh:
            fh.seek(self.pos)
            chunk = fh.read()
        self.pos += len(chunk)
        lines = (self.partial + chunk).split(b"\n")
        self.partial = lines.pop()              # an unfinished line waits for the next read
        out = []
        for raw in lines:
            line = raw.decode(errors="replace")
            if line.startswith("#"):
                col = trajectory.parse_header_line(line)
                if col is not None:
                    self.columns[col[2].split("(")[0]] = col[0]
            elif line.strip():
                vals = line.split()
                try:
                    out.append({k: float(vals[i]) for k, i in self.columns.items() if i < len(vals)})
                except ValueError:
                    continue
        return out


class _Progress:
    """tqdm bar: steps done of total, temperature, ns/day (from i-PI's time column and the wall clock)."""

    def __init__(self, total: int, enabled: bool):
        from tqdm import tqdm

        self.bar = tqdm(total=total, unit="step", disable=not enabled, dynamic_ncols=True, file=sys.stderr,
                        desc="i-PI")
        self.first: tuple[float, float] | None = None     # (time_ps, wall) of the first row seen

    def update(self, row: dict[str, float]) -> None:
        step = int(row.get("step", self.bar.n))
        now = time.monotonic()
        info = []
        if "temperature" in row:
            info.append(f"T={row['temperature']:.0f} K")
        if "time" in row:
            if self.first is None:
                self.first = (row["time"], now)
            elif now - self.first[1] > 2.0:      # rows arrive in bursts: no rate from a short window
                info.append(f"{(row['time'] - self.first[0]) * 1e-3 / ((now - self.first[1]) / 86400):.3g} ns/day")
        if step > self.bar.n:
            self.bar.update(step - self.bar.n)
        if info:
            self.bar.set_postfix_str(", ".join(info), refresh=False)

    def close(self) -> None:
        self.bar.close()


class _Supervisor:
    """Starts i-PI and the clients, watches them, and stops all of them whatever happens."""

    def __init__(self, folder: Path, ipi_argv: list[str], clients: dict[str, list[str]],
                 endpoints: list[Path | int], properties: Path | None, total: int, progress: bool,
                 append: bool = False):
        """``endpoints``: what i-PI must open before the clients start: unix socket paths and inet ports.
        ``append``: add to the logs of an earlier attempt (a resumed run) instead of replacing them."""
        self.folder, self.ipi_argv, self.client_argv, self.endpoints = folder, ipi_argv, clients, endpoints
        self.tail = _PropertiesTail(properties)
        self.total, self.progress = total, progress
        self.ipi: _Child | None = None
        self.clients: dict[str, _Child] = {}
        self.interrupted = 0            # the signal number that stopped the run, 0 if none
        self.crashed: _Child | None = None      # the client whose death stopped the run
        self.append = append
        self.last_step = 0
        self.env = dict(os.environ, PYTHONUNBUFFERED="1",
                        PYTHONPATH=os.pathsep.join(p for p in (str(PROJECT_ROOT), os.environ.get("PYTHONPATH"))
                                                   if p))
        # i-PI's numpy and the clients' BLAS/OpenMP pools would each start one thread per core and spin next to
        # the clients' real work (a 2-thread OpenMM client ran 1.5x slower so on the DHFR benchmark); the
        # clients set their compute threads themselves (--threads). A user's explicit setting is kept.
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            self.env.setdefault(var, "1")

    def run(self) -> str | None:
        """Run to the end; returns None if nothing failed, else the one-line reason."""
        in_main = threading.current_thread() is threading.main_thread()
        old_term = signal.signal(signal.SIGTERM, self._on_sigterm) if in_main else None
        bar = None
        try:
            # umask 077: nobody else can use i-PI's socket files even before they are set to 0600 below
            self.ipi = _Child("i-PI", self.ipi_argv, self.folder, self.folder / "ipi.log", self.env, self.append,
                              umask=0o077)
            failure = self._wait_for_sockets()
            if failure:
                return failure
            for name, argv in self.client_argv.items():
                self.clients[name] = _Child(name, argv, self.folder, self.folder / f"client_{name}.log", self.env,
                                            self.append)
            log.info("i-PI and %d client(s) started in %s", len(self.clients), self.folder)
            bar = _Progress(self.total, self.progress)
            return self._watch(bar)
        except KeyboardInterrupt:
            self.interrupted = self.interrupted or signal.SIGINT
            return None
        finally:
            if bar is not None:
                self._read_progress(bar)
                bar.close()
            try:
                self._shutdown()
            except KeyboardInterrupt:       # a second Ctrl-C: no more waiting
                pass
            finally:
                for child in self._children():
                    child.kill()
                if in_main:
                    signal.signal(signal.SIGTERM, old_term)

    def _on_sigterm(self, signum, frame) -> None:
        self.interrupted = signum
        raise KeyboardInterrupt

    def _children(self) -> list[_Child]:
        return ([self.ipi] if self.ipi else []) + list(self.clients.values())

    def _wait_for_sockets(self) -> str | None:
        """Until i-PI listens on every endpoint (bounded, watching i-PI). Never probes a socket by connecting:
        i-PI would take the probe for a client and hang when it goes away (ipi.md §2.7)."""
        deadline = time.monotonic() + SOCKET_WAIT_S
        while True:
            missing = [e for e in self.endpoints if not _listening(e)]
            if not missing:
                for e in self.endpoints:          # owner read/write only, before any client connects
                    if isinstance(e, Path):
                        os.chmod(e, 0o600)
                return None
            if self.ipi.rc is not None:
                return (f"i-PI stopped ({self.ipi.describe_exit()}) before opening its sockets: "
                        f"{_last_lines(self.ipi.log)}; see {self.ipi.log}")
            if time.monotonic() > deadline:
                return (f"i-PI did not open {', '.join(map(str, missing))} within {SOCKET_WAIT_S:g} s; "
                        f"see {self.ipi.log}")
            time.sleep(POLL_S / 2)

    def _read_progress(self, bar: _Progress) -> None:
        for row in self.tail.rows():
            bar.update(row)
            self.last_step = int(row.get("step", self.last_step))

    def _watch(self, bar: _Progress) -> str | None:
        while True:
            self._read_progress(bar)
            now = time.monotonic()
            for child in self.clients.values():
                rc = child.rc
                if rc is None:
                    continue
                if child.exited_at is None:
                    child.exited_at = now
                if rc != 0 and self.ipi.rc is None:
                    self.crashed = child
                    return (f"client '{child.name}' died ({child.describe_exit()}) near step {self.last_step}: "
                            f"{_last_lines(child.log)}; log: {child.log}")
                if self.ipi.rc is None and now - child.exited_at > EARLY_EXIT_GRACE_S:
                    return (f"client '{child.name}' exited ({child.describe_exit()}) but i-PI did not finish "
                            f"within {EARLY_EXIT_GRACE_S:g} s; logs: {child.log}, {self.ipi.log}")
            if self.ipi.rc is not None:
                return None     # finished or not: decided from RESTART by the caller
            time.sleep(POLL_S)

    def _shutdown(self) -> None:
        """i-PI first (SIGTERM = soft exit, writes RESTART, tells clients to quit), then the clients."""
        if self.ipi is not None and self.ipi.rc is None:
            self.ipi.signal(signal.SIGTERM)
            if not self.ipi.wait(IPI_GRACE_S):
                log.warning("i-PI did not stop within %g s of SIGTERM; killing it", IPI_GRACE_S)
                self.ipi.kill()
        # after a clean i-PI exit the clients got EXIT and stop by themselves; after a crash they may not notice
        grace = CLIENT_GRACE_S if self.ipi is not None and self.ipi.rc == 0 else 2.0
        deadline = time.monotonic() + grace
        for child in self.clients.values():
            if not child.wait(deadline - time.monotonic()):
                child.signal(signal.SIGTERM)
                if not child.wait(5.0):
                    child.kill()
            elif child.rc not in (0, None) and child.exited_at is None:
                log.warning("client '%s' ended with %s after i-PI stopped; see %s", child.name,
                            child.describe_exit(), child.log)




# ------------------------------------------------------------------------------------------- outputs
def _steps_done(folder: Path) -> int | None:
    """The step i-PI reached, from the RESTART it writes on every exit (None if it wrote none)."""
    return xmlinput.restart_step(folder / "RESTART")


def _convert_trajectories(folder: Path, root: ET.Element, periodic: bool) -> list[Path]:
    """AMBER NetCDF next to each i-PI position trajectory in xyz/ase format (``sim.pos_0.xyz`` ->
    ``sim.pos_0.nc``)."""
    dt = xmlinput.timestep_ps(root)
    if not dt:
        log.warning("no <timestep> in the input: NetCDF time is the step number")
        dt = 1.0
    prefix = xmlinput.output_prefix(root)
    made = []
    for t in xmlinput.position_trajectories(root):
        if t.format not in ("xyz", "ase"):
            log.info("trajectory '%s' is in format '%s': not converted to NetCDF", t.filename, t.format)
            continue
        ext = "extxyz" if t.format == "ase" else "xyz"
        pattern = f"{prefix}.{t.filename}_*.{ext}" if t.what == "positions" else f"{prefix}.{t.filename}.{ext}"
        for src in sorted(folder.glob(pattern)):
            dst = src.with_suffix(".nc")
            n = trajectory.ipi_to_netcdf(src, dst, timestep_ps=dt, periodic=periodic)
            log.info("wrote %s (%d frames)", dst.name, n)
            made.append(dst)
    return made

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
    resume.xml       the state a resumed or automatically restarted run was started from (with new sockets)
    sim.autosave_K   the latest automatic checkpoints (the state after i-PI itself was killed)
    last_good.pdb    after an exploding structure: the last accepted state (RESTART's step)

This module orchestrates; the pieces live next to it: :mod:`driver.rundir` (run folder, starting structure,
client command lines, checks before anything starts), :mod:`driver.supervise` (the processes: every child in
its own process group, watched by one loop that stops i-PI when a client dies, since i-PI would hang forever
otherwise, ipi.md §2.7) and :mod:`driver.outputs` (trimming, NetCDF/CSV conversion, ``last_good.pdb``).
Unix sockets live in a fresh 0700 directory per i-PI process, removed when it ends.

Recovery: after a client death that is not the client's own one-line error (exit code 2), after the watchdog
killed a hung client (no answer within ``client_timeout``, measured against its own recent requests; see
:mod:`driver.heartbeat`) and after i-PI itself was killed, the run continues with a new i-PI and new clients
(``max_restarts`` times at most) from the newest saved state: RESTART, or the automatic checkpoint `mlmm run`
adds every ``checkpoint_stride`` steps (:mod:`driver.checkpoints`). i-PI appends to its outputs from that
state's step, which may lag the last written step; `trim_outputs` first cuts the properties, trajectories and
extras back to it, so each step appears once. `resume_simulation` (``mlmm run --resume``) does the same for a
stopped run. NetCDF files and properties.csv are appended to at the end of every run, after being cut back to
the same step. Clients on other nodes (``remote_ml_clients``) are watched by i-PI itself: their socket gets
``exit_on_disconnect`` and a ``timeout``, so i-PI writes RESTART and stops when one dies or hangs. A client
that refuses a blown-up structure (driver.client.ForceGuard) stops the run; the RESTART state is then saved as
``last_good.pdb``.
"""
from __future__ import annotations

import logging
import shutil
import signal
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import ase.io

from . import checkpoints, heartbeat, rundir, xmlinput
from .outputs import convert_outputs, save_last_good, trim_converted, trim_outputs  # noqa: F401  (public here too)
from .rundir import ClientArgv, client_threads, initial_structure  # noqa: F401  (public here too)
from .supervise import IPI_GRACE_S, Supervisor, ipi_lost_client, last_lines, recoverable  # noqa: F401
from .uncertainty import uncertainty_options
from potentials.core import config
from potentials.core.errors import CalculationFailed, SetupError
from potentials.core.spec import SystemSpec

log = logging.getLogger(__name__)

DEFAULT_TOTAL_STEPS = 1000          # i-PI's default <total_steps>
DEFAULT_CLIENT_TIMEOUT_S = 60.0     # the watchdog's limit (mlmm run --client-timeout)


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
    ``mlmm run --resume RUN_DIR [--steps N]``; ``--print-config`` prints the effective system spec and runs
    nothing."""
    if getattr(args, "print_config", False):
        return _print_config(args)
    resume = getattr(args, "resume", None)
    max_restarts = getattr(args, "max_restarts", 3)
    if max_restarts < 0:
        raise SetupError(f"--max-restarts {max_restarts}: must be >= 0")
    common = dict(steps=args.steps, platform=args.platform, progress=not args.no_progress,
                  verbose=getattr(args, "verbose", False), max_restarts=max_restarts, max_force=args.max_force,
                  threads=getattr(args, "threads", None), client_timeout=getattr(args, "client_timeout", None),
                  checkpoint_stride=getattr(args, "checkpoint_stride", None))
    try:
        if resume:
            given = [f for f, v in (("XML", args.xml), ("--system", args.system), ("--model", args.model),
                                    ("--out", args.out), ("--seed", args.seed), ("--beads", args.beads),
                                    *((f"--{k.replace('_', '-')}", v) for k, v in uncertainty_options(args).items()))
                     if v is not None]
            if given:
                raise SetupError(f"--resume {resume}: {', '.join(given)} cannot change a run being continued "
                                 "(they come from its RESTART and run.json); give only --steps and devices")
            result = resume_simulation(resume, device=args.device, compile=getattr(args, "compile", False) or None,
                                       **common)
        else:
            if args.xml is None or args.system is None:
                raise SetupError("mlmm run needs an i-PI XML and --system TOML (or --resume RUN_DIR)")
            result = run_simulation(args.xml, args.system, out=args.out, model=args.model, seed=args.seed,
                                    device=args.device or "cpu", beads=getattr(args, "beads", None),
                                    ml_clients=getattr(args, "ml_clients", 1),
                                    remote_ml_clients=getattr(args, "remote_ml_clients", 0),
                                    compile=getattr(args, "compile", False),
                                    model_options={"model_type": getattr(args, "model_type", None),
                                                   "dtype": getattr(args, "dtype", None),
                                                   "allow_embedding_mismatch":
                                                       getattr(args, "allow_embedding_mismatch", False) or None,
                                                   **uncertainty_options(args)},
                                    **common)
    except RunInterrupted as exc:
        print(f"mlmm: interrupted: {exc}", file=sys.stderr)
        return 128 + exc.signum          # 130 for Ctrl-C, 143 for SIGTERM (shell convention)
    rate = result.ns_per_day
    log.info("done: %d steps in %.1f s%s; outputs in %s", result.steps_done, result.wall_s,
             f" ({rate:.3g} ns/day)" if rate else "", result.folder)
    return 0


def _print_config(args) -> int:
    """``mlmm run --print-config``: the system spec the run would use (``--system``, or the resumed run's), as
    TOML with every default filled in."""
    system = args.system
    if system is None and getattr(args, "resume", None):
        system = rundir.read_run_info(Path(args.resume).resolve()).get("system")
    if system is None:
        raise SetupError("--print-config needs --system TOML (or --resume RUN_DIR)")
    print(config.describe(SystemSpec.load(system), title=f"effective system spec of {Path(system).resolve()}"),
          end="")
    return 0


# ------------------------------------------------------------------------------------------------- API
def run_simulation(xml: str | Path, system: str | Path, *, out: str | Path | None = None,
                   model: str | Path | None = None, steps: int | None = None, seed: int | None = None,
                   device: str = "cpu", platform: str | None = None, progress: bool = True, verbose: bool = False,
                   client_argv: ClientArgv | None = None, beads: int | None = None, ml_clients: int = 1,
                   remote_ml_clients: int = 0, max_restarts: int = 3, max_force: float | None = None,
                   threads: str | None = None, compile: bool = False, client_timeout: float | None = None,
                   checkpoint_stride: int | None = None, model_options: dict | None = None) -> RunResult:
    """Run i-PI with the input ``xml`` on ``system`` and one client per `<ffsocket>`; block until done.

    Parameters
    ----------
    xml : i-PI input (e.g. ``inputs/templates/nvt_bussi.xml``); run-specific parts are filled in.
    system : ``system.toml`` written by ``mlmm prepare``.
    out : run folder (created; must be new or empty). Default: ``runs/run-<timestamp>`` in the current directory.
    model : model file for the ``ml`` client (required with an ``ml`` socket); model_options: its options.
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
    max_restarts : when a client dies (killed, or crashed other than with its own one-line error) or hangs, or
        i-PI itself is killed, stop what is left (i-PI writes RESTART) and continue from the newest saved state
        with a fresh i-PI and fresh clients, at most this many times.
    remote_ml_clients : ML clients that will connect from other nodes (``mlmm client ml --address HOST:PORT``,
        not started here; the ``ml`` socket must be ``mode='inet'``). Sizes the batches; i-PI waits for them, and
        stops (RESTART written) when one disconnects or leaves a request unanswered for ``FIRST_FACTOR x
        client_timeout`` s (:func:`driver.xmlinput.watch_remote`). No automatic restarts then.
    client_timeout : s (default `DEFAULT_CLIENT_TIMEOUT_S`; 0: no watchdog). A local client whose request stays
        unanswered (or which shows no sign of life) longer than max(client_timeout, 10 x its slowest recent
        request), or 10 x client_timeout before its first answer, is hung: it is killed and the run restarted.
    checkpoint_stride : steps between the automatic checkpoints the run continues from after i-PI itself died
        (default `driver.checkpoints.DEFAULT_STRIDE`; 0: none).

    Raises
    ------
    SetupError : bad input, before anything is started.
    CalculationFailed : a client or i-PI died, or i-PI stopped before ``total_steps``.
    RunInterrupted : Ctrl-C / SIGTERM; all processes were stopped, i-PI wrote RESTART.
    """
    tree, socks, components = _read_input(xml)
    root = tree.getroot()
    spec = SystemSpec.load(system)
    if not spec.structure_path.is_file():
        raise SetupError(f"{system}: structure file {spec.structure_path} not found; re-run `mlmm prepare`")
    local_ml = client_argv is None and ml_clients > 0 and any(s.name == "ml" for s in socks)   # `mlmm client ml`s
    _check_options(str(xml), socks, model=model, need_model=local_ml, steps=steps, max_force=max_force,
                   ml_clients=ml_clients, remote_ml_clients=remote_ml_clients)
    if beads is not None:
        xmlinput.set_beads(root, beads, str(xml))
    n_clients = _clients_per_socket(root, socks, str(xml), ml_clients, remote_ml_clients)
    total = steps if steps is not None else (xmlinput.total_steps(root) or DEFAULT_TOTAL_STEPS)
    folder = rundir.run_folder(out, spec)
    start = initial_structure(spec)         # builds the OpenMM system: force-field problems show up here
    rundir.preflight(socks, spec, start, model if local_ml else None, "input.xml", model_options)
    watch = _Watch.of(client_timeout, checkpoint_stride, remote_ml_clients)
    folder.mkdir(parents=True, exist_ok=True)
    ase.io.write(str(folder / "init.extxyz"), start, format="extxyz")
    xmlinput.patch(root, init_file="init.extxyz", sockets_prefix=None, steps=steps, seed=seed)
    rundir.write_run_info(folder, {
        "xml": str(Path(xml).resolve()), "system": str(Path(system).resolve()),
        "model": str(Path(model).resolve()) if model else None, "steps": steps, "seed": seed,
        "device": device, "platform": platform, "ml_clients": ml_clients, "model_options": model_options,
        "remote_ml_clients": remote_ml_clients, "max_force": max_force, "threads": threads, "compile": compile,
        "client_timeout": watch.client_timeout, "checkpoint_stride": watch.checkpoint_stride})
    argv = client_argv or rundir.client_argv_factory(Path(system).resolve(), model, device, platform, verbose,
                                                     max_force, client_threads(threads, device, ml_clients), compile,
                                                     model_options, xmlinput.virial_kind(root) or "none")
    run = _Run(folder, socks, n_clients, argv, total, progress, bool(start.pbc.all()), components, spec, watch)
    return run.drive(run.prepared(tree), "input.xml",
                     max_restarts=_no_restarts_with_remote(max_restarts, remote_ml_clients), append=False)


def _read_input(path: str | Path, state: bool = False) -> tuple[ET.ElementTree, list[xmlinput.SocketSpec],
                                                                list[str]]:
    """An i-PI input (a template, or with ``state`` a RESTART or checkpoint), its validated sockets and its force
    components."""
    tree = xmlinput.load_state(path) if state else xmlinput.load(path)
    return tree, xmlinput.sockets(tree.getroot(), str(path)), xmlinput.force_components(tree.getroot(), str(path))


def _check_options(where: str, socks: list[xmlinput.SocketSpec], *, model: str | Path | None, need_model: bool,
                   steps: int | None, max_force: float | None, ml_clients: int, remote_ml_clients: int) -> None:
    """The run's options against the input's sockets, before anything is written (``need_model``: an ML client
    is started here, so ``model`` must be an existing file)."""
    if need_model:
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


def _clients_per_socket(root: ET.Element, socks: list[xmlinput.SocketSpec], where: str, ml_clients: int,
                        remote_ml_clients: int) -> dict[str, int]:
    """The clients started here per socket (``ml_clients`` on ``ml``, one on the others); sizes the batched
    sockets for all clients, remote ones included, and warns when the beads do not divide among them."""
    n_clients = {s.name: (ml_clients if s.name == "ml" else 1) for s in socks}
    sharing = {**n_clients, "ml": ml_clients + remote_ml_clients}
    batches = xmlinput.fit_batches(root, sharing)
    seen = xmlinput.beads_per_forcefield(root, where)
    for name, n in sharing.items():
        if n > 1 and seen.get(name, 0) % n:
            log.warning("%d clients on '%s' which sees %d beads per step: the clients get unequal shares "
                        "(choose a number of clients that divides the beads)", n, name, seen.get(name, 0))
    if batches:
        log.info("batched sockets: %s (structures per request)", batches)
    return n_clients


def _no_restarts_with_remote(max_restarts: int, remote: int) -> int:
    """A restarted i-PI would wait forever for remote clients nobody restarts: no automatic restarts then."""
    if remote and max_restarts:
        log.info("remote ML clients: no automatic restart after a client death (resume by hand with --resume and "
                 "restart the remote clients)")
        return 0
    return max_restarts


@dataclass(frozen=True)
class _Watch:
    """How a run is watched: the clients' watchdog limit (s, 0 = off), the automatic checkpoints (steps, 0 = off),
    and whether clients on other nodes serve the ``ml`` socket (i-PI watches those itself)."""

    client_timeout: float = DEFAULT_CLIENT_TIMEOUT_S
    checkpoint_stride: int = checkpoints.DEFAULT_STRIDE
    remote: bool = False

    @classmethod
    def of(cls, client_timeout: float | None, checkpoint_stride: int | None, remote: int | bool,
           recorded: dict | None = None) -> "_Watch":
        """From the options (None: what ``recorded``, a run.json, says, else the default); checked."""
        recorded = recorded or {}
        timeout = client_timeout if client_timeout is not None else recorded.get("client_timeout")
        stride = checkpoint_stride if checkpoint_stride is not None else recorded.get("checkpoint_stride")
        timeout = DEFAULT_CLIENT_TIMEOUT_S if timeout is None else float(timeout)
        stride = checkpoints.DEFAULT_STRIDE if stride is None else int(stride)
        if timeout < 0:
            raise SetupError(f"--client-timeout {timeout:g}: must be >= 0 s (0: no watchdog)")
        if stride < 0:
            raise SetupError(f"--checkpoint-stride {stride}: must be >= 0 steps (0: no automatic checkpoints)")
        return cls(timeout, stride, bool(remote))


def resume_simulation(run_dir: str | Path, *, steps: int | None = None, device: str | None = None,
                      platform: str | None = None, progress: bool = True, verbose: bool = False,
                      client_argv: ClientArgv | None = None, max_restarts: int = 3,
                      max_force: float | None = None, threads: str | None = None,
                      compile: bool | None = None, client_timeout: float | None = None,
                      checkpoint_stride: int | None = None) -> RunResult:
    """Continue the run in ``run_dir`` from its newest saved state (``mlmm run --resume RUN_DIR``): i-PI's
    ``RESTART``, or an automatic checkpoint if i-PI was killed after writing a newer one.

    The outputs i-PI appends to are first cut back to that state's step (RESTART may lag the last written step by
    up to ``safe_stride``), and so are the NetCDF files and properties.csv, which the continued run's frames and
    rows are then appended to: every step's properties and frames appear once, and continuing costs what it
    adds, not what the run already wrote. The thermostat's random state comes from RESTART: a seeded run
    continued this way matches the uninterrupted one to i-PI's printed precision.

    Parameters
    ----------
    run_dir : a run folder written by `run_simulation` (``run.json``, ``RESTART``).
    steps : new ``total_steps`` (must exceed the RESTART's step); default: the run's own total.
    device, platform, max_force, threads, compile, client_timeout, checkpoint_stride : as in `run_simulation`;
        default: what the run was started with (``run.json``).
    Other parameters as in `run_simulation`.
    """
    folder = Path(run_dir).resolve()
    info = rundir.read_run_info(folder)
    state = checkpoints.newest(folder)
    if state is None:
        raise SetupError(f"{folder}: no readable RESTART (i-PI was killed before writing one); start a new run")
    tree, socks, components = _read_input(state.path, state=True)
    total = steps if steps is not None else (xmlinput.total_steps(tree.getroot()) or DEFAULT_TOTAL_STEPS)
    if total <= state.step:
        raise SetupError(f"{folder}: the run already reached step {state.step} of {total}; pass --steps N with N > "
                         f"{state.step} to continue it")
    system, model = info.get("system"), info.get("model")
    spec = SystemSpec.load(system)
    ml_clients, remote = int(info.get("ml_clients", 1)), int(info.get("remote_ml_clients") or 0)
    if client_argv is None and ml_clients > 0 and any(s.name == "ml" for s in socks) and \
            not (model and Path(model).is_file()):
        raise SetupError(f"{folder}: the model the run was started with ({model}) is gone; restore it to resume")
    watch = _Watch.of(client_timeout, checkpoint_stride, remote, recorded=info)
    n_clients = {s.name: (ml_clients if s.name == "ml" else 1) for s in socks}
    rundir.check_socket_paths(socks)
    rundir.check_ports(socks)
    device = device or info.get("device") or "cpu"
    argv = client_argv or rundir.client_argv_factory(
        Path(system), model, device, platform or info.get("platform"), verbose, max_force or info.get("max_force"),
        client_threads(threads or info.get("threads"), device, ml_clients),
        bool(info.get("compile")) if compile is None else compile, info.get("model_options"),
        xmlinput.virial_kind(tree.getroot()) or "none")
    run = _Run(folder, socks, n_clients, argv, total, progress, bool(spec.structure.periodic), components, spec,
               watch)
    return run.drive(run.resume_input(state), "resume.xml", append=True,
                     max_restarts=_no_restarts_with_remote(max_restarts, remote))


# ------------------------------------------------------------------------------------------------- one run
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
    watch: _Watch = field(default_factory=_Watch)

    def prepared(self, tree: ET.ElementTree) -> ET.ElementTree:
        """The input with what watching the run needs: the automatic checkpoint; remote clients watched by i-PI."""
        root = tree.getroot()
        checkpoints.set_autosave(root, self.watch.checkpoint_stride)
        if self.watch.remote:
            xmlinput.watch_remote(root, "ml", heartbeat.FIRST_FACTOR * self.watch.client_timeout)
        return tree

    def resume_input(self, state: checkpoints.State) -> ET.ElementTree:
        """The saved ``state`` (RESTART, an automatic checkpoint) with ``total_steps`` set, after cutting the
        outputs back to its step; the other automatic checkpoints are removed (the run goes on from this one)."""
        tree = xmlinput.load_state(state.path)
        root = tree.getroot()
        trim_outputs(self.folder, root, state.step)
        trim_converted(self.folder, root, state.step)
        checkpoints.clear(self.folder, root, but=state.path)
        xmlinput.patch(root, init_file=None, sockets_prefix=None, steps=self.total)
        return self.prepared(tree)

    def drive(self, tree: ET.ElementTree, input_name: str, *, max_restarts: int, append: bool) -> RunResult:
        """Run i-PI on ``tree`` (written as ``input_name``); after a recoverable failure (a client died or hung,
        i-PI was killed), continue from the newest saved state up to ``max_restarts`` times. Then convert the
        outputs and report."""
        wall, restarts = 0.0, 0
        while True:
            outcome, sup, dt = self._attempt(tree, input_name, append)
            wall += dt
            failure = _recoverable_failure(outcome, sup)
            if failure is None:
                break
            state = checkpoints.newest(self.folder, tree.getroot())
            if restarts >= max_restarts or state is None or state.step >= self.total:
                break
            restarts += 1
            log.warning("%s; restarting i-PI and the clients from %s at step %d (automatic restart %d of %d)",
                        failure, state.path.name, state.step, restarts, max_restarts)
            tree, input_name, append = self.resume_input(state), "resume.xml", True
        if outcome is not None and restarts:
            outcome += f" (after {restarts} automatic restart(s))"
        if outcome is not None and sup.crashed is not None:
            saved = save_last_good(self.folder, self.spec)
            if saved is not None:
                outcome += f"; last good frame (step {saved[1]}, from RESTART): {saved[0]}"
        return self._finish(tree.getroot(), outcome, sup, wall)

    def _finish(self, root: ET.Element, outcome: str | None, sup: Supervisor, wall: float) -> RunResult:
        """Convert the outputs; the result if i-PI reached ``total`` with nothing failed, else raise."""
        folder = self.folder
        done = xmlinput.restart_step(folder / "RESTART")
        result = RunResult(folder, done if done is not None else sup.last_step, self.total, wall,
                           xmlinput.timestep_ps(root))
        try:
            result.trajectories, result.properties_csv = convert_outputs(folder, root, self.periodic,
                                                                         self.components)
        except (OSError, ValueError, RuntimeError) as exc:
            if outcome is None and not sup.interrupted:
                raise CalculationFailed(f"the run finished but converting its outputs in {folder} failed: {exc}") \
                    from exc
            log.warning("converting the outputs of the stopped run failed: %s", exc)

        if sup.interrupted:
            raise RunInterrupted(f"stopped at step {result.steps_done} of {self.total}; i-PI saved its state in "
                                 f"{folder / 'RESTART'} (continue with mlmm run --resume {folder})", sup.interrupted)
        lost = self._lost_remote_client(sup, outcome, done)
        if lost:
            raise CalculationFailed(f"{lost}: i-PI stopped at step {result.steps_done} of {self.total} and saved its "
                                    f"state in {folder / 'RESTART'}; start the remote ML clients again and continue "
                                    f"with mlmm run --resume {folder}")
        if outcome is not None:
            raise CalculationFailed(outcome)
        if done is None or done < self.total:
            raise CalculationFailed(f"i-PI stopped ({sup.ipi.describe_exit()}) at step {result.steps_done} of "
                                    f"{self.total}: {last_lines(sup.ipi.log)}; see {sup.ipi.log}")
        checkpoints.clear(folder, root)          # RESTART holds the final state
        return result

    def _lost_remote_client(self, sup: Supervisor, outcome: str | None, done: int | None) -> str | None:
        """Why the run stopped, if a client on another node died or hung (one phrase naming it): i-PI dropped it
        and stopped by itself (exit_on_disconnect, timeout), or its connection reset killed i-PI's socket thread
        (then the supervisor stopped i-PI). None otherwise."""
        if not self.watch.remote:
            return None
        if sup.lost_socket:
            return ipi_lost_client(sup.ipi.log, sup.lost_socket)
        if outcome is None and sup.ipi.rc == 0 and (done is None or done < self.total):
            return ipi_lost_client(sup.ipi.log)
        return None

    def _attempt(self, tree: ET.ElementTree, input_name: str, append: bool) -> tuple[str | None, Supervisor,
                                                                                      float]:
        """One i-PI process and its clients, with a fresh private socket folder (which also holds the clients'
        heartbeat files)."""
        root = tree.getroot()
        sockdir = Path(tempfile.mkdtemp(prefix="mlmm-", dir=rundir.short_tmpdir()))     # mode 0700
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
            sup = Supervisor(self.folder, rundir.ipi_argv(input_name), clients, endpoints,
                             self.folder / props if props else None, self.total, self.progress, append=append,
                             heartbeats={name: sockdir / f"{name}.heartbeat" for name in clients},
                             client_timeout=self.watch.client_timeout,
                             housekeeping=lambda: checkpoints.prune(self.folder, root))
            t0 = time.monotonic()
            outcome = sup.run()
            return outcome, sup, time.monotonic() - t0
        finally:
            shutil.rmtree(sockdir, ignore_errors=True)


def _recoverable_failure(outcome: str | None, sup: Supervisor) -> str | None:
    """What went wrong in an attempt, if a fresh i-PI and fresh clients could carry on from the saved state: a
    client that died by a signal or crashed (not its own one-line error, exit code 2), or that hung (killed by
    the watchdog), or i-PI itself killed by a signal. None otherwise (success, Ctrl-C, a client's error)."""
    if sup.interrupted:
        return None
    if outcome is not None:
        return outcome if sup.crashed is not None and recoverable(sup.crashed) else None
    ipi = sup.ipi
    if ipi is not None and ipi.rc is not None and ipi.rc < 0:
        return f"i-PI died ({ipi.describe_exit()}) near step {sup.last_step}: {last_lines(ipi.log)}"
    return None

"""Preparing a run before anything starts: the run folder, i-PI's starting structure, the client command lines
and the checks that must fail before i-PI does (socket paths and ports, the model file, i-PI installed).

Everything here raises :class:`SetupError` with one line naming the problem and the fix; nothing is started.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from . import xmlinput
from potentials.core.errors import SetupError
from potentials.core.spec import SystemSpec

if TYPE_CHECKING:
    import ase

MAX_UNIX_PATH = 107         # sun_path is 108 bytes including the terminating NUL
CLUSTER_BOX_MIN_A = 100.0   # edge (Å) of the dummy box i-PI needs for non-periodic systems (ipi.md §1.4)

RUN_INFO = "run.json"       # what a run was made from: `mlmm analyze RUN_DIR`, `mlmm run --resume RUN_DIR` read it

ClientArgv = Callable[[str, str], list[str]]   # (forcefield name, client address) -> command line


# ------------------------------------------------------------------------------------------- folder, structure
def run_folder(out: str | Path | None, spec: SystemSpec) -> Path:
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


def write_run_info(folder: Path, info: dict) -> None:
    """``run.json``: what the run was made from (absolute paths of the XML, system and model; the options), so
    `mlmm analyze RUN_DIR`, `mlmm run --resume RUN_DIR` and a person can find them."""
    (folder / RUN_INFO).write_text(json.dumps(info, indent=1) + "\n")


def read_run_info(folder: Path) -> dict:
    """The ``run.json`` of a run folder (SetupError if there is none: not a folder written by `mlmm run`)."""
    try:
        return json.loads((folder / RUN_INFO).read_text())
    except (OSError, ValueError) as exc:
        raise SetupError(f"{folder}: no readable {RUN_INFO} ({exc}); --resume needs a folder written by mlmm run") \
            from None


def short_tmpdir() -> str:
    """A temp folder short enough for AF_UNIX paths (TMPDIR on clusters can be very long)."""
    tmp = tempfile.gettempdir()
    return tmp if len(tmp) < 60 else "/tmp"


def initial_structure(spec: SystemSpec):
    """The system's starting structure for i-PI as an ``ase.Atoms`` (written as extended XYZ, which i-PI
    reads with ``<file mode='ase'>``); ``atoms.pbc`` tells whether the system is periodic.

    Positions and cell in Å, masses in dalton (:func:`potentials.structure_io.ase_atoms`: from the OpenMM system
    the MM client builds). Non-periodic systems get a large dummy cubic box: i-PI needs a cell, the sockets use
    ``pbc='false'`` and the clients ignore it.
    """
    from potentials.structure_io import ase_atoms

    atoms = ase_atoms(spec)
    if not spec.structure.periodic:
        pos = atoms.get_positions()
        span = float(np.ptp(pos, axis=0).max()) if len(pos) else 0.0
        atoms.set_cell(np.eye(3) * max(CLUSTER_BOX_MIN_A, 2.0 * span))
    return atoms


# ------------------------------------------------------------------------------------------- clients
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


def client_argv_factory(system: Path, model, device: str, platform: str | None, verbose: bool,
                        max_force: float | None = None, threads: tuple[int, int] | None = None,
                        compile: bool = False, model_options: dict | None = None,
                        virial: str | None = None) -> ClientArgv:
    """The command line of the client of each `<ffsocket>`: ``mlmm client NAME`` (the socket's name is the client
    kind, checked by :func:`driver.xmlinput.sockets`). The ``ml`` clients get the model (and ``model_options``:
    ``model_type``, ``dtype``; True: a bare flag, ``--allow-embedding-mismatch``), a device each (round robin
    over the comma-separated ``device``) and ``threads[0]``; the others the OpenMM ``platform``, ``threads[1]`` and ``--virial`` (what the input reads of
    the virial, :func:`driver.xmlinput.virial_kind`; ``none`` when nothing does, which saves the MM client its
    finite-difference box derivative)."""
    model_args = [a for k, v in (model_options or {}).items() if v
                  for a in ((f"--{k.replace('_', '-')}",) if v is True else (f"--{k.replace('_', '-')}", str(v)))]
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
            cmd += model_args
        else:
            cmd += ["--platform", platform] if platform else []
            cmd += ["--virial", virial] if virial else []
        return cmd
    return argv


def ipi_argv(input_name: str) -> list[str]:
    """The command line that runs i-PI on ``input_name`` (in the run folder) with this Python."""
    script = Path(sys.executable).parent / "i-pi"
    if not script.is_file():
        found = shutil.which("i-pi")
        if found is None:
            raise SetupError("i-PI's `i-pi` script is neither next to this Python nor on PATH; pip install ipi")
        script = Path(found)
    return [sys.executable, str(script), input_name]


# ------------------------------------------------------------------------------------------- checks
def preflight(socks: list[xmlinput.SocketSpec], spec: SystemSpec, start: ase.Atoms, model: str | Path | None,
              input_name: str, model_options: dict | None = None) -> None:
    """What would make i-PI or a client fail after the run folder is written, checked before: the model file
    against the ML zone (if ``model``), unix socket path lengths, free inet ports, i-PI installed."""
    if model is not None:
        opts = {k: v for k, v in (model_options or {}).items() if v}
        check_model_file(model, spec, start, **{k: opts[k] for k in MODEL_FILE_OPTIONS if k in opts},
                         committee="max_force_uncertainty" in opts)
    check_socket_paths(socks)
    check_ports(socks)
    ipi_argv(input_name)


MODEL_FILE_OPTIONS = ("model_type", "dtype", "allow_embedding_mismatch")     # the model_options about the file


def check_model_file(model: str | Path, spec: SystemSpec, start: ase.Atoms, model_type: str | None = None,
                     dtype: str | None = None, allow_embedding_mismatch: bool = False,
                     committee: bool = False) -> None:
    """The ML client would refuse a model file of another format version, one that does not know an element
    (or the charge) of the ML zone, or one trained with another embedding (scheme, cutoff, switch width:
    :func:`coupling.ml_engine.check_embedding`, a warning with ``allow_embedding_mismatch``); find out before
    anything is started, so the error is one line and no run folder is written. The model is loaded as the
    client will load it (:func:`potentials.adapters.load_adapter`: weights-only for our files). ``committee``:
    the run watches a committee's spread (``--max-force-uncertainty``), so the file must hold one."""
    from coupling.ml_engine import check_embedding, check_model
    from coupling.schemes import get_scheme
    from potentials.adapters import load_adapter

    numbers = start.numbers[np.asarray(spec.ml.indices, dtype=int)]
    adapter = load_adapter(model, "cpu", model_type=model_type, dtype=dtype)
    check_model(adapter, numbers, spec.ml.charge, where=f"model file {model}")
    if committee and getattr(adapter, "n_members", None) is None:
        raise SetupError(f"--max-force-uncertainty needs a committee model (mlmm train --committee K); {model} holds "
                         f"a single {getattr(adapter, 'architecture', 'model')!r} model")
    check_embedding(adapter, spec.coupling, get_scheme(spec.coupling.embedding), where=f"model {model}",
                    allow=allow_embedding_mismatch)


def check_ports(socks: list[xmlinput.SocketSpec]) -> None:
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


def check_socket_paths(socks: list[xmlinput.SocketSpec]) -> None:
    """Unix socket paths must fit in sun_path; the private folder of every attempt has the same length."""
    probe = tempfile.mkdtemp(prefix="mlmm-", dir=short_tmpdir())
    os.rmdir(probe)
    for s in socks:
        path = f"{probe}/{s.name}"
        if s.mode == "unix" and len(os.fsencode(path)) > MAX_UNIX_PATH:
            raise SetupError(f"unix socket path {path} is longer than {MAX_UNIX_PATH} bytes; set TMPDIR to a "
                             "short folder")

"""The force client: connect to i-PI, answer its requests with an :class:`Engine`, exit on EXIT.

``mlmm client mm|ml`` ends up in :func:`main`; :func:`serve` is the loop, usable from Python.

Why not ASE's ``SocketClient``: it sets no TCP_NODELAY (a 40 ms/step Nagle stall over inet), never asks for
INIT, cannot return extras and misreads batched POSDATA (ipi.md §1.7). This client does all four, speaks
both message flows (consolidated POSDATA+GETFORCE and the legacy STATUS-polled one) and sends each
FORCEREADY in one ``sendall``. Bytes and units live in :mod:`driver.codec`.
"""
from __future__ import annotations

import errno
import logging
import os
import socket
import time
from typing import TYPE_CHECKING

import numpy as np

from potentials.core.contracts import Engine, ForceResult  # noqa: F401  (re-exported: the client's contract)
from potentials.core.errors import CalculationFailed, MLMMError, ProtocolError, SetupError

from . import codec
from .heartbeat import Heartbeat
from .uncertainty import UncertaintyGuard

if TYPE_CHECKING:
    import argparse

log = logging.getLogger(__name__)

UNIX_PREFIX = "/tmp/ipi_"        # i-PI's default <simulation sockets_prefix>
LOG_EVERY = 1000                 # requests between debug timing lines
# forces beyond this (kJ/mol/nm) mean a blown-up structure: flexible water at 300 K stays below ~1e4, an unrelaxed
# box straight from OpenMM's Modeller reaches ~2e5 (still integrable), a 0.08 nm O-O overlap ~6e9
MAX_FORCE_KJMOL_NM = 1.0e6
CLASH_NM = 0.12                  # atoms of different residues this close: a Lennard-Jones clash
_RETRY = (FileNotFoundError, ConnectionRefusedError, ConnectionResetError, ConnectionAbortedError,
          BlockingIOError, TimeoutError)


# ---------------------------------------------------------------------------------------------- addresses
def parse_address(address: str) -> tuple[socket.AddressFamily, str | tuple[str, int]]:
    """``unix:NAME`` -> ``/tmp/ipi_NAME``; ``unix:PATH`` (contains ``/``) -> PATH; ``[inet:]HOST:PORT`` -> TCP.

    Returns the socket family and the address to ``connect`` to.
    """
    if address.startswith("unix:"):
        name = address[len("unix:"):]
        if not name:
            raise SetupError(f"socket address {address!r}: empty name; use unix:NAME as in <address>NAME</address>")
        path = name if "/" in name else UNIX_PREFIX + name
        if len(os.fsencode(path)) > 107:         # sun_path is 108 bytes including the NUL
            raise SetupError(f"unix socket path {path!r} is longer than 107 bytes; use a shorter name or folder")
        return socket.AF_UNIX, path
    host, sep, port = address.removeprefix("inet:").rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise SetupError(f"socket address {address!r}: expected unix:NAME, unix:/path/to/socket or HOST:PORT "
                         "(port 1-65535)")
    return socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET, (host.strip("[]"), int(port))


def connect(address: str, timeout: float = 120.0) -> socket.socket:
    """Connect to the i-PI server at ``address``, retrying until ``timeout`` seconds (i-PI may not be up yet).

    TCP sockets get TCP_NODELAY: each reply is one small write, which Nagle's algorithm would hold back.
    """
    family, target = parse_address(address)
    deadline = time.monotonic() + timeout
    delay = 0.05
    while True:
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.settimeout(max(0.1, min(5.0, deadline - time.monotonic())))
        try:
            sock.connect(target)
        except OSError as exc:
            sock.close()
            if not (isinstance(exc, _RETRY) or exc.errno in (errno.ECONNREFUSED, errno.ENOENT, errno.EAGAIN)):
                raise SetupError(f"cannot connect to i-PI at {address}: {exc}") from None
            if time.monotonic() + delay > deadline:
                raise SetupError(
                    f"no i-PI server at {address} after {timeout:g} s ({exc.__class__.__name__}: {exc}); start i-PI "
                    f"first and check that its <ffsocket> mode/address match, or raise --timeout") from None
            time.sleep(delay)
            delay = min(2 * delay, 1.0)
            continue
        if family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        log.info("connected to i-PI at %s", address)
        return sock


# ---------------------------------------------------------------------------------------------- loop
def serve(engine: Engine, address: str, *, timeout: float = 120.0, max_steps: int | None = None,
          read_timeout: float | None = 60.0, idle_timeout: float | None = None,
          guard: "ForceGuard | None" = None, heartbeat: "Heartbeat | None" = None) -> int:
    """Connect to i-PI at ``address`` and answer its requests with ``engine`` until EXIT or disconnect.

    Parameters
    ----------
    engine : an :class:`Engine`
    address : ``unix:NAME``, ``unix:/path`` or ``HOST:PORT`` (see :func:`parse_address`)
    timeout : seconds to keep trying to connect
    max_steps : stop after this many answered requests (None: until i-PI says EXIT or closes)
    read_timeout, idle_timeout : seconds, see :class:`driver.codec.Wire`
    guard : checks every result for a blown-up structure (see :class:`ForceGuard`); None: non-finite check only
    heartbeat : tells the watchdog of `mlmm run` when a request arrives and is answered
        (:class:`driver.heartbeat.Heartbeat`); None: no heartbeat

    Returns
    -------
    The number of answered requests (a batched request counts once).
    """
    with connect(address, timeout) as sock:
        return serve_socket(engine, sock, max_steps=max_steps, read_timeout=read_timeout,
                            idle_timeout=idle_timeout, guard=guard, heartbeat=heartbeat)


def serve_socket(engine: Engine, sock: socket.socket, *, max_steps: int | None = None,
                 read_timeout: float | None = 60.0, idle_timeout: float | None = None,
                 guard: "ForceGuard | None" = None, heartbeat: "Heartbeat | None" = None) -> int:
    """The protocol loop on an already connected socket (see :func:`serve`)."""
    try:
        return _loop(engine, codec.Wire(sock, timeout=read_timeout, idle_timeout=idle_timeout), max_steps,
                     guard, heartbeat)
    finally:
        _close_gently(sock)
        if heartbeat is not None:
            heartbeat.close()


def _close_gently(sock: socket.socket, wait: float = 2.0) -> None:
    """Leave with FIN, not RST: read what i-PI already sent until it hangs up (or ``wait`` s).

    Closing with unread bytes (the GETFORCE queued behind POSDATA) makes the kernel send a reset, which kills
    i-PI 3.3's poll thread in the consolidated flow and hangs the whole run (ipi.md §2.7); after a clean FIN
    i-PI drops this client and re-queues its request for another one.
    """
    deadline = time.monotonic() + wait
    try:
        sock.shutdown(socket.SHUT_WR)
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            if not sock.recv(1 << 16):
                break
    except OSError:
        pass


def _loop(engine: Engine, wire: codec.Wire, max_steps: int | None, guard: "ForceGuard | None" = None,
          heartbeat: "Heartbeat | None" = None) -> int:
    initialised, batch_size = False, 1
    reply: bytes | None = None          # FORCEREADY computed at POSDATA, sent at GETFORCE
    served, t_compute, t_first, t_start = 0, 0.0, 0.0, time.perf_counter()
    structures, computed, t_wire = 0, 0, 0.0     # for the summary line at the end (benchmarks, tests)
    while max_steps is None or served < max_steps:
        header, before = wire.recv_header(), served
        if header is None:
            log.info("i-PI closed the connection after %d requests", served)
            break
        if header == codec.STATUS:
            wire.send(codec.HAVEDATA if reply is not None else codec.READY if initialised else codec.NEEDINIT,
                      "a status reply")
        elif header == codec.INIT:
            info = wire.recv_init()
            initialised, batch_size = True, info.batch_size
            log.debug("INIT rid=%d batch_size=%d params=%s", info.rid, info.batch_size, info.params)
        elif header == codec.POSDATA:
            if reply is not None:
                raise ProtocolError("i-PI sent POSDATA while the previous forces were not collected with GETFORCE")
            if heartbeat is not None:
                heartbeat.begin()
            t0 = time.perf_counter()
            positions, boxes = wire.recv_posdata(batch_size, engine.natoms)
            asked = wire.take_queued(codec.GETFORCE)       # consolidated flow: GETFORCE came with POSDATA
            t1 = time.perf_counter()
            n_real = distinct_prefix(positions, boxes)
            reply = evaluate(engine, positions, boxes, batched=batch_size > 1, n_compute=n_real, guard=guard,
                             request=served + 1)
            t_wire, t_compute = t_wire + t1 - t0, t_compute + time.perf_counter() - t1
            t_first = t_compute if served == 0 else t_first        # warm-up (compilation, caches) in request 1
            structures, computed = structures + len(positions), computed + n_real
            if asked:
                t_wire += _answer(wire, reply, heartbeat)
                reply, served = None, served + 1
        elif header == codec.GETFORCE:
            if reply is None:
                raise ProtocolError("i-PI sent GETFORCE before any POSDATA")
            t_wire += _answer(wire, reply, heartbeat)
            reply, served = None, served + 1
        else:                            # EXIT; recv_header rejects anything else
            log.info("i-PI sent EXIT after %d requests", served)
            break
        if served > before and served % LOG_EVERY == 0:
            wall = time.perf_counter() - t_start
            log.debug("%d requests: %.2f ms compute, %.2f ms total per request", served,
                      1e3 * t_compute / served, 1e3 * wall / served)
    # one parseable line, read by tests/driver/test_pimd.py and tests/bench/bench_pimd.py: structures received
    # (i-PI's batch padding included), structures computed (padding skipped), time in the engine (first_s: of
    # it, the first request's: compilation, caches) and on the wire
    # plus the engine's own split of compute_s if it keeps one (MLEngine.timings: coupling_s network_s output_s)
    split = "".join(f" {k}_s={v:.6f}" for k, v in getattr(engine, "timings", {}).items())
    log.info("summary: requests=%d structures=%d computed=%d batch_size=%d compute_s=%.6f first_s=%.6f wire_s=%.6f "
             "wall_s=%.6f%s", served, structures, computed, batch_size, t_compute, t_first, t_wire,
             time.perf_counter() - t_start, split)
    return served


def _answer(wire: codec.Wire, reply: bytes, heartbeat: "Heartbeat | None") -> float:
    """Send a FORCEREADY reply (one ``sendall``); returns the seconds it took."""
    t0 = time.perf_counter()
    wire.send(reply, "FORCEREADY")
    if heartbeat is not None:
        heartbeat.end()
    return time.perf_counter() - t0


def distinct_prefix(positions: np.ndarray, boxes: np.ndarray | None) -> int:
    """How many leading structures of a batch to compute: i-PI pads a short batch by repeating the last
    structure (ipi.md §1.6), so trailing exact copies of the last one are dropped (their results are the
    last one's, the engines being deterministic)."""
    n = len(positions)
    while n > 1 and np.array_equal(positions[n - 2], positions[-1]) and \
            (boxes is None or np.array_equal(boxes[n - 2], boxes[-1])):
        n -= 1
    return n


def evaluate(engine: Engine, positions: np.ndarray, boxes: np.ndarray | None, *, batched: bool,
             n_compute: int | None = None, guard: "ForceGuard | None" = None, request: int = 0) -> bytes:
    """Run ``engine`` on (B, N, 3) nm positions and return the encoded FORCEREADY reply.

    ``n_compute``: compute only the first structures and repeat the last result for the rest (the batch padding,
    see :func:`distinct_prefix`). Refuses to send non-finite or misshapen results: i-PI would integrate them
    silently. ``guard`` (optional) also refuses forces beyond its threshold and names the atoms and the likely
    cause; ``request`` is the number of the request, for its message.
    """
    nbatch, natoms = positions.shape[0], positions.shape[1]
    n_compute = nbatch if n_compute is None else max(1, min(n_compute, nbatch))
    try:
        results = engine.compute(positions[:n_compute], None if boxes is None else boxes[:n_compute])
        results = list(results) + [results[-1]] * (nbatch - n_compute) if len(results) == n_compute else results
    except MLMMError:
        raise
    except Exception as exc:                     # engine-library errors (OpenMMException, torch) -> one line
        log.debug("engine failure", exc_info=True)
        raise CalculationFailed(f"{type(engine).__name__}.compute failed: {type(exc).__name__}: {exc}") from exc
    if len(results) != nbatch:
        raise CalculationFailed(f"{type(engine).__name__} returned {len(results)} results for {nbatch} structures")
    energies = np.array([r.energy for r in results], dtype=np.float64)
    forces = np.stack([np.asarray(r.forces, dtype=np.float64) for r in results])
    virials = np.stack([np.asarray(r.virial, dtype=np.float64) for r in results])
    if forces.shape != (nbatch, natoms, 3) or virials.shape != (nbatch, 3, 3):
        raise CalculationFailed(f"{type(engine).__name__} returned forces {forces.shape[1:]} / virial "
                                f"{virials.shape[1:]}, expected ({natoms}, 3) / (3, 3)")
    for b in range(nbatch):
        bad = np.flatnonzero(~np.isfinite(forces[b]).all(axis=1))
        if guard is not None:
            guard.check(engine, positions[b], boxes[b] if boxes is not None else None, energies[b], forces[b],
                        request, b)
        if not np.isfinite(energies[b]) or bad.size or not np.isfinite(virials[b]).all():
            raise CalculationFailed(
                f"{type(engine).__name__} returned a non-finite energy ({energies[b]}), forces "
                f"(atoms {bad[:10].tolist()}{'...' if bad.size > 10 else ''}) or virial for structure {b}; the "
                "structure has probably blown up (time step too large, bad starting geometry, ML model outside "
                "its training domain). Not sending it to i-PI.")
    if getattr(guard, "uncertainty", None) is not None:       # a committee's spread (driver/uncertainty.py)
        guard.uncertainty.observe(results[:n_compute], request)
    extras = [codec.encode_extras(r.extras) for r in results]
    return codec.encode_forceready(energies, forces, virials, extras, batched)


class ForceGuard:
    """Stops a client on a blown-up structure: non-finite energy/forces, or an atom's force above ``max_force``
    (kJ/mol/nm). The error names the request, the worst atoms (index, atom, residue, ML/MM) and the likely cause:
    a Lennard-Jones clash (atoms of different residues closer than `CLASH_NM`), an ML-zone geometry outside the
    model's training domain (the worst atom is an ML atom), or too large a time step.

    ``spec``: the system (`potentials.core.spec.SystemSpec`); its PDB is read only when something went wrong.
    ``uncertainty``: a :class:`driver.uncertainty.UncertaintyGuard` watching a committee's spread, or None.
    """

    def __init__(self, spec, max_force: float = MAX_FORCE_KJMOL_NM, uncertainty=None):
        if not max_force > 0:
            raise SetupError(f"--max-force {max_force}: must be a positive force in kJ/mol/nm")
        self.spec, self.max_force, self.uncertainty = spec, float(max_force), uncertainty

    def _labels(self) -> list[str]:
        from openmm import app

        try:
            top = app.PDBFile(str(self.spec.structure_path)).topology
        except Exception:                            # a label is a courtesy: never hide the real error behind it
            return []
        ml = set(self.spec.ml.indices)
        return [f"{a.name} {a.residue.name} {a.residue.id}, {'ML' if a.index in ml else 'MM'}" for a in top.atoms()]

    def check(self, engine: Engine, pos: np.ndarray, box: np.ndarray | None, energy: float, forces: np.ndarray,
              request: int, b: int) -> None:
        """Raise CalculationFailed if structure ``b`` (positions nm, forces kJ/mol/nm) looks blown up."""
        norm = np.linalg.norm(forces, axis=1)
        finite = bool(np.isfinite(energy)) and bool(np.isfinite(norm).all())
        if finite and (norm.size == 0 or norm.max() <= self.max_force):
            return
        score = np.where(np.isfinite(norm), norm, np.inf)
        worst = np.argsort(-score, kind="stable")[:3]
        labels = self._labels()
        names = ml_worst = None
        if len(labels) == len(pos):
            names = labels
            ml_worst = labels[worst[0]].endswith("ML")
        describe = "; ".join(f"atom {i} ({names[i] if names else '?'}) |F| = {norm[i]:.3g}" for i in worst)
        # nearest other atom of the worst one: in another residue and this close, it is a clash
        d = np.linalg.norm(pos - pos[worst[0]], axis=1)
        d[worst[0]] = np.inf
        if box is not None and np.any(box):                   # minimum image, rows = box vectors (nm)
            frac = (pos - pos[worst[0]]) @ np.linalg.inv(box)
            d = np.linalg.norm((frac - np.round(frac)) @ box, axis=1)
            d[worst[0]] = np.inf
        j = int(np.argmin(d)) if np.isfinite(d).any() else None
        res = [n.split(", ")[0].split(" ", 1)[1] for n in names] if names else None
        if j is not None and res and d[j] < CLASH_NM and res[j] != res[worst[0]]:
            cause = (f"a Lennard-Jones clash: atom {worst[0]} and atom {j} ({names[j]}) of another residue are "
                     f"{d[j]:.3f} nm apart (relax the structure: mlmm prepare / mlmm optimize)")
        elif ml_worst:
            cause = ("an ML-zone geometry outside the model's training domain (or too large a time step): "
                     "check the model's card, lower the time step, optimise the start with mlmm optimize")
        else:
            cause = "too large a time step or a bad starting structure: lower <timestep>, relax the structure first"
        what = f"non-finite energy ({energy}) or forces" if not finite else \
            f"forces above --max-force {self.max_force:.3g} kJ/mol/nm"
        raise CalculationFailed(f"exploding structure at request {request} (structure {b}): {type(engine).__name__} "
                                f"returned {what}; worst atoms: {describe}; likely cause: {cause}. Not sending it "
                                "to i-PI.")


# ---------------------------------------------------------------------------------------------- CLI
def main(args: argparse.Namespace) -> int:
    """``mlmm client KIND --system S --address A [--model M --device D --platform P --timeout T]``; KIND is any
    registered engine kind (:data:`coupling.engines.ENGINES`). ``--print-config`` prints the effective system
    spec and serves nothing."""
    from coupling.engines import EngineOptions, build_engine
    from potentials.core import config
    from potentials.core.spec import SystemSpec

    spec = SystemSpec.load(args.system)
    if getattr(args, "print_config", False):
        print(config.describe(spec, title=f"effective system spec of {os.path.abspath(args.system)}"), end="")
        return 0
    if not getattr(args, "address", None):
        raise SetupError("mlmm client needs --address (unix:NAME, unix:/path/to/socket or HOST:PORT)")
    threads = getattr(args, "threads", None)
    if threads is not None and threads < 1:
        raise SetupError(f"--threads {threads}: must be >= 1")
    options = EngineOptions(model=args.model, device=args.device, platform=args.platform, threads=threads,
                            compile=getattr(args, "compile", False), model_type=getattr(args, "model_type", None),
                            dtype=getattr(args, "dtype", None), virial=getattr(args, "virial", EngineOptions.virial),
                            allow_embedding_mismatch=getattr(args, "allow_embedding_mismatch", False))
    uncertainty = UncertaintyGuard.from_args(args) if args.kind == "ml" else None
    engine = build_engine(args.kind, spec, options)
    if uncertainty is not None:
        uncertainty.check_engine(engine)
    max_force = getattr(args, "max_force", None)
    guard = ForceGuard(spec, MAX_FORCE_KJMOL_NM if max_force is None else max_force, uncertainty)
    served = serve(engine, args.address, timeout=args.timeout, guard=guard, heartbeat=Heartbeat.from_env())
    log.info("%s client done: %d requests served", args.kind, served)
    return 0

"""Supervision of one i-PI process and its force clients: start them (each in its own process group, output to
a log file), show progress from i-PI's properties file, and stop all of them whatever happens.

A client that dies makes i-PI hang forever with consolidated messages (ipi.md §2.7), so the supervisor then stops
i-PI itself: SIGTERM (i-PI writes RESTART), SIGKILL after a grace period. Ctrl-C/SIGTERM do the same; a second
Ctrl-C kills at once. Children get SIGTERM when mlmm dies (Linux ``PR_SET_PDEATHSIG``), so nothing is left
holding a GPU or a socket.

The watchdog: every local client keeps a heartbeat (:mod:`driver.heartbeat`); one whose request has waited, or
which has been silent, longer than its limit (``client_timeout`` measured against its own recent request times)
is hung: it is killed and reported like a client that died, so the caller restarts it from RESTART.
"""
from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

from . import heartbeat, trajectory

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SOCKET_WAIT_S = 120.0       # i-PI must open its unix sockets within this (it reads the structure first)
POLL_S = 0.2                # supervisor loop period
IPI_GRACE_S = 20.0          # SIGTERM -> SIGKILL for i-PI (its soft exit checks every 1 s, then writes RESTART)
CLIENT_GRACE_S = 10.0       # after i-PI is gone, clients get this long to exit on their own
EARLY_EXIT_GRACE_S = 30.0   # a client that exits cleanly while i-PI runs: i-PI must finish within this
HOUSEKEEPING_S = 5.0        # period of the caller's housekeeping (checkpoint pruning) while a run goes on


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


class Child:
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


def listening(endpoint: Path | int) -> bool:
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


def last_lines(path: Path, n: int = 3, width: int = 400) -> str:
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


class PropertiesTail:
    """Reads the complete new rows of i-PI's properties file while it grows. ``from_end``: a continued run; only
    the header of what is already there is read (its columns), not its rows."""

    def __init__(self, path: Path | None, from_end: bool = False):
        self.path, self.pos, self.partial = path, 0, b""
        self.columns: dict[str, int] = {}
        if from_end and path is not None and path.is_file():
            with open(path, "rb") as fh:
                for raw in fh:
                    if not raw.startswith(b"#"):
                        break
                    col = trajectory.parse_header_line(raw.decode(errors="replace"))
                    if col is not None:
                        self.columns[col[2].split("(")[0]] = col[0]
                self.pos = fh.seek(0, os.SEEK_END)

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


class Progress:
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


class Supervisor:
    """Starts i-PI and the clients, watches them, and stops all of them whatever happens."""

    def __init__(self, folder: Path, ipi_argv: list[str], clients: dict[str, list[str]],
                 endpoints: list[Path | int], properties: Path | None, total: int, progress: bool,
                 append: bool = False, heartbeats: dict[str, Path] | None = None, client_timeout: float = 0.0,
                 housekeeping: Callable[[], None] | None = None):
        """``endpoints``: what i-PI must open before the clients start: unix socket paths and inet ports.
        ``append``: add to the logs of an earlier attempt (a resumed run) instead of replacing them.
        ``heartbeats``: client name -> the heartbeat file it is told to keep (``MLMM_HEARTBEAT``);
        ``client_timeout``: s, the watchdog's limit (see :func:`driver.heartbeat.limit`), 0 = no watchdog.
        ``housekeeping``: called every `HOUSEKEEPING_S` seconds while the run goes on (pruning checkpoints)."""
        self.folder, self.ipi_argv, self.client_argv, self.endpoints = folder, ipi_argv, clients, endpoints
        self.tail = PropertiesTail(properties, from_end=append)
        self.total, self.progress = total, progress
        self.ipi: Child | None = None
        self.clients: dict[str, Child] = {}
        self.interrupted = 0            # the signal number that stopped the run, 0 if none
        self.crashed: Child | None = None      # the client whose death (or hang) stopped the run
        self.append = append
        self.heartbeats, self.client_timeout = heartbeats or {}, float(client_timeout)
        self.housekeeping, self._kept = housekeeping, time.monotonic()
        self.last_step = 0
        self.lost_socket: str | None = None     # the socket whose poll thread died (see _broken_socket)
        self._log_pos, self._log_partial = 0, b""
        if append:
            try:
                self._log_pos = (folder / "ipi.log").stat().st_size
            except OSError:
                pass
        self.env = dict(os.environ, PYTHONUNBUFFERED="1",
                        PYTHONPATH=os.pathsep.join(p for p in (str(PROJECT_ROOT), os.environ.get("PYTHONPATH"))
                                                   if p))
        self.env.pop(heartbeat.ENV, None)
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
            self.ipi = Child("i-PI", self.ipi_argv, self.folder, self.folder / "ipi.log", self.env, self.append,
                              umask=0o077)
            failure = self._wait_for_sockets()
            if failure:
                return failure
            for name, argv in self.client_argv.items():
                env = dict(self.env, **({heartbeat.ENV: str(self.heartbeats[name])} if name in self.heartbeats
                                        else {}))
                self.clients[name] = Child(name, argv, self.folder, self.folder / f"client_{name}.log", env,
                                            self.append)
            log.info("i-PI and %d client(s) started in %s", len(self.clients), self.folder)
            bar = Progress(self.total, self.progress)
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

    def _children(self) -> list[Child]:
        return ([self.ipi] if self.ipi else []) + list(self.clients.values())

    def _wait_for_sockets(self) -> str | None:
        """Until i-PI listens on every endpoint (bounded, watching i-PI). Never probes a socket by connecting:
        i-PI would take the probe for a client and hang when it goes away (ipi.md §2.7)."""
        deadline = time.monotonic() + SOCKET_WAIT_S
        while True:
            missing = [e for e in self.endpoints if not listening(e)]
            if not missing:
                for e in self.endpoints:          # owner read/write only, before any client connects
                    if isinstance(e, Path):
                        os.chmod(e, 0o600)
                return None
            if self.ipi.rc is not None:
                return (f"i-PI stopped ({self.ipi.describe_exit()}) before opening its sockets: "
                        f"{last_lines(self.ipi.log)}; see {self.ipi.log}")
            if time.monotonic() > deadline:
                return (f"i-PI did not open {', '.join(map(str, missing))} within {SOCKET_WAIT_S:g} s; "
                        f"see {self.ipi.log}")
            time.sleep(POLL_S / 2)

    def _read_progress(self, bar: Progress) -> None:
        for row in self.tail.rows():
            bar.update(row)
            self.last_step = int(row.get("step", self.last_step))

    def _watch(self, bar: Progress) -> str | None:
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
                    return self._died(child)
                if self.ipi.rc is None and now - child.exited_at > EARLY_EXIT_GRACE_S:
                    return (f"client '{child.name}' exited ({child.describe_exit()}) but i-PI did not finish "
                            f"within {EARLY_EXIT_GRACE_S:g} s; logs: {child.log}, {self.ipi.log}")
            hung = self._hung_client()
            if hung:
                return hung
            broken = self._broken_socket()
            if broken:
                return self._dying_client() or broken
            if self.ipi.rc is not None:
                return None     # finished or not: decided from RESTART by the caller
            if self.housekeeping is not None and now - self._kept > HOUSEKEEPING_S:
                self._kept = now
                self.housekeeping()
            time.sleep(POLL_S)

    def _died(self, child: Child) -> str:
        self.crashed = child
        return (f"client '{child.name}' died ({child.describe_exit()}) near step {self.last_step}: "
                f"{last_lines(child.log)}; log: {child.log}")

    def _dying_client(self, wait: float = 5.0) -> str | None:
        """A broken socket is usually a local client that crashed mid-request and is still exiting: report that
        death (the cause, with its last log lines) rather than the socket, if it shows within ``wait`` s."""
        deadline = time.monotonic() + wait
        while True:
            dead = [c for c in self.clients.values() if c.rc not in (0, None)]
            if dead:
                return self._died(dead[0])
            if time.monotonic() > deadline or all(c.rc == 0 for c in self.clients.values()):
                return None
            time.sleep(POLL_S)

    def _hung_client(self) -> str | None:
        """The watchdog: a live client whose heartbeat says it is hung is killed (SIGKILL: a stopped process
        takes no other signal) and reported like a dead one; i-PI is still waiting for it."""
        if self.client_timeout <= 0 or self.ipi.rc is not None:
            return None
        for name, child in self.clients.items():
            beat = heartbeat.read(self.heartbeats[name]) if name in self.heartbeats else None
            reason = heartbeat.hung(beat, self.client_timeout) if beat is not None and child.rc is None else None
            if reason is None:
                continue
            allowed = heartbeat.limit(beat, self.client_timeout)
            child.kill()
            self.crashed = child
            return (f"client '{name}' hung ({reason}; limit {allowed:.3g} s: --client-timeout "
                    f"{self.client_timeout:g} s, its recent requests took up to {beat.slowest:.3g} s) near step "
                    f"{self.last_step}, killed; its last log line: {last_lines(child.log, n=1)}; log: {child.log}")
        return None

    def _broken_socket(self) -> str | None:
        """i-PI's poll thread of a socket died (a client reset its connection mid-request: killed with data
        unread, ipi.md §2.7): i-PI would wait forever. Seen in its log; the name of the socket is kept in
        ``lost_socket`` (the caller says what to do)."""
        if self.ipi.rc is not None:
            return None
        try:
            with open(self.ipi.log, "rb") as fh:
                fh.seek(self._log_pos)
                chunk = fh.read()
        except OSError:
            return None
        self._log_pos += len(chunk)
        m = _POLL_CRASH.search(self._log_partial + chunk)
        self._log_partial = chunk[-256:]
        if m is None:
            return None
        self.lost_socket = m.group(1).decode(errors="replace")
        return (f"a client of i-PI's '{self.lost_socket}' socket dropped its connection in the middle of a request "
                f"(killed or crashed) near step {self.last_step}, which stops i-PI's socket thread; see {self.ipi.log}")

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


def recoverable(child: Child) -> bool:
    """A client death worth an automatic restart: killed by a signal (OOM killer, kill -9, node trouble) or an
    unexpected crash. Exit code 2 is a client's own one-line error (bad input, exploding structure): restarting
    would only repeat it."""
    rc = child.rc
    return rc is not None and rc != 0 and rc != 2


_POLL_CRASH = re.compile(rb"Exception in thread poll_([^\s:]+):")
_GONE = re.compile(r"Client (.+?) died or got unresponsive\((\w)\)")
_TIMEOUT = re.compile(r"Timeout! request has been running for ([\d.]+) sec")
_CONNECTED = re.compile(r"Client asked for connection from (\(.+?\))\.")


def ipi_lost_client(log_path: Path, crashed_socket: str | None = None) -> str | None:
    """What i-PI says about a client it lost, as a phrase naming the client: one it dropped (a remote client's
    socket has ``exit_on_disconnect``, so i-PI then stops and writes RESTART), or, with ``crashed_socket``, the
    one whose reset connection killed that socket's thread (named if one network client was connected); None if
    its log says nothing of it."""
    try:
        with open(log_path, "rb") as fh:
            fh.seek(max(0, fh.seek(0, os.SEEK_END) - 65536))
            text = fh.read().decode(errors="replace")
    except OSError:
        return None
    if crashed_socket is not None:
        peers = list(dict.fromkeys(_CONNECTED.findall(text)))
        who = f"the client at {peers[-1]}" if len(peers) == 1 else f"a client of the '{crashed_socket}' socket"
        return f"{who} dropped its connection in the middle of a request (it died or was killed)"
    gone = _GONE.findall(text)
    if not gone:
        return None
    timeouts = _TIMEOUT.findall(text)
    peer = gone[0][0]
    if timeouts:
        return f"the client at {peer} did not answer a request within {float(timeouts[0]):.0f} s (hung, or its node died)"
    return f"the client at {peer} disconnected (it died or was killed)"

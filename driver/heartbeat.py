"""A force client's heartbeat, read by the watchdog of `mlmm run` (:mod:`driver.supervise`).

A client started by `mlmm run` finds the path of a small file in the environment variable ``MLMM_HEARTBEAT``
and keeps one line in it, rewritten in place (``os.pwrite``, no new file): its pid, the requests answered, since
when the request in hand has been pending (0 when idle), the slowest of its recent requests and the time of
the last sign of life. The request loop rewrites it when a request arrives and when its answer is sent; a
background thread every `BEAT_S` seconds, so a client that is idle (waiting for i-PI) stays visibly alive,
while a stopped (SIGSTOP), frozen or swapped-out one does not.

The supervisor reads the line and calls a client hung (:func:`hung`) when a request has been pending, or the
client silent, for longer than ``max(timeout, SLOW_FACTOR x its slowest recent request)``, or ``FIRST_FACTOR x
timeout`` before its first answer (model compilation, caches); silent means for at least 3 beats. A client that
has stopped serving (EXIT) empties the file and is no longer watched. Times are ``time.monotonic()``: one clock for
all processes of a machine (Linux ``CLOCK_MONOTONIC``), which is where the supervisor and its clients run.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

ENV = "MLMM_HEARTBEAT"      # the file a client started by `mlmm run` keeps its heartbeat in
BEAT_S = 1.0                # sign of life while idle
RECENT = 100                # requests the "slowest recent request" is taken over
SLOW_FACTOR = 10.0          # a request this many times slower than the slowest recent one is hung ...
FIRST_FACTOR = 10.0         # ... and the first request (no history: compilation, caches) gets this x timeout
RECORD = 128                # bytes of the line (padded): one pwrite, read whole


class Heartbeat:
    """The writing side (the client). ``begin()`` when a request arrives, ``end()`` when its answer is sent."""

    def __init__(self, path: str | Path):
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        self.served, self.busy_since = 0, 0.0
        self.recent: deque[float] = deque(maxlen=RECENT)
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._write()
        self.thread = threading.Thread(target=self._beat, name="heartbeat", daemon=True)
        self.thread.start()

    @classmethod
    def from_env(cls) -> "Heartbeat | None":
        """The heartbeat `mlmm run` asked for (``MLMM_HEARTBEAT``), None for a client started by hand."""
        path = os.environ.get(ENV)
        if not path:
            return None
        try:
            return cls(path)
        except OSError as exc:             # a watchdog aid: never a reason not to serve
            log.warning("cannot write the heartbeat file %s (%s); the watchdog will not see this client", path, exc)
            return None

    def begin(self) -> None:
        with self.lock:
            self.busy_since = time.monotonic()
            self._write()

    def end(self) -> None:
        with self.lock:
            if self.busy_since:
                self.recent.append(time.monotonic() - self.busy_since)
            self.served, self.busy_since = self.served + 1, 0.0
            self._write()

    def _write(self) -> None:
        slowest = max(self.recent, default=0.0)
        line = f"{os.getpid()} {self.served} {self.busy_since:.3f} {slowest:.4f} {time.monotonic():.3f}\n"
        try:
            os.pwrite(self.fd, line.ljust(RECORD).encode()[:RECORD], 0)
        except OSError:
            pass

    def _beat(self) -> None:
        while not self._stop.wait(BEAT_S):
            with self.lock:
                self._write()

    def close(self) -> None:
        """The client has stopped serving (EXIT, i-PI gone): an empty file, which the watchdog leaves alone."""
        self._stop.set()
        with self.lock:
            try:
                os.ftruncate(self.fd, 0)
                os.close(self.fd)
            except OSError:
                pass


@dataclass(frozen=True)
class Beat:
    """One reading of a heartbeat file (times: ``time.monotonic()``)."""

    pid: int
    served: int                 # requests answered
    busy_since: float           # when the request in hand arrived; 0: idle
    slowest: float              # s, the slowest of the last RECENT requests
    alive: float                # last sign of life


def read(path: str | Path) -> Beat | None:
    """The heartbeat in ``path``; None if there is none (yet) or it cannot be read."""
    try:
        with open(path, "rb") as fh:
            fields = fh.read(RECORD).split()
        pid, served, busy, slowest, alive = fields[:5]
        return Beat(int(pid), int(served), float(busy), float(slowest), float(alive))
    except (OSError, ValueError):
        return None


def limit(beat: Beat, timeout: float) -> float:
    """Seconds a request may stay unanswered (or the client silent) before the client counts as hung."""
    if beat.served == 0:
        return FIRST_FACTOR * timeout
    return max(timeout, SLOW_FACTOR * beat.slowest)


def hung(beat: Beat, timeout: float, now: float | None = None) -> str | None:
    """Why the client of ``beat`` is hung (one phrase), or None if it is not. ``timeout``: s (> 0)."""
    now = time.monotonic() if now is None else now
    allowed = limit(beat, timeout)
    if beat.busy_since and now - beat.busy_since > allowed:
        return f"request {beat.served + 1} unanswered for {now - beat.busy_since:.0f} s"
    if now - beat.alive > max(allowed, 3 * BEAT_S):
        return f"no sign of life for {now - beat.alive:.0f} s (stopped or frozen)"
    return None

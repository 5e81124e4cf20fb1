"""The i-PI socket protocol seen from a client: bytes, layouts and units, nothing else.

This is the only module that knows the wire format (``/work/shared/reference/ipi.md`` §1) and the only place
where atomic units meet the internal ones (nm, kJ/mol), through :mod:`potentials.core.units`.

Wire format (i-PI 3.3): 12-byte ASCII headers, ``int32`` and ``float64`` in native byte order, positions and
cell in bohr, energy and virial in hartree, forces in hartree/bohr. The cell ``h`` travels as 9 doubles in C
order with the lattice vectors as its COLUMNS; engines get boxes with the vectors as ROWS (OpenMM).

Everything read from the socket is checked before it is used to size a buffer, so a garbage length can
neither hang the client nor make it allocate gigabytes: every failure is a :class:`ProtocolError`, except
a well-formed request for a different number of atoms than the engine has (:class:`CalculationFailed`).
"""
from __future__ import annotations

import json
import socket
import time
from dataclasses import dataclass, field

import numpy as np

from potentials.core import units
from potentials.core.errors import CalculationFailed, ProtocolError

HDRLEN = 12


def _header(name: str) -> bytes:
    return name.upper().ljust(HDRLEN).encode("ascii")


STATUS, READY, HAVEDATA, NEEDINIT = map(_header, ("STATUS", "READY", "HAVEDATA", "NEEDINIT"))
INIT, POSDATA, GETFORCE, FORCEREADY, EXIT = map(_header, ("INIT", "POSDATA", "GETFORCE", "FORCEREADY", "EXIT"))
SERVER_HEADERS = frozenset({STATUS, INIT, POSDATA, GETFORCE, EXIT})

# Sanity limits on what the server may announce. They are far above any real ML/MM system and keep a garbage
# length from turning into a multi-GiB allocation (ASE's client tried 24 GiB on a batched POSDATA).
MAX_NATOMS = 10_000_000
MAX_BATCH = 4096
MAX_INIT_BYTES = 1 << 20
MAX_POSDATA_BYTES = 1 << 31

_I32 = np.dtype(np.int32)
_F64 = np.dtype(np.float64)
_CELL_BYTES = 18 * 8            # h and h^-1, 9 doubles each


@dataclass(frozen=True)
class InitInfo:
    """Content of an INIT message.

    rid : i-PI's internal request id (a ForceBead uid, not a bead number).
    params : the ``<parameters>`` of the ``<ffsocket>`` as strings, ``batch_size`` removed.
    batch_size : structures per POSDATA request (1 = the classic protocol).
    """

    rid: int
    params: dict[str, str] = field(default_factory=dict)
    batch_size: int = 1


def parse_init(text: str) -> tuple[dict[str, str], int]:
    """Parse i-PI's INIT string ``" key : value , key : value , , batch_size:8"``.

    Returns the parameters (values kept as strings, split at the first ``:``) and the batch size.
    """
    params: dict[str, str] = {}
    for token in text.split(","):
        key, sep, value = token.partition(":")
        if sep and key.strip():
            params[key.strip()] = value.strip()
    batch = params.pop("batch_size", "1")
    try:
        batch_size = int(batch)
    except ValueError:
        raise ProtocolError(f"INIT string announces batch_size={batch!r}, not an integer") from None
    if not 1 <= batch_size <= MAX_BATCH:
        raise ProtocolError(f"INIT string announces batch_size={batch_size}; allowed 1..{MAX_BATCH}")
    return params, batch_size


def cell_to_box(h_bohr: np.ndarray) -> np.ndarray:
    """i-PI cell(s) ``(..., 3, 3)`` in bohr, vectors as columns -> box(es) in nm, vectors as rows."""
    return np.swapaxes(h_bohr, -1, -2) * units.NM_PER_BOHR


def box_to_cell(box_nm: np.ndarray) -> np.ndarray:
    """Inverse of :func:`cell_to_box`: box rows in nm -> i-PI cell columns in bohr."""
    return np.swapaxes(np.asarray(box_nm, dtype=np.float64), -1, -2) * units.BOHR_PER_NM


def encode_extras(extras: dict) -> bytes:
    """JSON-encode an extras dict (numpy arrays and scalars allowed); an empty dict is sent as no bytes."""
    if not extras:
        return b""
    try:
        return json.dumps(extras, default=_jsonable, separators=(",", ":")).encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise CalculationFailed(f"engine extras are not JSON-serialisable ({exc}); keys: {sorted(extras)}") from None


def _jsonable(obj):
    if isinstance(obj, (np.ndarray, np.generic)):
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON-serialisable")


def encode_forceready(energies: np.ndarray, forces: np.ndarray, virials: np.ndarray,
                      extras: list[bytes], batched: bool) -> bytes:
    """The complete FORCEREADY reply, to be sent with one ``sendall``.

    Parameters
    ----------
    energies : (B,) kJ/mol
    forces : (B, N, 3) kJ/mol/nm
    virials : (B, 3, 3) kJ/mol
    extras : B encoded extras strings (see :func:`encode_extras`)
    batched : use the batched layout of i-PI >= 3.3 (all energies, then nat, all forces, all virials, then
        B length-prefixed extras); otherwise B must be 1 and the classic layout is written.
    """
    energies = np.ascontiguousarray(energies, dtype=_F64) * units.HARTREE_PER_KJMOL
    forces = np.ascontiguousarray(forces, dtype=_F64) * units.HARTREE_PER_BOHR_PER_KJMOL_PER_NM
    virials = np.ascontiguousarray(virials, dtype=_F64) * units.HARTREE_PER_KJMOL
    nbatch, nat = forces.shape[0], forces.shape[1]
    if not batched and nbatch != 1:
        raise ValueError(f"the classic FORCEREADY layout carries one structure, got {nbatch}")
    tails = [np.int32(len(x)).tobytes() + x for x in extras]
    return b"".join([FORCEREADY, energies.tobytes(), np.int32(nat).tobytes(), forces.tobytes(),
                     virials.tobytes(), *tails])


class Wire:
    """Framed reads and writes on one connected client socket.

    Parameters
    ----------
    sock : a connected stream socket; its timeout is set here.
    timeout : seconds, default 60. Limit on reading one part of a message once it has started (and on sends);
        ``None`` blocks forever. A peer that stops in the middle of a message raises ProtocolError after this.
    idle_timeout : seconds, default None. Limit on waiting for the next header. ``None`` waits for ever: i-PI
        may legitimately be idle between requests (other clients still computing, output, checkpoints).
    """

    def __init__(self, sock: socket.socket, *, timeout: float | None = 60.0, idle_timeout: float | None = None):
        self.sock = sock
        self.timeout = timeout
        self.idle_timeout = idle_timeout
        # One socket timeout for everything (toggling blocking mode costs syscalls): the idle wait for a
        # header simply retries on it.
        tick = [t for t in (timeout, idle_timeout) if t is not None]
        sock.settimeout(min(tick) if tick else None)

    # ------------------------------------------------------------------ reads
    def _fill(self, view: memoryview, what: str, at_boundary: bool = False) -> bool:
        """Fill ``view`` completely. Returns False only on a clean EOF at a message boundary."""
        need, got = len(view), 0
        started = time.monotonic()
        while got < need:
            try:
                n = self.sock.recv_into(view[got:], need - got)
            except TimeoutError:
                waited = time.monotonic() - started
                limit = self.idle_timeout if (at_boundary and got == 0) else self.timeout
                if limit is None or waited < limit:
                    continue
                raise ProtocolError(f"timed out after {waited:.1f} s waiting for {what} from i-PI "
                                    f"({got} of {need} bytes received)") from None
            except OSError as exc:
                raise ProtocolError(f"connection to i-PI lost while reading {what}: {exc}") from None
            if n == 0:
                if at_boundary and got == 0:
                    return False
                raise ProtocolError(f"i-PI closed the connection in the middle of {what} "
                                    f"({got} of {need} bytes received)")
            if got == 0:                       # the read timeout counts from the first byte, not the idle wait
                started = time.monotonic()
            got += n
        return True

    def recv_exact(self, nbytes: int, what: str) -> bytearray:
        """Read exactly ``nbytes`` (already checked against the limits) or raise ProtocolError."""
        buf = bytearray(nbytes)
        self._fill(memoryview(buf), what)
        return buf

    def _recv_int32(self, what: str) -> int:
        return int(np.frombuffer(self.recv_exact(4, what), dtype=_I32)[0])

    def recv_header(self) -> bytes | None:
        """The next 12-byte header; None if i-PI closed the connection cleanly between messages."""
        buf = bytearray(HDRLEN)
        if not self._fill(memoryview(buf), "a message header", at_boundary=True):
            return None
        header = bytes(buf)
        if header not in SERVER_HEADERS:
            raise ProtocolError(f"unexpected message header {header!r} from i-PI; known: "
                                f"{sorted(h.decode().strip() for h in SERVER_HEADERS)}")
        return header

    def recv_init(self) -> InitInfo:
        """The body of an INIT message (after its header)."""
        rid = self._recv_int32("INIT request id")
        length = self._recv_int32("INIT string length")
        if not 0 <= length <= MAX_INIT_BYTES:
            raise ProtocolError(f"INIT string length {length} out of range 0..{MAX_INIT_BYTES}")
        text = bytes(self.recv_exact(length, "INIT string")).decode("utf-8", errors="replace")
        params, batch_size = parse_init(text)
        return InitInfo(rid=rid, params=params, batch_size=batch_size)

    def recv_posdata(self, batch_size: int, natoms: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The body of a POSDATA message (after its header).

        Parameters
        ----------
        batch_size : announced at INIT; 1 reads the classic layout (cell, inverse cell, nat, positions),
            more reads the batched one (nat, B x (cell, inverse cell), B x positions).
        natoms : atoms the engine expects; a different count raises CalculationFailed before the positions
            are read. None accepts any count within the limits.

        Returns
        -------
        positions : (B, N, 3) float64, nm (as i-PI sends them: unwrapped unless the ffsocket has pbc='true')
        boxes : (B, 3, 3) float64, nm, lattice vectors as rows
        """
        if batch_size == 1:
            cells = self.recv_exact(_CELL_BYTES, "POSDATA cell")
            nat = self._recv_natoms(1, natoms)
        else:
            nat = self._recv_natoms(batch_size, natoms)
            cells = self.recv_exact(batch_size * _CELL_BYTES, "POSDATA cells")
        pos = self.recv_exact(batch_size * nat * 24, "POSDATA positions")
        h = np.frombuffer(cells, dtype=_F64).reshape(batch_size, 2, 3, 3)[:, 0]
        q = np.frombuffer(pos, dtype=_F64).reshape(batch_size, nat, 3)
        if not (np.isfinite(h).all() and np.isfinite(q).all()):
            raise ProtocolError("i-PI sent non-finite positions or cell (the simulation has blown up on the "
                                "server side, or the stream is corrupt)")
        return q * units.NM_PER_BOHR, cell_to_box(h)

    def _recv_natoms(self, batch_size: int, natoms: int | None) -> int:
        nat = self._recv_int32("POSDATA atom count")
        if not 1 <= nat <= MAX_NATOMS or batch_size * (_CELL_BYTES + 24 * nat) > MAX_POSDATA_BYTES:
            raise ProtocolError(f"POSDATA announces {nat} atoms x {batch_size} structures; allowed 1..{MAX_NATOMS} "
                                f"atoms and {MAX_POSDATA_BYTES >> 20} MiB per message")
        if natoms is not None and nat != natoms:
            raise CalculationFailed(
                f"i-PI sent {nat} atoms but this client's engine has {natoms}: the i-PI input structure and the "
                "system file describe different systems (check <initialize><file> in the XML, and that no "
                "<activelist> is set on the <ffsocket>)")
        return nat

    def take_queued(self, header: bytes) -> bool:
        """Consume ``header`` if it is already waiting in the socket, without blocking; True if it was.

        In i-PI's consolidated flow GETFORCE arrives in the same send as POSDATA. Reading it before computing
        leaves nothing unread while the client works, so if the client is killed mid-request the kernel closes
        the connection with FIN rather than RST: i-PI 3.3 then drops the client and re-queues its request,
        whereas a reset kills its poll thread and hangs the run (ipi.md §2.7)."""
        try:
            peek = self.sock.recv(HDRLEN, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError, TimeoutError):
            return False
        except OSError as exc:
            raise ProtocolError(f"connection to i-PI lost while reading a message header: {exc}") from None
        if peek != header:
            return False
        self.recv_exact(HDRLEN, "a message header")
        return True

    # ------------------------------------------------------------------ writes
    def send(self, data: bytes, what: str) -> None:
        """One ``sendall`` (a header, or a complete FORCEREADY reply)."""
        try:
            self.sock.sendall(data)
        except TimeoutError:
            raise ProtocolError(f"timed out after {self.timeout} s sending {what} to i-PI") from None
        except OSError as exc:
            raise ProtocolError(f"connection to i-PI lost while sending {what}: {exc}") from None

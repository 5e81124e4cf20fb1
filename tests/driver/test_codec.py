"""The i-PI wire codec against i-PI's own encoder/decoder (``ipi.interfaces.sockets.Driver``) on real sockets,
plus a fuzz test: malformed streams end in ProtocolError, never in a hang or another exception."""
from __future__ import annotations

import math
import socket
import threading
import time

import numpy as np
import openmm
import pytest
from ipi.interfaces.sockets import Driver, Status
from ipi.utils.mathtools import abc2h
from ipi.utils.units import unit_to_internal

from driver import codec, units
from driver.client import serve_socket
from potentials.core.errors import CalculationFailed, ProtocolError
from potentials.openmm_engine import OpenMMEngine

RNG = np.random.default_rng(7)


@pytest.fixture
def pair():
    """(i-PI server side as a real ``Driver``, client socket)."""
    a, b = socket.socketpair()
    srv = Driver(a)
    a.close()
    srv.settimeout(5.0)
    b.settimeout(5.0)
    yield srv, b
    srv.close()
    b.close()


def _ready(srv: Driver, batch_size: int = 1) -> Driver:
    srv.status = Status.Up | Status.Ready
    srv.batch_size = batch_size
    return srv


# ------------------------------------------------------------------------------------------------ INIT
@pytest.mark.parametrize("pars, batch, expect", [
    (" model : nn.pt , zone : ml , ", 1, {"model": "nn.pt", "zone": "ml"}),
    (" model : nn.pt , zone : ml , ", 8, {"model": "nn.pt", "zone": "ml"}),
    (" ", 8, {}),
    (" ", 1, {}),
])
def test_init_from_ipi(pair, pars, batch, expect):
    srv, cli = pair
    srv.status = Status.Up | Status.NeedsInit
    srv.batch_size = batch
    srv.initialize(17, pars)                       # i-PI appends batch_size itself when > 1
    wire = codec.Wire(cli)
    assert wire.recv_header() == codec.INIT
    info = wire.recv_init()
    assert (info.rid, info.params, info.batch_size) == (17, expect, batch)


@pytest.mark.parametrize("text", [" batch_size:0", " batch_size:abc", f" batch_size:{codec.MAX_BATCH + 1}"])
def test_init_bad_batch(text):
    with pytest.raises(ProtocolError, match="batch_size"):
        codec.parse_init(text)


# ------------------------------------------------------------------------------------------------ POSDATA
def _triclinic_h_bohr() -> np.ndarray:
    """i-PI cell for a = 1.2, b = 1.3, c = 1.4 nm, alpha/beta/gamma = 80/85/95 deg (columns, bohr)."""
    return abc2h(*(np.array([1.2, 1.3, 1.4]) * units.BOHR_PER_NM), *np.radians([80.0, 85.0, 95.0]))


def test_posdata_classic_units_and_cell(pair):
    srv, cli = pair
    h = _triclinic_h_bohr()
    q = RNG.normal(size=(5, 3)) * 10.0                                  # bohr
    _ready(srv).sendpos(q.ravel(), (h, np.linalg.inv(h)))
    wire = codec.Wire(cli)
    assert wire.recv_header() == codec.POSDATA
    pos, box = wire.recv_posdata(1, natoms=5)
    assert pos.shape == (1, 5, 3) and box.shape == (1, 3, 3)
    np.testing.assert_array_equal(pos[0], q * units.NM_PER_BOHR)
    # the engine's box rows are the lattice vectors: lengths and angles of the cell, in nm
    a, b, c = box[0]
    assert np.allclose([np.linalg.norm(a), np.linalg.norm(b), np.linalg.norm(c)], [1.2, 1.3, 1.4], rtol=1e-12)
    ang = lambda u, v: math.degrees(math.acos(u @ v / np.linalg.norm(u) / np.linalg.norm(v)))  # noqa: E731
    assert np.allclose([ang(b, c), ang(a, c), ang(a, b)], [80.0, 85.0, 95.0], rtol=1e-12)
    assert a[1] == a[2] == b[2] == 0.0                                  # OpenMM's reduced orientation


def test_posdata_batched_padded(pair):
    srv, cli = pair
    nat, nbatch = 4, 4
    reqs = []
    for k in range(3):                          # 3 real structures, padded by i-PI to 4
        h = _triclinic_h_bohr() * (1 + 0.01 * k)
        reqs.append({"id": k, "pars": " ", "pos": RNG.normal(size=3 * nat), "active": np.arange(3 * nat),
                     "cell": (h, np.linalg.inv(h))})
    assert _ready(srv, nbatch).dispatch_send_batch(reqs)
    wire = codec.Wire(cli)
    assert wire.recv_header() == codec.POSDATA
    pos, box = wire.recv_posdata(nbatch, natoms=nat)
    assert wire.recv_header() == codec.GETFORCE         # consolidated: GETFORCE queued right behind
    assert pos.shape == (nbatch, nat, 3)
    for k in range(nbatch):
        r = reqs[min(k, 2)]
        np.testing.assert_array_equal(pos[k], r["pos"].reshape(nat, 3) * units.NM_PER_BOHR)
        np.testing.assert_array_equal(box[k], r["cell"][0].T * units.NM_PER_BOHR)


# ------------------------------------------------------------------------------------------------ FORCEREADY
def _results(nbatch: int, nat: int):
    e = RNG.normal(size=nbatch) * 1e4
    f = RNG.normal(size=(nbatch, nat, 3)) * 1e3
    v = RNG.normal(size=(nbatch, 3, 3)) * 1e3
    x = [codec.encode_extras({"ml.charges": RNG.normal(size=nat), "step": k}) for k in range(nbatch)]
    return e, f, v, x


def test_forceready_classic_read_by_ipi(pair):
    srv, cli = pair
    e, f, v, x = _results(1, 6)
    codec.Wire(cli).send(codec.encode_forceready(e, f, v, x, batched=False), "FORCEREADY")
    pot, force, vir, extra = srv._recv_forces_bulk(6)
    # i-PI's own unit table converts what it received back to kJ/mol exactly (to its 8-digit constants)
    assert pot == pytest.approx(unit_to_internal("energy", "j/mol", 1000.0 * e[0]), rel=1e-12)
    assert pot == pytest.approx(e[0] * units.HARTREE_PER_KJMOL, rel=1e-15)
    np.testing.assert_allclose(force, f[0].ravel() * units.HARTREE_PER_BOHR_PER_KJMOL_PER_NM, rtol=1e-15)
    np.testing.assert_allclose(vir, v[0] * units.HARTREE_PER_KJMOL, rtol=1e-15)
    assert extra["step"] == 0 and len(extra["ml.charges"]) == 6 and "raw" in extra


def test_forceready_batched_read_by_ipi(pair):
    srv, cli = pair
    nbatch, nat = 3, 5
    e, f, v, x = _results(nbatch, nat)
    codec.Wire(cli).send(codec.encode_forceready(e, f, v, x, batched=True), "FORCEREADY")
    srv.batch_size = nbatch
    res = srv._recv_forces_bulk_batch(nat, 2)            # i-PI drops padded results but drains them
    assert len(res) == 2
    for k, (pot, force, vir, extra) in enumerate(res):
        assert pot == pytest.approx(e[k] * units.HARTREE_PER_KJMOL, rel=1e-15)
        np.testing.assert_allclose(force, f[k].ravel() * units.HARTREE_PER_BOHR_PER_KJMOL_PER_NM, rtol=1e-15)
        np.testing.assert_allclose(vir, v[k] * units.HARTREE_PER_KJMOL, rtol=1e-15)
        assert extra["step"] == k
    cli.setblocking(False)
    srv.setblocking(False)
    with pytest.raises(BlockingIOError):                  # every byte consumed: the stream is aligned
        srv.recv(1)


def test_units_match_ipi():
    assert units.BOHR_PER_NM == pytest.approx(unit_to_internal("length", "nanometer", 1.0), rel=1e-15)
    assert units.HARTREE_PER_KJMOL == pytest.approx(unit_to_internal("energy", "j/mol", 1000.0), rel=1e-15)
    h = _triclinic_h_bohr()
    np.testing.assert_allclose(codec.box_to_cell(codec.cell_to_box(h)), h, rtol=1e-15, atol=1e-15)


# ------------------------------------------------------------------------------------------------ fuzz
@pytest.fixture(scope="module")
def water_engine():
    """A 3-atom flexible water, non-periodic, Reference platform."""
    system = openmm.System()
    for m in (15.999, 1.008, 1.008):
        system.addParticle(m)
    bonds = openmm.HarmonicBondForce()
    bonds.addBond(0, 1, 0.09572, 462750.4)
    bonds.addBond(0, 2, 0.09572, 462750.4)
    system.addForce(bonds)
    angle = openmm.HarmonicAngleForce()
    angle.addAngle(1, 0, 2, 1.82421813, 836.8)
    system.addForce(angle)
    return OpenMMEngine(system, platform="Reference")


def _posdata(nat: int, batch: int = 1) -> bytes:
    h = np.eye(3) * 30.0
    cells = np.concatenate([h.ravel(), np.linalg.inv(h).ravel()])
    q = (np.array([[0.0, 0.0, 0.0], [1.8, 0.0, 0.0], [-0.45, 1.75, 0.0]]) + 5.0)[:nat] if nat <= 3 \
        else np.zeros((nat, 3))
    if batch == 1:
        return codec.POSDATA + cells.tobytes() + np.int32(nat).tobytes() + q.tobytes()
    return codec.POSDATA + np.int32(nat).tobytes() + np.tile(cells, batch).tobytes() + np.tile(q.ravel(),
                                                                                               batch).tobytes()


def _init(text: str = " ") -> bytes:
    return codec.INIT + np.int32(3).tobytes() + np.int32(len(text)).tobytes() + text.encode()


def _session() -> tuple[bytes, set[int]]:
    """A valid legacy-flow session and its message boundaries (byte offsets)."""
    parts = [codec.STATUS, _init(), codec.STATUS, _posdata(3), codec.STATUS, codec.GETFORCE, codec.STATUS,
             _posdata(3), codec.GETFORCE, codec.EXIT]
    bounds, off = {0}, 0
    for p in parts:
        off += len(p)
        bounds.add(off)
    return b"".join(parts), bounds


def _run(engine, stream: bytes, *, close: bool = True, read_timeout: float = 0.5, idle_timeout: float = 1.0):
    """Feed ``stream`` to the client loop over a real socket pair; returns (result or exception, seconds)."""
    srv, cli = socket.socketpair()

    def feed():
        try:
            srv.sendall(stream)
            if close:
                srv.shutdown(socket.SHUT_WR)
            while srv.recv(65536):                     # drain the client's replies until it closes
                pass
            srv.shutdown(socket.SHUT_WR)               # then hang up, as i-PI does with a failed client
        except OSError:
            pass

    writer = threading.Thread(target=feed, daemon=True)
    writer.start()
    t0 = time.monotonic()
    try:
        out = serve_socket(engine, cli, read_timeout=read_timeout, idle_timeout=idle_timeout)
    except Exception as exc:                           # noqa: BLE001 - the test inspects the type
        out = exc
    finally:
        cli.close()
    elapsed = time.monotonic() - t0
    writer.join(5.0)
    srv.close()
    return out, elapsed


def test_valid_session(water_engine):
    stream, _ = _session()
    out, _ = _run(water_engine, stream)
    assert out == 2


def test_truncated_anywhere(water_engine):
    stream, bounds = _session()
    for k in range(len(stream)):
        out, elapsed = _run(water_engine, stream[:k])
        if k in bounds:
            assert isinstance(out, int), (k, out)       # clean close between messages
        else:
            assert isinstance(out, ProtocolError), (k, out)
        assert elapsed < 2.0


@pytest.mark.parametrize("stream, match", [
    (b"HELLO WORLD!", "unexpected message header"),
    (b"status      ", "unexpected message header"),           # headers are upper case
    (b"POSDATA", "in the middle of a message header"),
    (codec.INIT + np.int32(0).tobytes() + np.int32(-5).tobytes(), "INIT string length"),
    (codec.INIT + np.int32(0).tobytes() + np.int32(2**31 - 1).tobytes(), "INIT string length"),
    (_init(" batch_size:-3"), "batch_size"),
    (_init() + _posdata(3)[:12 + 144] + np.int32(-1).tobytes(), "atoms"),
    (_init() + _posdata(3)[:12 + 144] + np.int32(0).tobytes(), "atoms"),
    (_init() + _posdata(3)[:12 + 144] + np.int32(2**31 - 1).tobytes(), "atoms"),
    (_init(" batch_size:4096") + codec.POSDATA + np.int32(codec.MAX_NATOMS).tobytes(), "atoms"),
    (_init() + codec.GETFORCE, "GETFORCE before"),
    (_init() + _posdata(3) + _posdata(3), "previous forces"),
    (_init() + _posdata(3).replace(np.float64(30.0).tobytes(), np.float64(np.nan).tobytes(), 1), "non-finite"),
    (_init() + _posdata(3)[:-8] + np.float64(np.inf).tobytes(), "non-finite"),
])
def test_malformed(water_engine, stream, match):
    out, elapsed = _run(water_engine, stream)
    assert isinstance(out, ProtocolError), out
    assert match in str(out)
    assert elapsed < 2.0


def test_stalled_server_times_out(water_engine):
    """A peer that stops in the middle of a message (socket left open) -> ProtocolError after read_timeout."""
    out, elapsed = _run(water_engine, _init() + _posdata(3)[:100], close=False, read_timeout=0.3)
    assert isinstance(out, ProtocolError) and "timed out" in str(out)
    assert 0.25 < elapsed < 2.0
    out, elapsed = _run(water_engine, _init(), close=False, idle_timeout=0.3)   # idle between messages
    assert isinstance(out, ProtocolError) and "timed out" in str(out)


def test_atom_count_mismatch(water_engine):
    out, _ = _run(water_engine, _init() + _posdata(5))
    assert isinstance(out, CalculationFailed) and "i-PI sent 5 atoms but this client's engine has 3" in str(out)


def test_mutation_fuzz(water_engine):
    """Random byte flips/insertions/deletions of a valid session: the loop ends within the time bound with a
    clean return, ProtocolError, or CalculationFailed (a mutated atom count or an absurd geometry), and with
    no other exception (no numpy/struct errors, no MemoryError)."""
    stream, _ = _session()
    rng = np.random.default_rng(2024)
    kinds = {"ok": 0, "protocol": 0, "calc": 0}
    for _ in range(300):
        s = bytearray(stream)
        for _ in range(rng.integers(1, 4)):
            k = int(rng.integers(len(s)))
            op = rng.integers(3)
            if op == 0:
                s[k] = int(rng.integers(256))
            elif op == 1:
                s[k:k] = rng.bytes(int(rng.integers(1, 9)))
            else:
                del s[k:k + int(rng.integers(1, 9))]
        out, elapsed = _run(water_engine, bytes(s))
        assert elapsed < 2.0
        if isinstance(out, int):
            kinds["ok"] += 1
        elif isinstance(out, ProtocolError):
            kinds["protocol"] += 1
        elif isinstance(out, CalculationFailed):
            assert "atoms but this client's engine" in str(out) or "non-finite" in str(out), out
            kinds["calc"] += 1
        else:
            raise AssertionError(f"unexpected {type(out).__name__}: {out}")
    assert kinds["protocol"] > 100, kinds

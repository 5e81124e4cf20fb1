"""Zero the device code an sm_XX GPU never loads, so that CUDA wheels compress to a fraction of their size.

Each CUDA shared library holds ``.nv_fatbin`` (the cubins the runtime picks from, one per architecture) and
``__nv_relfatbin`` (relocatable device code, input for a later device link only). This keeps the headers of every
entry (the fatbin still parses) and zeroes the payloads of the relocatable entries and of the cubins for other
architectures. Used to carry gpu4pyscf to a GPU machine whose uploads are size-limited (README.md here).

    python strip_fatbin.py 90 lib1.so lib2.so ...
"""
import struct
import sys

MAGIC = 0xBA55ED50


def sections(buf: bytes) -> dict[str, tuple[int, int]]:
    """name -> (offset, size) of an ELF64 little-endian file's sections."""
    assert buf[:4] == b"\x7fELF" and buf[4] == 2 and buf[5] == 1, "not an ELF64 little-endian file"
    shoff, = struct.unpack_from("<Q", buf, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", buf, 0x3A)
    heads = [struct.unpack_from("<IIQQQQ", buf, shoff + i * shentsize) for i in range(shnum)]
    stroff = heads[shstrndx][4]
    out = {}
    for name, _type, _flags, _addr, off, size in heads:
        end = buf.index(b"\0", stroff + name)
        out[buf[stroff + name:end].decode()] = (off, size)
    return out


def entries(buf: bytes, off: int, size: int):
    """The entries (kind, sm, payload offset, payload size) of the fatbins in a section."""
    p, end = off, off + size
    while p + 16 <= end:
        magic, _ver, hsz, fsz = struct.unpack_from("<IHHQ", buf, p)
        if magic != MAGIC:
            p += 8
            continue
        q, qend = p + hsz, p + hsz + fsz
        while q < qend:
            kind, _ev, ehs, pad = struct.unpack_from("<HHII", buf, q)
            sm, = struct.unpack_from("<I", buf, q + 28)
            yield kind, sm, q + ehs, pad
            q += ehs + pad
        p = qend


def strip(path: str, keep_sm: int) -> int:
    buf = bytearray(open(path, "rb").read())
    secs, zeroed = sections(bytes(buf)), 0
    for name in (".nv_fatbin", "__nv_relfatbin"):
        if name not in secs:
            continue
        for _kind, sm, at, size in list(entries(bytes(buf), *secs[name])):
            if name == "__nv_relfatbin" or sm != keep_sm:
                buf[at:at + size] = bytes(size)
                zeroed += size
    if zeroed:
        open(path, "wb").write(buf)
    return zeroed


if __name__ == "__main__":
    keep = int(sys.argv[1])
    total = sum(strip(p, keep) for p in sys.argv[2:])
    print(f"zeroed {total / 1e6:.1f} MB of device code not for sm_{keep}")

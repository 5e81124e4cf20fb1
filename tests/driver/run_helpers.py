"""Helpers shared by the driver tests that start real i-PI runs."""
from __future__ import annotations

import os
from pathlib import Path


def procs_in(folder: Path) -> dict[int, str]:
    """Processes whose working directory is ``folder`` (i-PI and the clients run there): pid -> cmdline."""
    out = {}
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            if os.readlink(p / "cwd") == str(folder):
                out[int(p.name)] = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
    return out

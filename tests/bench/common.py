"""Helpers shared by the benchmark scripts (run as ``python tests/bench/NAME.py``: this folder is on sys.path)."""
from __future__ import annotations

import platform
import re
from pathlib import Path

import numpy as np


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as fh:
            return next(ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def client_summary(log: Path) -> dict[str, float]:
    """The numbers of a client's closing ``summary:`` line (driver/client.py); {} if it has none."""
    found = re.findall(r"summary: (.*)", Path(log).read_text())
    return {k: float(v) for k, v in (kv.split("=") for kv in found[-1].split())} if found else {}


def ipi_step_time(run_folder: Path, skip: int) -> float:
    """Median of i-PI's per-step ``t/step`` (printed at verbosity high) after the first ``skip`` steps, s."""
    text = (Path(run_folder) / "ipi.log").read_text()
    tsteps = [float(x) for x in re.findall(r"t/step:\s*([0-9.eE+-]+)", text)]
    return float(np.median(tsteps[skip:])) if len(tsteps) > skip else float("nan")


def write_report(path: Path, text: str) -> None:
    """Write a benchmark's markdown report (parent folders made), print it, and say where it went."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text if text.endswith("\n") else text + "\n")
    print(f"{text}\nwrote {path}")

"""Benchmark: forward + backward (forces) time and peak memory of the network vs ML-zone size.

Ours (EmbeddedAIMNet2 at the AIMNet2 sizes of inputs/models/configs/aimnet2.toml, embedding on, random
weights, random φ/E, gradients w.r.t. positions, φ and E) side by side with the `aimnet` package's AIMNet2
(built from its models/aimnet2.yaml, random weights, ``AIMNet2Calculator(..., forces=True)``). Both include
their neighbour list and the all-pairs ML–ML Coulomb sum. Structures: spherical water clusters at liquid
density (random orientations, 0.2 Å jitter).

Each (implementation, size) runs in its own subprocess so that its peak memory is its own: CPU peak =
growth of ``ru_maxrss`` over the process's state just before the first call; CUDA peak =
``torch.cuda.max_memory_allocated``. Time = best of ``reps`` calls after one warm-up call.

    python tests/bench/bench_network.py --sizes 10 100 1000 10000 [--device cpu|cuda] [--threads 2]

writes tests/bench/results/network_<device>.md. Not a test: no timing is asserted anywhere.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import cpu_name, write_report  # noqa: E402

CONFIG = ROOT / "inputs" / "models" / "configs" / "aimnet2.toml"


def water_cluster(n_atoms: int, seed: int = 0):
    """Spherical cluster of water molecules at 0.0334 molecules/Å³ (coordinates Å), truncated to n_atoms."""
    import torch
    g = torch.Generator().manual_seed(seed)
    n_mol = math.ceil(n_atoms / 3)
    a = (1.0 / 0.0334) ** (1 / 3)
    k = math.ceil(n_mol ** (1 / 3)) + 2
    grid = torch.stack(torch.meshgrid(*[torch.arange(k, dtype=torch.float64)] * 3, indexing="ij"), -1).reshape(-1, 3)
    grid = (grid - (k - 1) / 2) * a
    centres = grid[torch.argsort(grid.norm(dim=1))[:n_mol]]
    theta = math.radians(104.52) / 2
    local = torch.tensor([[0.0, 0.0, 0.0], [0.9572 * math.sin(theta), 0.0, 0.9572 * math.cos(theta)],
                          [-0.9572 * math.sin(theta), 0.0, 0.9572 * math.cos(theta)]], dtype=torch.float64)
    rot, _ = torch.linalg.qr(torch.randn(n_mol, 3, 3, generator=g, dtype=torch.float64))
    xyz = centres[:, None] + local @ rot.transpose(1, 2) + 0.2 * torch.randn(n_mol, 1, 3, generator=g,
                                                                             dtype=torch.float64)
    numbers = torch.tensor([8, 1, 1]).repeat(n_mol)
    return numbers[:n_atoms], xyz.reshape(-1, 3)[:n_atoms]


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def worker(impl: str, n: int, device: str, reps: int, threads: int) -> dict:
    import torch
    torch.set_num_threads(threads)
    numbers, xyz = water_cluster(n)
    numbers, xyz = numbers.to(device), xyz.float().to(device)
    if impl == "ours":
        from potentials.network import EmbeddedAIMNet2, ModelConfig, count_parameters
        model = EmbeddedAIMNet2(ModelConfig.from_toml(CONFIG)).to(device).eval().requires_grad_(False)
        g = torch.Generator().manual_seed(1)
        phi0 = (torch.randn(n, generator=g)).to(device)
        ef0 = (0.5 * torch.randn(n, 3, generator=g)).to(device)
        mol = torch.zeros(n, dtype=torch.long, device=device)
        charge = torch.zeros(1, device=device)

        def call():
            pos = xyz.clone().requires_grad_()
            phi, ef = phi0.clone().requires_grad_(), ef0.clone().requires_grad_()
            e = model(numbers, pos, mol, charge, phi, ef)["energy"]
            return torch.autograd.grad(e.sum(), [pos, phi, ef])
    else:
        import logging
        logging.disable(logging.WARNING)
        import aimnet
        from aimnet.calculators import AIMNet2Calculator
        from aimnet.config import build_module
        model = build_module(os.path.join(os.path.dirname(aimnet.__file__), "models", "aimnet2.yaml"))
        calc = AIMNet2Calculator(model, device=device)
        data = {"coord": xyz, "numbers": numbers, "charge": torch.zeros(1, device=device)}

        def call():
            return calc(data, forces=True)["forces"]
    params = sum(p.numel() for p in model.parameters())
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    rss0 = _rss_mb()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    call()
    sync()
    times, cpu = [], []
    for _ in range(reps):
        t, c = time.perf_counter(), time.process_time()
        call()
        sync()
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if device.startswith("cuda") else _rss_mb() - rss0
    return {"impl": impl, "n": n, "params": params, "best_s": min(times), "cpu_s": min(cpu),
            "mean_s": sum(times) / len(times), "peak_mb": peak}


def machine(device: str, threads: int) -> str:
    import torch
    cpu = cpu_name()
    s = f"{cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__}, {threads} torch threads"
    if device.startswith("cuda"):
        s += f", GPU {torch.cuda.get_device_name(device)}"
    return s


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 1000, 10000])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: stable timings on a shared machine)")
    ap.add_argument("--impls", nargs="+", default=["ours", "aimnet"], choices=["ours", "aimnet"])
    ap.add_argument("--timeout", type=float, default=400.0, help="seconds per (implementation, size)")
    ap.add_argument("--out", default=None, help="markdown table (default tests/bench/results/network_<dev>.md)")
    ap.add_argument("--worker", nargs=2, metavar=("IMPL", "N"), help=argparse.SUPPRESS)
    ap.add_argument("--reps", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        n = int(args.worker[1])
        reps = args.reps or (10 if n <= 100 else 3 if n <= 3000 else 1)
        print(json.dumps(worker(args.worker[0], n, args.device, reps, args.threads)))
        return
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(ROOT)}
    rows = {}
    for n in args.sizes:
        for impl in args.impls:
            cmd = [sys.executable, __file__, "--worker", impl, str(n), "--device", args.device,
                   "--threads", str(args.threads)]
            try:
                p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
                line = [x for x in p.stdout.splitlines() if x.startswith("{")]
                rows[impl, n] = json.loads(line[-1]) if p.returncode == 0 and line else \
                    {"error": (p.stderr.strip().splitlines() or ["exit %d" % p.returncode])[-1][:80]}
            except subprocess.TimeoutExpired:
                rows[impl, n] = {"error": f"did not finish in {args.timeout:.0f} s"}
            print(impl, n, rows[impl, n], flush=True)
    header = ("| atoms | ours: wall (s) | ours: CPU (s) | ours: peak (MB) | aimnet: wall (s) | aimnet: CPU (s) "
              "| aimnet: peak (MB) | speed-up (wall / CPU) |\n|---:|---:|---:|---:|---:|---:|---:|---:|\n")
    lines = []
    for n in args.sizes:
        o, a = rows.get(("ours", n), {}), rows.get(("aimnet", n), {})

        def cell(r, key, fmt):
            return fmt.format(r[key]) if key in r else (r.get("error", "not run"))
        speed = (f"{a['best_s'] / o['best_s']:.1f}x / {a['cpu_s'] / o['cpu_s']:.1f}x"
                 if "best_s" in o and "best_s" in a else "-")
        lines.append(f"| {n} | {cell(o, 'best_s', '{:.4f}')} | {cell(o, 'cpu_s', '{:.4f}')} "
                     f"| {cell(o, 'peak_mb', '{:.0f}')} | {cell(a, 'best_s', '{:.4f}')} | {cell(a, 'cpu_s', '{:.4f}')} "
                     f"| {cell(a, 'peak_mb', '{:.0f}')} | {speed} |")
    params = {impl: r["params"] for (impl, _), r in rows.items() if "params" in r}
    text = (f"# Network benchmark ({args.device})\n\nMachine: {machine(args.device, args.threads)}.\n\n"
            f"Forward + backward (forces; ours also ∂E/∂φ and ∂E/∂E) of one water cluster, neighbour list and "
            f"all-pairs ML–ML Coulomb sum included, best of several calls after a warm-up (wall clock and the "
            f"process's CPU time of that call; on a shared machine the CPU time is the steadier number). "
            f"Parameters: ours {params.get('ours', '?')}, aimnet {params.get('aimnet', '?')}. Peak memory: growth "
            f"of max RSS (CPU) or of max allocated (CUDA) during the calls.\n\n" + header + "\n".join(lines) + "\n")
    default = ROOT / "tests" / "bench" / "results" / f"network_{args.device.split(':')[0]}.md"
    out = Path(args.out) if args.out else default
    write_report(out, text)


if __name__ == "__main__":
    main()

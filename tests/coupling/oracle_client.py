"""An ML client that serves the force-field oracle instead of the network (for the NVE test through i-PI).

    python tests/coupling/oracle_client.py --system system.toml --address unix:/path/ml

Same engine (:class:`coupling.ml_engine.MLEngine`) and socket loop (:func:`driver.client.serve`) as
``mlmm client ml``; only the potential differs, so the run checks the coupling, not a trained model.
"""
import argparse
import logging
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from oracle import ForceFieldOracle  # noqa: E402

from coupling.ml_engine import MLEngine  # noqa: E402
from coupling.zones import ml_numbers  # noqa: E402
from coupling.mmsystem import mm_environment  # noqa: E402
from driver.client import serve  # noqa: E402
from potentials.core.spec import SystemSpec  # noqa: E402
from potentials.openmm_system import load_system  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--system", required=True)
    p.add_argument("--address", required=True)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO)
    torch.set_num_threads(1)
    spec = SystemSpec.load(args.system)
    topology, system, _ = load_system(spec)
    ml = np.asarray(spec.ml.indices, dtype=np.int64)
    engine = MLEngine(ForceFieldOracle(system, ml), ml_numbers(topology, ml), spec.ml.charge,
                      mm_environment(system, topology, ml, spec), mode=spec.coupling.embedding,
                      periodic=spec.structure.periodic)
    serve(engine, args.address, timeout=120)
    return 0


if __name__ == "__main__":
    sys.exit(main())

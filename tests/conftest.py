"""Fixtures shared by the test folders."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

if os.environ.get("PYTEST_XDIST_WORKER"):
    # the README's test command runs two workers (pytest -n 2): one torch thread each, so that the workers do not
    # oversubscribe a 2-core machine (the clients and i-PI that tests start are separate processes)
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def methanol_box_factory(tmp_path_factory):
    """make(name, seed, double) -> (system.toml, model file): the methanol example prepared in 117 TIP3P waters
    (about 357 atoms, PME, MM cutoff 0.7 nm, embedding cutoff 0.5 nm) and a tiny network with random weights
    (float64 if ``double``, e.g. for finite differences). `mlmm prepare` runs once per session (its default seed
    makes it reproducible byte for byte, tests/driver/test_prepare_seed.py): each call gets its own copy."""
    import shutil

    from driver.cli import main as cli
    from potentials.model_io import save_model
    from potentials.network import EmbeddedAIMNet2, ModelConfig

    prepared: list[Path] = []

    def make(name: str, seed: int, double: bool = False) -> tuple[Path, Path]:
        folder = tmp_path_factory.mktemp(name)
        if not prepared:
            once = tmp_path_factory.mktemp("methanol_box") / "prep"
            assert cli(["prepare", str(ROOT / "inputs/examples/methanol/input.pdb"), "--ml", "resname MOL",
                        "--solvate", "0.8", "--embedding-cutoff", "0.5", "--mm-cutoff", "0.7",
                        "--out", str(once)]) == 0
            prepared.append(once)
        shutil.copytree(prepared[0], folder / "prep")
        model = EmbeddedAIMNet2(ModelConfig.from_toml(ROOT / "inputs/models/configs/tiny.toml",
                                                      elements=[1, 6, 7, 8]), seed=seed)
        save_model(folder / "tiny.pt", model.double() if double else model)
        return folder / "prep" / "system.toml", folder / "tiny.pt"

    return make

"""Small fresh models of other packages' families, built with the packages themselves (random weights, fixed
seed) and saved in each family's own file format; nothing is downloaded. Used by the tests of the family
adapters (potentials/adapters_<family>.py) and by tests/bench."""
from __future__ import annotations

import copy
import warnings
from pathlib import Path

import numpy as np
import torch

# atomic reference energies (eV) of H C N O, roughly those of the released MACE-OFF / AIMNet2 models
E0_EV = {1: -13.57, 6: -1029.41, 7: -1484.27, 8: -2041.84, 16: -10831.26}


def build_mace(path: Path, elements=(1, 6, 7, 8), seed: int = 0, dtype=torch.float64, channels: int = 16) -> Path:
    """A ScaleShiftMACE (2 interactions, ``channels`` x 0e + 1o, r_max 5 Å, correlation 3) saved as mace-torch
    saves its models (``torch.save`` of the model object, like the released MACE-OFF files)."""
    from potentials.adapters_mace import _import_mace

    modules = _import_mace()
    from e3nn import o3

    torch.manual_seed(seed)
    block = modules.interaction_classes["RealAgnosticResidualInteractionBlock"]
    model = modules.ScaleShiftMACE(
        r_max=5.0, num_bessel=8, num_polynomial_cutoff=6, max_ell=2, interaction_cls=block,
        interaction_cls_first=block, num_interactions=2, num_elements=len(elements),
        hidden_irreps=o3.Irreps(f"{channels}x0e+{channels}x1o"), MLP_irreps=o3.Irreps("16x0e"),
        gate=torch.nn.functional.silu, atomic_energies=np.array([E0_EV[z] for z in elements]),
        avg_num_neighbors=8.0, atomic_numbers=list(elements), correlation=3, atomic_inter_scale=1.0,
        atomic_inter_shift=0.0)
    torch.save(model.to(dtype), str(path))
    return Path(path)


def build_aimnet2(folder: Path, seed: int = 0, name: str = "aimnet2_small.pt") -> Path:
    """An AIMNet2 (the package's architecture with D3 and long-range Coulomb, small hidden layers) written in the
    package's current format by its own exporter (``aimnet export``: weights + model YAML + SAE -> v2 file)."""
    import yaml

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import aimnet
        from aimnet.config import build_module
        from aimnet.train.export_model import export_model

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = yaml.safe_load((Path(aimnet.__file__).parent / "models" / "aimnet2_dftd3_wb97m.yaml").read_text())
    kw = cfg["kwargs"]
    kw["hidden"] = [[32, 24], [32, 24], [32, 24, 24]]
    kw["aim_size"] = 32
    kw["outputs"]["energy_mlp"]["kwargs"]["n_in"] = 32
    kw["outputs"]["energy_mlp"]["kwargs"]["mlp"]["hidden"] = [16, 16]
    (folder / "model.yaml").write_text(yaml.dump(cfg, sort_keys=False))
    torch.manual_seed(seed)
    model = build_module(copy.deepcopy(cfg))
    torch.save(model.state_dict(), folder / "weights.pt")
    (folder / "model.sae").write_text("".join(f"{z}: {e}\n" for z, e in E0_EV.items()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_model.callback(str(folder / "weights.pt"), str(folder / name), str(folder / "model.yaml"),
                              str(folder / "model.sae"), None, None, ())
    return folder / name


def build_ani(folder: Path, seed: int = 0) -> dict[str, Path]:
    """A small ANI model (TorchANI's ``simple_ani``, H C N O) saved as a pickled model object and as a TorchScript
    archive, and TorchANI's ANI-2x architecture with random weights saved as the released weights file
    ``ani2x_state_dict.pt`` is (a state dict). Returns {"pickle", "torchscript", "ani2x"} -> path, and the two
    modules under "modules"."""
    from unittest import mock

    import torchani
    from torchani import models
    from torchani.arch import simple_ani

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    small = simple_ani(["H", "C", "N", "O"], "wb97x-631gd", radial_shifts=8, angular_shifts=4, sections=2)
    torch.save(small, folder / "ani_small.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.script(small).save(str(folder / "ani_small.jpt"))
    with mock.patch.object(torchani.arch.ANI, "load_state_dict", lambda self, sd, **k: None), \
            mock.patch.object(models, "_fetch_state_dict", lambda *a, **k: None):
        ani2x = models.ANI2x()                    # the released architecture, random weights
    torch.save(ani2x.state_dict(), folder / "ani2x_state_dict.pt")
    return {"pickle": folder / "ani_small.pt", "torchscript": folder / "ani_small.jpt",
            "ani2x": folder / "ani2x_state_dict.pt", "modules": {"small": small, "ani2x": ani2x}}

"""Field-probe frames: QM/MM labels of molecules in a uniform electric field, for the model's polarisability.

The MD-sampled training frames show the network the fields of nearby water molecules, which are strong but
very non-uniform; nothing in them pins down the response of the ML zone to a *uniform* field, i.e. its
polarisability. These frames add it: for gas-phase geometries of the training solutes, a uniform field F of
``field`` V/Å along ±x, ±y and ±z is applied by a pair of point charges ±q at ∓R along the axis through the
QM centroid (q = F R² / 2k, R = ``distance`` Å: the field is uniform across the molecule to (r/R)² ≈ 1e-3),
and the frame is labelled by the same PySCF QM/MM calculation as every other frame
(:func:`potentials.qmmm_reference.label_frame`), so the energy, the forces on the QM atoms and on the two
charges, and the dipole all carry the field response. They live in their own dataset file (``kind = "field"``,
same layout as ``mlmm label``'s), keep the split of the frame they were made from, and enter training through
``[data] extra = [...]``.

    python -m potentials.field_probes data/qmmm_b3lyp_svp.nc data/field_b3lyp_svp.nc [--per-solute 12]

Resumable: frames already in the output are skipped by id.
"""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np

from potentials.core.units import COULOMB_EV_ANGSTROM

log = logging.getLogger(__name__)

AXES = [(k, s) for k in range(3) for s in (1.0, -1.0)]


def capacitor(centre: np.ndarray, axis: int, sign: float, field: float, distance: float
              ) -> tuple[np.ndarray, np.ndarray]:
    """Positions (2,3) Å and charges (2,) e of the charge pair giving a field ``sign * field`` V/Å along
    ``axis`` at ``centre``: +q at centre − R e, −q at centre + R e (the field points from + to −)."""
    e = np.zeros(3)
    e[axis] = sign
    q = field * distance ** 2 / (2.0 * COULOMB_EV_ANGSTROM)
    return np.stack([centre - distance * e, centre + distance * e]), np.array([q, -q])


def probe_tasks(source: str, per_solute: dict[str, int], solutes: tuple[str, ...] | None = None
                ) -> list[tuple[dict, int, float]]:
    """(source frame, axis, sign) for the first gas-phase frames of each solute (all, or ``solutes``) and
    split in ``source``."""
    from potentials.batches import load_frames

    tasks = []
    for split, n in per_solute.items():
        taken: dict[str, int] = {}
        for f in load_frames(source, split):
            if f["kind"] != "gas" or taken.get(f["solute"], 0) >= n or (solutes and f["solute"] not in solutes):
                continue
            taken[f["solute"]] = taken.get(f["solute"], 0) + 1
            tasks += [(f, axis, sign) for axis, sign in AXES]
    return tasks


def run(source: str, out: str, per_solute: dict[str, int], field: float = 1.0, distance: float = 100.0,
        solutes: tuple[str, ...] | None = None) -> int:
    """Label the field-probe frames of ``source``'s gas frames into ``out``; returns the frames written."""
    from potentials.dataset import DatasetWriter
    from potentials.qmmm_reference import LevelOfTheory, label_frame

    level = LevelOfTheory()
    attrs = {**level.provenance(), "source": str(source), "probe_field_V_per_angstrom": float(field),
             "probe_distance_angstrom": float(distance),
             "description": "uniform-field probes (potentials/field_probes.py) of gas-phase training geometries"}
    writer = DatasetWriter(out, attrs)
    done = writer.frame_ids()
    tasks = probe_tasks(source, per_solute, solutes)
    written, t0 = 0, time.perf_counter()
    for f, axis, sign in tasks:
        fid = f"{f['frame_id']}/field{'+' if sign > 0 else '-'}{'xyz'[axis]}"
        if fid in done:
            continue
        pos = np.asarray(f["positions"], dtype=np.float64)
        mm_pos, mm_q = capacitor(pos.mean(axis=0), axis, sign, field, distance)
        lab = label_frame(f["numbers"], pos, int(f["total_charge"]), mm_pos, mm_q, level)
        writer.append({"frame_id": fid, "trajectory": f["trajectory"], "solute": f["solute"], "kind": "field",
                       "environment": "field", "split": f["split"], "total_charge": int(f["total_charge"]),
                       "temperature": float(f["temperature"]), "displaced": int(f["displaced"]),
                       "block": int(f["block"]), "index_in_block": int(f["index_in_block"]),
                       "numbers": f["numbers"], "positions": pos, "forces": lab.forces,
                       "mm_positions": mm_pos, "mm_charges": mm_q, "mm_forces": lab.mm_forces,
                       "energy": lab.energy, "dipole": lab.dipole, "quadrupole": lab.quadrupole,
                       "scf_cycles": lab.scf_cycles, "seconds": lab.seconds})
        written += 1
        if written % 12 == 0:
            log.info("field probes: %d written (%.0f s)", written, time.perf_counter() - t0)
    return written


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("source", help="QM/MM dataset whose gas-phase frames are probed")
    p.add_argument("out", help="dataset file to write (appended to; frames present are skipped)")
    p.add_argument("--per-solute", type=int, default=12, help="training geometries per solute (default 12)")
    p.add_argument("--val-per-solute", type=int, default=3, help="validation geometries per solute (default 3)")
    p.add_argument("--field", type=float, default=1.0, help="field strength, V/Å (default 1.0)")
    p.add_argument("--distance", type=float, default=100.0, help="charge distance R, Å (default 100)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    n = run(a.source, a.out, {"train": a.per_solute, "val": a.val_per_solute}, a.field, a.distance)
    log.info("field probes: %d frames written to %s", n, Path(a.out))


if __name__ == "__main__":
    main()

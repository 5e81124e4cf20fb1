"""QM jobs that travel: sample here, label on another machine (a GPU node), append here.

``mlmm label`` does three things in one process: MD sampling (OpenMM), the QM/MM labels (PySCF or gpu4pyscf)
and the NetCDF4 dataset. A GPU node often has CUDA, cupy and gpu4pyscf but not OpenMM or netCDF4, so the work
splits at the QM inputs:

1. ``mlmm label --config C --out D.nc --export-jobs J.npz`` samples the MD and writes the QM inputs of the
   frames ``D.nc`` does not hold yet (numbers, positions, charge, embedded point charges) with their dataset
   metadata and the level of theory into one portable file (:func:`export`).
2. ``python -m potentials.qm_jobs J.npz R.npz --qm-device gpu --workers 8`` labels them with
   :func:`potentials.qmmm_reference.label_frame` (numpy and PySCF/gpu4pyscf only), in worker processes, saving
   ``R.npz`` as it goes (atomically, every ``save_every_s``); it resumes from an existing ``R.npz`` and stops
   cleanly at ``--deadline-s`` (:func:`label_jobs`).
3. ``mlmm label --out D.nc --import-labels R.npz`` appends the labelled frames (:func:`import_labels`).

The inputs are exactly those :class:`potentials.qmmm_reference.Labeller` would label (same plan, zone,
embedding, float32 rounding), so a frame labelled this way is the frame ``mlmm label`` would have written.
Both files are plain ``.npz`` (no pickles): arrays of all frames concatenated, with per-frame counts, and JSON
text for the metadata. Units as in the dataset: Å, e, eV, eV/Å.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from potentials.core.errors import CalculationFailed, SetupError

log = logging.getLogger(__name__)

JOBS_FORMAT = "mlmm-qm-jobs/1"
LABELS_FORMAT = "mlmm-qm-labels/1"
_INPUTS = ("numbers", "positions", "mm_positions", "mm_charges")
MAX_ERRORS = 5                  # errors (not SCF failures) tolerated before label_jobs stops
STALL_S = 1800.0                # no frame finishing for this long: a worker died (its frame is lost); stop


def _text(value) -> np.ndarray:
    return np.asarray(json.dumps(value))


def _load(path: str | os.PathLike, fmt: str) -> dict[str, np.ndarray]:
    path = Path(path)
    if not path.exists():
        raise SetupError(f"{path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except (OSError, ValueError) as exc:
        raise SetupError(f"{path} is not a readable .npz file ({exc})") from None
    if str(data.get("format", "")) != fmt:
        raise SetupError(f"{path} is not an {fmt} file (format {str(data.get('format', 'missing'))!r})")
    return data


def _offsets(data: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Where each frame's atoms and point charges start in the concatenated arrays (one extra entry: the end)."""
    return (np.concatenate([[0], np.cumsum(data["n_atoms"])]).astype(int),
            np.concatenate([[0], np.cumsum(data["n_mm"])]).astype(int))


def _packed(inputs: list[dict]) -> dict[str, np.ndarray]:
    """The concatenated input arrays (with per-frame counts) of per-frame QM inputs; :func:`_split` undoes it."""
    col = {k: [np.asarray(x[k]) for x in inputs] for k in _INPUTS}

    def cat(k, dtype, shape):
        return (np.concatenate(col[k]) if inputs else np.zeros(0)).astype(dtype).reshape(shape)

    return dict(n_atoms=np.array([len(n) for n in col["numbers"]], np.int32),
                n_mm=np.array([len(q) for q in col["mm_charges"]], np.int32),
                numbers=cat("numbers", np.int16, -1), positions=cat("positions", np.float64, (-1, 3)),
                mm_positions=cat("mm_positions", np.float32, (-1, 3)), mm_charges=cat("mm_charges", np.float32, -1))


def _split(data: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    """Per-frame input arrays from the concatenated ones."""
    a, c = _offsets(data)
    return [dict(numbers=data["numbers"][a[i]:a[i + 1]], positions=data["positions"][a[i]:a[i + 1]],
                 mm_positions=data["mm_positions"][c[i]:c[i + 1]], mm_charges=data["mm_charges"][c[i]:c[i + 1]])
            for i in range(len(data["n_atoms"]))]


def _save(path: Path, arrays: dict[str, object]) -> None:
    """Write an .npz atomically (a reader or a kill mid-write never sees half a file)."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp.npz")
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, path)


def export(cfg, out: str | os.PathLike, jobs: str | os.PathLike, point_charges, frames: int | None = None,
           config_text: str = "", shard: tuple[int, int] = (1, 1)) -> int:
    """Write the QM inputs of the frames of ``cfg`` that dataset ``out`` does not hold (at most ``frames``, in
    plan order) to ``jobs``; samples the MD they need (cached as ``mlmm label`` caches it). Returns the count."""
    from potentials.qmmm_reference import Labeller, frame_meta, pending, provenance
    out, jobs = Path(out), Path(jobs)
    tasks, todo, cache = pending(cfg, out, shard)
    todo = todo[:frames] if frames is not None else todo
    if not todo:
        raise SetupError(f"{out} already holds every planned frame of this config; nothing to export")
    labeller = Labeller(dataclasses.replace(cfg, qm_device="cpu"), cache, point_charges)   # no QM here
    metas, inputs = [], []
    for i, task in enumerate(todo):
        x = labeller.inputs(task)
        metas.append(frame_meta(task, x))
        inputs.append(x)
        if (i + 1) % 100 == 0:
            log.info("exported %d/%d", i + 1, len(todo))
    write_jobs(jobs, metas, inputs, cfg.level, provenance(cfg, config_text), out)
    log.info("wrote %d QM jobs (%d planned) to %s", len(todo), len(tasks), jobs)
    return len(todo)


def write_jobs(path: str | os.PathLike, metas: list[dict], inputs: list[dict], level, provenance: dict,
               dataset: str | os.PathLike) -> None:
    """Write a jobs file: per frame its dataset metadata (``metas``, :func:`potentials.qmmm_reference.frame_meta`)
    and QM inputs (``inputs``: numbers, positions Å, mm_positions Å, mm_charges e), the level of theory and the
    dataset attributes (``provenance``) a dataset made from them gets."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = dict(level=asdict(level), provenance=provenance, dataset=str(dataset))
    _save(path, dict(format=np.asarray(JOBS_FORMAT), header=_text(header), meta=_text(metas), **_packed(inputs)))


# ---- the worker side: numpy + PySCF/gpu4pyscf only ------------------------------------------------------

_WORK: dict[str, object] = {}


def _init_worker(jobs: str, backend: str, level: dict, threads: int) -> None:
    from potentials.qmmm_reference import LevelOfTheory
    data = _load(jobs, JOBS_FORMAT)
    _WORK.update(frames=_split(data), meta=json.loads(str(data["meta"])), backend=backend,
                 level=LevelOfTheory(**level))
    try:
        from pyscf import lib
        lib.num_threads(threads)
    except ImportError:
        pass


def _label_one(i: int):
    from potentials.qmmm_reference import label_frame
    x, meta = _WORK["frames"][i], _WORK["meta"][i]
    try:
        lab = label_frame(x["numbers"], x["positions"], meta["total_charge"], x["mm_positions"].astype(np.float64),
                          x["mm_charges"].astype(np.float64), _WORK["level"], _WORK["backend"])
    except CalculationFailed as exc:                    # the SCF did not converge: a property of the frame
        return i, None, str(exc)
    except Exception as exc:            # noqa: BLE001 - reported to the parent, which decides (see label_jobs)
        return i, False, f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
    return i, lab, ""


def _versions(backend: str) -> dict[str, str]:
    out = dict(host=platform.node(), backend=backend)
    try:
        import pyscf
        out["pyscf_version"] = pyscf.__version__
    except ImportError:
        pass
    if backend == "gpu":
        import cupy
        import gpu4pyscf
        name = cupy.cuda.runtime.getDeviceProperties(0).get("name", b"?")
        out["gpu4pyscf_version"] = str(getattr(gpu4pyscf, "__version__", "?"))
        out["gpu"] = name.decode() if isinstance(name, bytes) else str(name)
    return out


def label_jobs(jobs: str | os.PathLike, results: str | os.PathLike, qm_device: str = "auto", workers: int = 1,
               deadline_s: float | None = None, save_every_s: float = 20.0, threads: int | None = None,
               stall_s: float = STALL_S) -> int:
    """Label the frames of ``jobs`` that ``results`` does not hold yet, in ``workers`` processes (each on the
    GPU with ``qm_device = "gpu"``); ``results`` is rewritten atomically every ``save_every_s`` and at the end.
    Past ``deadline_s`` (seconds from the start) no new frame is waited for. ``threads``: per worker (default:
    the cores shared out). A frame whose SCF does not converge is recorded as failed (with the reason) and not
    retried; one whose calculation raises anything else is logged and left for a later run, and more than
    ``MAX_ERRORS`` such (and over 10 % of the frames) stop the run with SetupError: a broken installation must
    not mark a whole batch as failed. No frame finishing for ``stall_s`` (a worker killed, e.g. out of memory,
    loses its frame) also stops it with SetupError, after saving. Returns the number of new labels."""
    import multiprocessing as mp

    from potentials.qmmm_reference import qm_backend
    jobs, results = Path(jobs), Path(results)
    data = _load(jobs, JOBS_FORMAT)
    header, metas = json.loads(str(data["header"])), json.loads(str(data["meta"]))
    backend = qm_backend(qm_device)
    done = _read_results(results) if results.exists() else {}
    if set(done) - {m["frame_id"] for m in metas}:
        raise SetupError(f"{results} holds frames that {jobs} does not; it belongs to another jobs file (give a new "
                         "results file)")
    todo = [i for i, m in enumerate(metas) if m["frame_id"] not in done]
    threads = threads or max(1, (os.cpu_count() or 1) // max(workers, 1))
    log.info("labelling %d of %d jobs on the %s with %d worker(s) x %d thread(s)", len(todo), len(metas),
             backend.upper(), workers, threads)
    t0, last, new, errors = time.perf_counter(), time.perf_counter(), 0, []
    frames = _split(data)
    info = dict(_versions(backend), jobs=jobs.name)

    def flush():
        _write_results(results, data, metas, frames, done, info)

    ctx = mp.get_context("spawn")           # CUDA contexts do not survive fork
    with ctx.Pool(workers, initializer=_init_worker, initargs=(str(jobs), backend, header["level"], threads)) as pool:
        it = pool.imap_unordered(_label_one, todo, chunksize=1)
        for _ in range(len(todo)):
            left = None if deadline_s is None else deadline_s - (time.perf_counter() - t0)
            if left is not None and left <= 0:
                log.info("deadline reached: stopping with %d of %d labelled", new, len(todo))
                break
            try:
                i, lab, why = it.next(timeout=stall_s if left is None else min(left, stall_s))
            except mp.TimeoutError:
                if left is not None and left <= stall_s:
                    log.info("deadline reached: stopping with %d of %d labelled", new, len(todo))
                    break
                flush()
                raise SetupError(f"no frame finished in {stall_s:.0f} s (a worker died or hangs); {new} new labels "
                                 f"kept in {results}: run the command again to go on") from None
            if lab is False:            # an error, not an SCF failure: not recorded, so a later run retries it
                errors.append(why)
                log.warning("error on %s: %s", metas[i]["frame_id"], why)
                if len(errors) > max(MAX_ERRORS, 0.1 * (new + len(errors))):
                    flush()
                    raise SetupError(f"{len(errors)} of {new + len(errors)} frames raised errors (last: {why}); "
                                     f"stopped, {new} labels kept in {results}")
                continue
            done[metas[i]["frame_id"]] = (lab, why)
            new += lab is not None
            if lab is None:
                log.warning("skip %s: %s", metas[i]["frame_id"], why)
            if time.perf_counter() - last > save_every_s:
                flush()
                last = time.perf_counter()
                rate = new / (last - t0) * 3600.0
                log.info("%d/%d labelled, %.0f frames/h", new, len(todo), rate)
        pool.terminate()
    flush()
    log.info("done: %d new labels in %.1f min -> %s", new, (time.perf_counter() - t0) / 60.0, results)
    return new


def _write_results(path: Path, data, metas, frames, done: dict, info: dict) -> None:
    from potentials.qmmm_reference import Label
    ok = [i for i, m in enumerate(metas) if m["frame_id"] in done and done[m["frame_id"]][0] is not None]
    failed = [[m["frame_id"], done[m["frame_id"]][1]] for m in metas
              if m["frame_id"] in done and done[m["frame_id"]][0] is None]
    labs: list[Label] = [done[metas[i]["frame_id"]][0] for i in ok]

    def cat(key, dtype):
        parts = [np.asarray(getattr(lab, key), dtype) for lab in labs]
        return np.concatenate(parts) if parts else np.zeros((0, 3), dtype)

    _save(path, dict(
        format=np.asarray(LABELS_FORMAT), header=_text(dict(json.loads(str(data["header"])), labelled=info)),
        meta=_text([metas[i] for i in ok]), failed=_text(failed), **_packed([frames[i] for i in ok]),
        energy=np.array([lab.energy for lab in labs], np.float64),
        dipole=np.array([lab.dipole for lab in labs], np.float64).reshape(-1, 3),
        quadrupole=np.array([lab.quadrupole for lab in labs], np.float64).reshape(-1, 6),
        scf_cycles=np.array([lab.scf_cycles for lab in labs], np.int32),
        seconds=np.array([lab.seconds for lab in labs], np.float64),
        note=_text([lab.note for lab in labs]),
        forces=cat("forces", np.float64).reshape(-1, 3), mm_forces=cat("mm_forces", np.float32).reshape(-1, 3)))


def _labels(data: dict[str, np.ndarray]) -> list:
    """The Labels of a results file, in the order of its ``meta``."""
    from potentials.qmmm_reference import Label
    notes = json.loads(str(data["note"]))
    a, c = _offsets(data)
    return [Label(energy=float(data["energy"][i]), forces=data["forces"][a[i]:a[i + 1]],
                  mm_forces=data["mm_forces"][c[i]:c[i + 1]], dipole=data["dipole"][i],
                  quadrupole=data["quadrupole"][i], scf_cycles=int(data["scf_cycles"][i]),
                  seconds=float(data["seconds"][i]), note=notes[i]) for i in range(len(notes))]


def _read_results(path: Path) -> dict:
    """frame id -> (Label or None, why the SCF failed) of an existing results file (to resume)."""
    data = _load(path, LABELS_FORMAT)
    out = {fid: (None, why) for fid, why in json.loads(str(data["failed"]))}
    for m, lab in zip(json.loads(str(data["meta"])), _labels(data)):
        out[m["frame_id"]] = (lab, "")
    return out


# ---- back here: into the dataset --------------------------------------------------------------------------

def import_labels(results: str | os.PathLike, out: str | os.PathLike) -> int:
    """Append the labelled frames of ``results`` that dataset ``out`` does not hold yet; SCF failures go to
    ``<out>.skipped.txt`` as ``mlmm label`` writes them. The level of theory must match ``out``'s. Returns the
    number of frames appended."""
    from potentials.dataset import DatasetWriter, frame_ids
    from potentials.qmmm_reference import (LabelConfig, LevelOfTheory, _check_level, add_skipped, append_frame, record,
                                            skipped_path)
    results, out = Path(results), Path(out)
    data = _load(results, LABELS_FORMAT)
    header = json.loads(str(data["header"]))
    level = LevelOfTheory(**header["level"])
    prov = dict(header["provenance"])
    if out.exists():
        _check_level(out, LabelConfig(level=level, embedding_cutoff_nm=float(prov["embedding_cutoff_nm"])))
    have = frame_ids(out) if out.exists() else set()
    writer = DatasetWriter(out, prov)
    info = header.get("labelled", {})
    writer.add_history(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} mlmm label --import-labels {results.name}: "
                       + ", ".join(f"{k} {v}" for k, v in info.items()))
    n = 0
    for meta, x, lab in zip(json.loads(str(data["meta"])), _split(data), _labels(data)):
        if meta["frame_id"] in have:
            continue
        append_frame(writer, record(meta, x, lab))
        n += 1
    failed = [(fid, why) for fid, why in json.loads(str(data["failed"])) if fid not in have]
    if failed:
        add_skipped(skipped_path(out), failed)
    log.info("appended %d labelled frames from %s to %s (%d already there, %d SCF failures listed in %s)", n,
             results, out, len(json.loads(str(data["meta"]))) - n, len(failed), skipped_path(out))
    return n


def main(argv: list[str] | None = None) -> int:
    """``python -m potentials.qm_jobs JOBS RESULTS [--qm-device auto|cpu|gpu] [--workers N] [--deadline-s S]``:
    the labelling step on a machine without OpenMM or netCDF4 (see the module docstring)."""
    import argparse
    p = argparse.ArgumentParser(prog="python -m potentials.qm_jobs", description=__doc__.split("\n")[0])
    p.add_argument("jobs", help="jobs file from `mlmm label --export-jobs`")
    p.add_argument("results", help="results file (.npz), resumed if it exists; `mlmm label --import-labels` reads it")
    p.add_argument("--qm-device", choices=("auto", "cpu", "gpu"), default="auto")
    p.add_argument("--workers", type=int, default=1, help="worker processes (on a GPU they share the device)")
    p.add_argument("--threads", type=int, default=None, help="threads per worker (default: the cores shared out)")
    p.add_argument("--deadline-s", type=float, default=None, help="stop waiting for new labels after S seconds")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    try:
        label_jobs(args.jobs, args.results, args.qm_device, args.workers, args.deadline_s, threads=args.threads)
    except SetupError as exc:
        print(f"error: {exc}")
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

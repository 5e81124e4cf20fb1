"""QM/MM labels of one ``mlmm learn`` round (:mod:`driver.learn`): each selected frame of ``round_NNN/frames.npz``
(all-atom positions, nm) gets the embedding's point charges (the coupling layer's ``point_charges``: the same
residue selection and switch the ML client uses, the system's ``[coupling]`` cutoff and switch) and a
:func:`potentials.qmmm_reference.label_frame` calculation at ``[level]``, and is appended to ``DIR/data.nc`` in the
record format of ``mlmm label`` (:class:`potentials.qmmm_reference.Labeller`). Frames already in the dataset (by
id) or listed in ``DIR/data.skipped.txt`` (SCF failures, the list `mlmm label` and ``--import-labels`` keep;
``DIR/skipped.txt``, where earlier versions wrote them, is still read) are not labelled again, so a killed round continues where it
stopped. Writes hold SIGTERM/SIGINT/SIGHUP until the frame is complete (``mlmm label``'s ``append_frame``).
"""
from __future__ import annotations

import logging
import time

import numpy as np

from potentials.core.errors import CalculationFailed, SetupError
from potentials.core.units import ANGSTROM_PER_NM

log = logging.getLogger(__name__)


def dataset_writer(learner, path=None):
    """The :class:`potentials.dataset.DatasetWriter` of ``path`` (default ``DIR/data.nc``): created with ``mlmm label``'s provenance
    attributes (level of theory, embedding cutoff and switch: what ``mlmm train`` stamps into the model), or
    reopened after checking that its level of theory is the config's."""
    from potentials.dataset import Dataset, DatasetWriter

    path = learner.dataset if path is None else path
    if path.exists():
        with Dataset.open(path) as ds:
            for key, value in learner.cfg.level.provenance().items():
                if key in ds.attrs and str(ds.attrs[key]) != str(value):
                    raise SetupError(f"{path} was labelled with {key}={ds.attrs[key]!r}, the config asks for "
                                     f"{value!r}; use a new --out folder")
            for key, value in (("embedding_cutoff_nm", learner.spec.coupling.cutoff_nm),
                               ("embedding_switch_nm", learner.spec.coupling.switch_width_nm)):
                if key in ds.attrs and float(ds.attrs[key]) != float(value):
                    raise SetupError(f"{path} was labelled with {key} = {ds.attrs[key]}, the system has {value}; "
                                     "use a new --out folder")
        return DatasetWriter(path)
    return DatasetWriter(path, dataset_provenance(learner))


def dataset_provenance(learner) -> dict:
    """The global attributes of a learner's dataset: ``mlmm label``'s provenance plus what ``mlmm learn`` did."""
    from potentials.qmmm_reference import LabelConfig, provenance

    c = learner.spec.coupling
    prov = provenance(LabelConfig(solutes=(), level=learner.cfg.level, embedding_cutoff_nm=c.cutoff_nm,
                                  embedding_switch_nm=c.switch_width_nm, seed=learner.cfg.random_seed),
                      learner.config_text)
    prov.update(title=f"QM/MM reference data of {learner.formula} from mlmm learn ({learner.system_toml})",
                mm_model=f"the prepared system's force field ({', '.join(learner.spec.structure.forcefield)})",
                sampling="round 0: OpenMM MD with an elastic ML zone (driver/learn_sample.py); rounds >= 1: ML/MM "
                         "MD with the committee, frames selected by committee disagreement (driver/learn.py)",
                split_rule="by trajectory (seed MD segment or ML/MM run): split_pattern[t % len(split_pattern)]")
    return prov


def label_round(learner, r: int) -> int:
    """Label the frames of round ``r`` not in the dataset yet; returns how many of the round's frames the dataset
    holds now (this session's and those labelled before a restart; SCF failures are left out)."""
    return label_frames(learner, learner.round_dir(r) / "frames.npz", learner.dataset, f"round {r}", "the round's")


def _pending(learner, frames_path, have: set[str]) -> tuple[object, list[int]]:
    """(the frames file, the indices of its frames that are neither in ``have`` (the dataset's ids) nor listed
    as SCF failures)."""
    from potentials.qmmm_reference import skipped_ids, skipped_path

    done = have | skipped_ids(skipped_path(learner.dataset)) | skipped_ids(learner.out / "skipped.txt")
    z = np.load(frames_path)
    return z, [i for i, fid in enumerate(z["frame_id"]) if str(fid) not in done]


def _frame_inputs(learner, z, i: int) -> tuple[dict, dict]:
    """(dataset metadata, QM inputs) of frame ``i`` of a frames file: the zone as the network sees it and the
    embedding's point charges (float32, as stored)."""
    pos = z["positions"][i].astype(np.float64)
    ml, mm_pos, q = learner.point_charges.frame(pos, learner.box)
    x = dict(numbers=learner.numbers, positions=np.asarray(ml) * ANGSTROM_PER_NM,
             mm_positions=(np.asarray(mm_pos) * ANGSTROM_PER_NM).astype(np.float32),
             mm_charges=np.asarray(q).astype(np.float32))
    displaced = int(z["displaced"][i]) > 0
    meta = dict(frame_id=str(z["frame_id"][i]), trajectory=str(z["trajectory"][i]), solute=learner.formula,
                kind="displaced" if displaced else learner.environment, environment=learner.environment,
                split=str(z["split"][i]), total_charge=int(learner.charge), temperature=float(z["temperature"][i]),
                displaced=int(displaced), block=int(z["block"][i]), index_in_block=int(z["index"][i]))
    return meta, x


def export_round(learner, r: int, jobs) -> int:
    """Write the QM inputs of round ``r``'s frames that the dataset lacks to the jobs file ``jobs``
    (:mod:`potentials.qm_jobs`: label them on another machine, import with ``mlmm label --import-labels``);
    returns how many."""
    from potentials.dataset import frame_ids
    from potentials.qm_jobs import write_jobs

    have = frame_ids(learner.dataset) if learner.dataset.exists() else set()     # read-only: no writer needed
    z, todo = _pending(learner, learner.round_dir(r) / "frames.npz", have)
    if not todo:
        raise SetupError(f"{learner.dataset} already holds every frame of round {r}; nothing to export")
    pairs = [_frame_inputs(learner, z, i) for i in todo]
    write_jobs(jobs, [m for m, _ in pairs], [x for _, x in pairs], learner.cfg.level, dataset_provenance(learner),
               learner.dataset)
    log.info("round %d: wrote %d QM jobs to %s; label them (python -m potentials.qm_jobs) and import them with "
             "`mlmm label --out %s --import-labels RESULTS.npz`", r, len(todo), jobs, learner.dataset)
    return len(todo)


def label_frames(learner, frames_path, dataset, tag: str, whose: str = "its") -> int:
    """Label the frames of ``frames_path`` (a ``frames.npz`` of :meth:`driver.learn.Learner._save_frames`) that
    ``dataset`` does not hold yet; returns how many of them it holds now. ``tag`` and ``whose`` word the log
    lines ("round 2: ... of the round's 40")."""
    from potentials.qmmm_reference import add_skipped, append_frame, label_frame, record, skipped_path

    writer = dataset_writer(learner, dataset)
    z, todo = _pending(learner, frames_path, writer.frame_ids())
    lvl = learner.cfg.level
    log.info("%s: labelling %d frames (%d of %s %d already labelled), %s/%s", tag, len(todo),
             len(z["frame_id"]) - len(todo), whose, len(z["frame_id"]), lvl.xc, lvl.basis)
    t_start, n_new = time.perf_counter(), 0
    for n, i in enumerate(todo, 1):
        meta, x = _frame_inputs(learner, z, i)
        fid = meta["frame_id"]
        try:
            lab = label_frame(x["numbers"], x["positions"], learner.charge, x["mm_positions"], x["mm_charges"], lvl,
                              learner.qm_device)
        except CalculationFailed as exc:
            log.warning("skip %s: %s", fid, exc)
            add_skipped(skipped_path(learner.dataset), [(fid, exc)])
            continue
        append_frame(writer, record(meta, x, lab))
        n_new += 1
        rate = n / (time.perf_counter() - t_start)
        log.info("[%d/%d] %s E=%.4f eV m=%d qm=%.1fs | ETA %.1f min", n, len(todo), fid, lab.energy,
                 len(x["mm_charges"]), lab.seconds, (len(todo) - n) / max(rate, 1e-9) / 60.0)
    held = len({str(x) for x in z["frame_id"]} & writer.frame_ids())
    log.info("%s: %d frames labelled now, %d of its %d in the dataset", tag, n_new, held, len(z["frame_id"]))
    return held

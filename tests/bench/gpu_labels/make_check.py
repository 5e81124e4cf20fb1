"""Reference frames for the GPU check: 4 CPU-labelled (PySCF) cluster test frames as a jobs file + their labels."""
import json, sys, numpy as np
from potentials.dataset import Dataset
from potentials import qm_jobs as q
from potentials.qmmm_reference import LevelOfTheory, Label
from dataclasses import asdict
ds = Dataset.open("inputs/data/qmmm_clusters_b3lyp_svp.nc")
idx = [i for i in range(len(ds)) if str(ds.frame(i)["split"]) == "test"][:6]
metas, frames, labs = [], [], []
keys = ("frame_id", "trajectory", "solute", "kind", "environment", "split", "total_charge", "temperature",
        "displaced", "block", "index_in_block")
for i in idx:
    f = ds.frame(i)
    m = {k: (f[k].item() if hasattr(f[k], "item") else str(f[k])) for k in keys}
    metas.append(m); frames.append({k: np.asarray(f[k]) for k in ("numbers", "positions", "mm_positions", "mm_charges")})
    labs.append((Label(energy=float(f["energy"]), forces=f["forces"], mm_forces=f["mm_forces"], dipole=f["dipole"],
                       quadrupole=f["quadrupole"], scf_cycles=int(f["scf_cycles"]), seconds=float(f["seconds"])), ""))
header = dict(level=asdict(LevelOfTheory()), provenance={"embedding_cutoff_nm": 1.2}, dataset="check")
cat = lambda k, d: np.concatenate([x[k] for x in frames]).astype(d)
q._save(__import__("pathlib").Path(sys.argv[1] + "/check_jobs.npz"), dict(format=np.asarray(q.JOBS_FORMAT), header=q._text(header),
        meta=q._text(metas), n_atoms=np.array([len(x["numbers"]) for x in frames], np.int32),
        n_mm=np.array([len(x["mm_charges"]) for x in frames], np.int32), numbers=cat("numbers", np.int16),
        positions=cat("positions", np.float64).reshape(-1, 3), mm_positions=cat("mm_positions", np.float32).reshape(-1, 3),
        mm_charges=cat("mm_charges", np.float32)))
data = dict(np.load(sys.argv[1] + "/check_jobs.npz"))
q._write_results(__import__("pathlib").Path(sys.argv[1] + "/check_ref.npz"), data, metas, q._split(data),
                 {m["frame_id"]: l for m, l in zip(metas, labs)}, {"backend": "cpu", "source": "shipped dataset"})
print(len(metas), [m["solute"] for m in metas], [len(x["numbers"]) for x in frames], [len(x["mm_charges"]) for x in frames])

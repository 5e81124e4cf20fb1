"""GPU labels of the check frames against the shipped CPU (PySCF) labels: |dE| (eV, Ha), max |dF| (eV/A)."""
import json, sys, numpy as np
from potentials import qm_jobs as q
ref = q._read_results(__import__("pathlib").Path(sys.argv[1])); new = q._read_results(__import__("pathlib").Path(sys.argv[2]))
rows = []
for fid, (lab, why) in new.items():
    r = ref[fid][0]
    if lab is None:
        rows.append(dict(frame=fid, failed=why)); continue
    rows.append(dict(frame=fid, dE_eV=lab.energy - r.energy, dE_Ha=(lab.energy - r.energy) / 27.211386245988,
                     dF_max=float(np.abs(lab.forces - r.forces).max()), dFmm_max=float(np.abs(lab.mm_forces - r.mm_forces).max()),
                     ddip=float(np.abs(lab.dipole - r.dipole).max()), s_gpu=lab.seconds, s_cpu=r.seconds, cyc=lab.scf_cycles))
print(json.dumps(rows, indent=1))

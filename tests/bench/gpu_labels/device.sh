#!/bin/bash
# One device run: unpack PySCF + gpu4pyscf, check GPU labels against shipped CPU labels, then label the exported
# jobs until END_S seconds after the start (GPU if the check passes, else PySCF on the CPU cores).
set -u
T0=$(date +%s); D=${D:-.dev}; END_S=${END_S:-545}; OUT=${OUT:-/tmp/out}; SITE=${SITE:-/tmp/site}
el() { echo $(( $(date +%s) - T0 )); }
exec > >(tee -a "$OUT/device.log") 2>&1
export PYTHONUNBUFFERED=1 PYTHONPATH=$SITE:$PWD OMP_NUM_THREADS=1
mkdir -p "$SITE" && tar xJf $D/gpu_libs.tar.xz -C "$SITE" && tar xJf $D/gpu_libs_extra.tar.xz -C "$SITE" || { echo "untar failed"; exit 1; }
echo "[$(el)s] unpacked"; nvidia-smi -L 2>&1 | head -2; nproc
python3 -c "
import numpy, pyscf; print('numpy', numpy.__version__, 'pyscf', pyscf.__version__)
from potentials.qmmm_reference import qm_backend, _gpu_missing; print('backend', qm_backend('auto'), _gpu_missing())
import gpu4pyscf; print('gpu4pyscf', gpu4pyscf.__version__)" 2>&1 | tail -5
DEV=${FORCE_DEV:-gpu}
if [ "$DEV" = gpu ]; then
  timeout 170 python3 -m potentials.qm_jobs $D/check_jobs.npz "$OUT/check_gpu.npz" --qm-device gpu --workers 3 \
      --threads 2 2>&1 | tail -n 12
  python3 $D/compare.py $D/check_ref.npz "$OUT/check_gpu.npz" > "$OUT/check.json" 2>&1; cat "$OUT/check.json"
  python3 -c "
import json, sys; r = json.load(open('$OUT/check.json'))
ok = len(r) == 6 and all('dE_eV' in x and abs(x['dE_eV']) < 1e-3 and x['dF_max'] < 1e-2 and x['dFmm_max'] < 1e-2 for x in r)
sys.exit(0 if ok else 1)" || DEV=cpu
fi
echo "[$(el)s] labelling on the $DEV until ${END_S}s"
LEFT=$(( END_S - $(el) ))
if [ "$DEV" = gpu ]; then W=(9 4 2); else W=(${CPU_W:-10 4 2}); fi; TH=1
i=0; pids=()
for set in clusters zones ionpairs; do
  timeout $(( LEFT + 40 )) python3 -m potentials.qm_jobs $D/$set.npz "$OUT/${set}_labels.npz" --qm-device $DEV \
      --workers ${W[$i]} --threads $TH --deadline-s $LEFT > "/tmp/$set.log" 2>&1 &
  pids+=($!); i=$((i + 1))
done
wait "${pids[@]}"
for set in clusters zones ionpairs; do echo "== $set"; grep -v "^\s*$" /tmp/$set.log | tail -n 6; done
echo "[$(el)s] done"; nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv 2>&1 | tail -1

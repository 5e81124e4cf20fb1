#!/usr/bin/env bash
# Capped side-chain fragments for the shipped model (issue #17, item 3): prepare each fragment (link atom at
# CA-CB), sample it by MM at 300 and 400 K with displaced copies and label 80 frames at B3LYP/def2-SVP with
# `mlmm learn --seed-only` (inputs/data/learn_fragments.toml). First in a TIP3P droplet
# (inputs/examples/fragments/), then the same side chains inside DHFR (inputs/examples/dhfr, the protein and its
# waters as the MM environment); DIPEPTIDE is the capped alanine-dipeptide zone of the README (two amide groups),
# CYS-DISP Cys's side chain again, sampled by inputs/data/learn_fragments_displaced.toml (60 of its 80 frames
# displaced copies: the compressed S-H bonds its own set lacks). Resumable: run it again and it goes on where it
# stopped (prepared systems are kept, `mlmm learn` skips what it has). Each fragment's frames end up in
# data/fragments/<name>/data.nc, the record format of `mlmm label` (add them as [data] extra of `mlmm train`).
#   OMP_NUM_THREADS=1 bash inputs/data/label_fragments.sh [NAME ...]      # default: all, smallest first
# With EXPORT_JOBS=DIR the QM is left for another machine: each fragment's sampled frames go to DIR/<name>.npz
# (`mlmm learn --seed-only --export-jobs`); label them with `python -m potentials.qm_jobs DIR/<name>.npz
# DIR/<name>_labels.npz --qm-device gpu` and import with `mlmm label --out data/fragments/<name>/data.nc
# --import-labels DIR/<name>_labels.npz`.
set -euo pipefail
cd "$(dirname "$0")/../.."
MLMM=${MLMM:-mlmm}
CFG=inputs/data/learn_fragments.toml
SIDE="not name N H CA HA C O"
WATER=(ASP SER CYS CYM GLU THR MET HID HIE HIP LYS ARG TYR DIPEPTIDE CYS-DISP)
PROTEIN=(ASP27 GLU17 HIS45 SER49 THR46 LYS32 ARG57 TYR100 MET20 CYS152)
names=("$@")
[ ${#names[@]} -gt 0 ] || names=("${WATER[@]}" "${PROTEIN[@]/#/DHFR-}")
mkdir -p data/fragments
for name in "${names[@]}"; do
  zone=${name%-DISP}   # NAME-DISP: NAME's prepared system again, sampled with learn_fragments_displaced.toml
  cfg=$CFG; [ "$zone" = "$name" ] || cfg=inputs/data/learn_fragments_displaced.toml
  prep=data/fragments/prep-$zone
  if [ ! -f "$prep/system.toml" ]; then
    case $zone in
      DHFR-*)
        r=${zone#DHFR-}; resname=${r//[0-9]/}; resid=${r//[A-Z]/}
        "$MLMM" prepare inputs/examples/dhfr/dhfr_jac.pdb.gz --ml "resid $resid and resname $resname and $SIDE" \
            --out "$prep" ;;
      DIPEPTIDE)       # the ALA residue and both peptide groups, cut at the two terminal methyl carbons
        "$MLMM" prepare inputs/examples/alanine-dipeptide/input.pdb \
            --ml "resname ALA or (resname ACE and name C O) or (resname NME and name N H)" --nonperiodic \
            --solvate 1.0 --out "$prep" ;;
      CYM)
        "$MLMM" prepare inputs/examples/fragments/ACE-CYM-NME.pdb --ml "resid 2 and $SIDE" --nonperiodic \
            --solvate 1.0 --no-fix --out "$prep" ;;
      *)
        "$MLMM" prepare "inputs/examples/fragments/ACE-$zone-NME.pdb" --ml "resid 2 and $SIDE" --nonperiodic \
            --solvate 1.0 --out "$prep" ;;
    esac
  fi
  # a fragment shipped as inputs/data/fragments/NAME.nc (labelled in an earlier session) continues from it: one with
  # all its frames is not sampled again (`mlmm learn --seed-only` skips the seed MD of a dataset that holds the frame
  # budget); otherwise the seed MD is re-made (seeded), and frames already in data.nc are skipped by id
  if [ -f "inputs/data/fragments/$name.nc" ] && [ ! -f "data/fragments/$name/data.nc" ]; then
    mkdir -p "data/fragments/$name" && cp "inputs/data/fragments/$name.nc" "data/fragments/$name/data.nc"
  fi
  "$MLMM" learn "$prep/system.toml" --out "data/fragments/$name" --config "$cfg" --seed-only \
      ${EXPORT_JOBS:+--export-jobs "$EXPORT_JOBS/$name.npz"} || [ -n "${EXPORT_JOBS:-}" ]   # exporting: a
  #                                                           fragment with every frame labelled has nothing to export
done

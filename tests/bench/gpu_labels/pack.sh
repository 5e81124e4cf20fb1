#!/bin/bash
# Pack PySCF + gpu4pyscf for an sm_90 (H100/H200) machine that cannot reach a package index and takes uploads of
# at most 64 MiB: 245 MB of wheels -> one ~51 MB .tar.xz (plus ano.dat, 0.2 MB). Usage: pack.sh DEST_DIR
set -euo pipefail
dest=$(realpath "${1:?usage: pack.sh DEST_DIR}"); here=$(dirname "$(realpath "$0")")
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT; cd "$work"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d whl \
    gpu4pyscf-cuda13x==1.9.0 gpu4pyscf-libxc-cuda13x==0.9.0 pyscf==2.14.0
mkdir site && for w in whl/*.whl; do unzip -q -o "$w" -d site; done
cd site
find . -type d \( -name test -o -name tests \) -prune -exec rm -rf {} +
rm -rf gpu4pyscf/pbc pyscf/pbc gpu4pyscf/lib/libpbc.so pyscf/lib/deps/lib64/libxcfun.so
python3 "$here/strip_fatbin.py" 90 $(find gpu4pyscf -name "*.so")
mkdir -p "$dest" && tar cJf "$dest/gpu_libs_extra.tar.xz" pyscf/gto/basis/ano.dat      # the minao guess reads it
find pyscf/gto/basis -maxdepth 1 -name "*.dat" -size +20k ! -name def2-svp.dat ! -name def2-universal-jkfit.dat \
    ! -name "minao*" ! -name "sto-3g*" -delete
tar cf - . | xz -T0 -9 > "$dest/gpu_libs.tar.xz"
ls -la "$dest"

#!/usr/bin/env bash
# Download, on this machine, the wheels a lent GPU machine lacks for the pretraining benches and CUDA tests
# (its image has torch, numpy, pyarrow, pillow, pyyaml, but not webdataset): pure-Python wheels for the
# device's Python 3.12, into .whl.gpu/ (git-ignored), which a device call then carries:
#   bash bench/gpu/fetch_wheels.sh [--xformers]
#   run(command="bash bench/gpu/issue6.sh", carry=[".whl.gpu"])
# --xformers adds xformers 0.0.35 (large; only the xformers test needs it). faiss for sm_90 is built apart
# (build_faiss_sm90.sh, ~35 min) and lands in the same folder.
set -euo pipefail
cd "$(dirname "$0")/../.."
dest=.whl.gpu
mkdir -p "$dest"
wanted=(webdataset==1.0.2 braceexpand==0.1.7)
[ "${1:-}" = "--xformers" ] && wanted+=(xformers==0.0.35)
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$dest" "${wanted[@]}"
ls -l "$dest"

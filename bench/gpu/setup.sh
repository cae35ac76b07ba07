# Source this on a lent GPU machine (see bench/gpu/README.md): installs the carried wheels under /tmp/site and,
# for faiss-gpu-cu12 on a CUDA-13-only image, builds the cuBLAS 12 forwarding stubs (cublas12_shim.sh).
# Idempotent: a warm machine keeps /tmp between calls.
if [ ! -f /tmp/site/.done ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site ${WHEELS:-.whl}/*.whl \
    && touch /tmp/site/.done
fi
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
if [ -d /tmp/site/nvidia/cuda_runtime/lib ] && [ ! -f /tmp/shim/libcublas.so.12 ]; then
  cublas13=$(find / -xdev -name 'libcublas.so.13*' -type f 2>/dev/null | head -1)
  bash bench/gpu/cublas12_shim.sh /tmp/shim "$cublas13" && echo "cuBLAS 12 stubs -> $cublas13"
fi
[ -d /tmp/shim ] && export LD_LIBRARY_PATH=/tmp/shim:/tmp/site/nvidia/cuda_runtime/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
# faiss-gpu-cu12's loader looks for the nvidia-cublas-cu12 package, absent here: the stubs above stand in.
[ -f /tmp/shim/libcublas.so.12 ] && export _FAISS_WHEEL_DISABLE_CUDA_PRELOAD=1

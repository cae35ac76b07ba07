# Source this on a lent GPU machine (see bench/gpu/README.md): installs the carried wheels under /tmp/site and
# - if faiss_sm90.tar.xz was carried (our sm_90 / CUDA 13 faiss build, build_faiss_sm90.sh): unpacks it to
#   /tmp/faiss_sm90, puts it first on PYTHONPATH and the torch venv's CUDA 13 libs (cuBLAS, cudart) on LD_LIBRARY_PATH;
# - else, for faiss-gpu-cu12 on a CUDA-13-only image, builds the cuBLAS 12 forwarding stubs (cublas12_shim.sh).
# Idempotent: a warm machine keeps /tmp between calls.
if [ ! -f /tmp/site/.done ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site ${WHEELS:-.whl}/*.whl \
    && touch /tmp/site/.done
fi
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
if [ -f "${WHEELS:-.whl}/faiss_sm90.tar.xz" ]; then
  if [ ! -f /tmp/faiss_sm90/.done ]; then
    rm -rf /tmp/faiss_sm90 && tar -xJf "${WHEELS:-.whl}/faiss_sm90.tar.xz" -C /tmp \
      && python3 -c 'import torch,os;print(os.path.dirname(torch.__file__))' > /tmp/faiss_sm90/.torchdir \
      && for so in libcublas.so.13 libcudart.so.13; do
           find "$(cat /tmp/faiss_sm90/.torchdir)/../nvidia" -name "$so*" 2>/dev/null | head -1 | xargs -r dirname
         done | sort -u | paste -sd: > /tmp/faiss_sm90/.ldpath \
      && touch /tmp/faiss_sm90/.done
  fi
  export PYTHONPATH=/tmp/faiss_sm90:$PYTHONPATH
  case ":${LD_LIBRARY_PATH:-}:" in
    *":$(cat /tmp/faiss_sm90/.ldpath):"*) ;;
    *) export LD_LIBRARY_PATH=$(cat /tmp/faiss_sm90/.ldpath)${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH} ;;
  esac
else
  if [ -d /tmp/site/nvidia/cuda_runtime/lib ] && [ ! -f /tmp/shim/libcublas.so.12 ]; then
    cublas13=$(find / -xdev -name 'libcublas.so.13*' -type f 2>/dev/null | head -1)
    bash bench/gpu/cublas12_shim.sh /tmp/shim "$cublas13" && echo "cuBLAS 12 stubs -> $cublas13"
  fi
  [ -d /tmp/shim ] && export LD_LIBRARY_PATH=/tmp/shim:/tmp/site/nvidia/cuda_runtime/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  # faiss-gpu-cu12's loader looks for the nvidia-cublas-cu12 package, absent here: the stubs above stand in.
  [ -f /tmp/shim/libcublas.so.12 ] && export _FAISS_WHEEL_DISABLE_CUDA_PRELOAD=1
fi

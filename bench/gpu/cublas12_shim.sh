#!/usr/bin/env bash
# Build stand-ins for libcublas.so.12 / libcublasLt.so.12 that forward to the CUDA 13 cuBLAS already on a
# machine, so the faiss-gpu-cu12 wheel can run where only CUDA 13 libraries are installed.
#
# Why: the lent GPU machines carry PyTorch's CUDA 13 libraries but no CUDA 12 cuBLAS, and the cu12 cuBLAS
# wheel (580 MB) is too big to send there. faiss-gpu-cu12 calls exactly the eight cuBLAS functions below,
# all with the same signatures and enum values in cuBLAS 12 and 13, so each stub is a single indirect jump
# to the CUDA 13 function (no argument handling). libcudart.so.12 itself is the real one, from the
# nvidia-cuda-runtime-cu12 wheel. This is a tool for running the GPU tests and benchmarks on such a
# machine, not something the package ships: a normal CUDA 12 install needs none of it.
#
#   bench/gpu/cublas12_shim.sh OUT_DIR [PATH_TO_libcublas.so.13]
set -euo pipefail
out=$1
target=${2:-libcublas.so.13}
mkdir -p "$out"
syms=(cublasCreate_v2 cublasDestroy_v2 cublasGemmEx cublasGemmStridedBatchedEx cublasGetMathMode
      cublasSetMathMode cublasSetStream_v2 cublasSgemmEx)
src=$(mktemp --suffix .c)
{
  echo '#define _GNU_SOURCE'
  echo '#include <dlfcn.h>'
  echo '#include <stdio.h>'
  echo '#include <stdlib.h>'
  echo "__attribute__((used)) void *lvd_targets[${#syms[@]}];"
  printf 'static const char *names[] = {'; printf '"%s",' "${syms[@]}"; echo '};'
  echo '__attribute__((constructor)) static void lvd_init(void) {'
  echo "  void *h = dlopen(\"$target\", RTLD_NOW | RTLD_GLOBAL);"
  echo '  if (!h) { fprintf(stderr, "cublas12 shim: %s\n", dlerror()); abort(); }'
  echo '  for (unsigned i = 0; i < sizeof names / sizeof *names; i++)'
  echo '    if (!(lvd_targets[i] = dlsym(h, names[i]))) { fprintf(stderr, "cublas12 shim: no %s\n", names[i]); abort(); }'
  echo '}'
  for i in "${!syms[@]}"; do
    s=${syms[$i]}
    echo "__asm__(\".globl $s\n.type $s,@function\n$s:\n  jmp *lvd_targets+$((i * 8))(%rip)\n.size $s,.-$s\n\");"
  done
} >"$src"
map=$(mktemp --suffix .map)
printf 'libcublas.so.12 { global: %s; local: *; };\n' "$(IFS=';'; echo "${syms[*]}")" | sed 's/;/; /g' >"$map"
gcc -shared -fPIC -O2 -o "$out/libcublas.so.12" "$src" -Wl,--version-script="$map" -Wl,-soname,libcublas.so.12 -ldl
echo 'void lvd_cublaslt12_placeholder(void) {}' >"$src"
gcc -shared -fPIC -o "$out/libcublasLt.so.12" -x c "$src" -Wl,-soname,libcublasLt.so.12
rm -f "$src" "$map"

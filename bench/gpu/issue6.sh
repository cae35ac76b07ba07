#!/usr/bin/env bash
# Issue #6's GPU measurements in one device call (lent machines may allow only one): run from the repository
# root on the lent machine with `.whl.gpu` carried, e.g.  run(command="bash bench/gpu/issue6.sh", carry=[".whl.gpu"]).
# Results and logs go to $OUT (default /tmp/out); each stage has its own time limit, so a slow one cannot eat
# the others' share of the ~600 s a call gets. Order = value: the compiled ViT-L step with a clean profile first.
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export WHEELS=${WHEELS:-.whl.gpu}
# shellcheck source=/dev/null
source bench/gpu/setup.sh > "$OUT/setup.txt" 2>&1
python3 -c 'import torch; print(torch.__version__, torch.cuda.get_device_name(0))' > "$OUT/versions.txt" 2>&1

stage() {  # stage NAME SECONDS CMD...: run CMD with a limit, log to $OUT/NAME.txt, print its tail
  local name=$1 limit=$2; shift 2
  timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
  echo "== $name rc=$?"; grep -v '^\s*$' "$OUT/$name.txt" | tail -3 | cut -c1-400
}
# 1. The compiled step: timing, host enqueue time, compiled regions per profiled step (should be > 0).
stage vitl_compiled 270 python3 bench/bench_pretrain_gpu.py --archs vit_large --compile --profile 40 --steps 10 \
  --result "$OUT/pretrain_gpu_vitl_compiled.json"
# 2. Compiled at batch 64: the per-step fixed costs (AdamW, EMA, clipping over ~0.4 B parameters) halve per image.
stage vitl_compiled_b64 130 python3 bench/bench_pretrain_gpu.py --archs vit_large --compile --batch 64 --steps 8 \
  --result "$OUT/pretrain_gpu_vitl_compiled_b64.json"
# 3. The whole trainer from shards (decode and multi-crop in workers, late metrics), compiled.
stage loop 150 python3 -m bench.bench_pretrain_loop --arch vit_large --workers -1 --iters 30 --compile
cp bench/results/pretrain_loop_cuda.json "$OUT/" 2>/dev/null || true
# 4. The same step eager, for the compile gain on this very machine (machines differ by ~15%).
stage vitl_eager 90 python3 bench/bench_pretrain_gpu.py --archs vit_large --steps 10 \
  --result "$OUT/pretrain_gpu_vitl_eager.json"

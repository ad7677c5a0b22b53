#!/usr/bin/env bash
# On the lent GPU machine (see prepare_wheels.sh): install the kit's TE + our wheels, then the GPU
# checks in order of value, each under a timeout bounded by one deadline (BUDGET seconds), every
# result under $OUT (at most 8 files come back). What ran on 2026-12-04: docs/benchmarks.md.
set -u
T0=$(date +%s); BUDGET=${BUDGET:-440}
exec > >(tee -a "$OUT/log.txt") 2>&1
bash .gpucarry/p5/on_device.sh stash && bash .gpucarry/p5/on_device.sh install || { echo "KIT INSTALL FAILED"; exit 1; }
. /root/gpu/env.sh
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
  $(ls .whl/*.whl | grep -v megatron_core) 2>&1 | grep -v -i warn
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/mc16 \
  .whl/megatron_core-0.16.1*.whl 2>&1 | grep -v -i warn
export PYTHONPATH=/tmp/mc16:/tmp/site:$PYTHONPATH CUDA_DEVICE_MAX_CONNECTIONS=1 PYTHONWARNINGS=ignore
{ nvidia-smi -L; python3 --version; python3 -c "import torch, megatron.core as m, transformers, transformer_engine as te; print('torch', torch.__version__, 'mcore', m.__version__, 'transformers', transformers.__version__, 'TE', te.__version__)"; } 2>&1 | tee "$OUT/env.txt"
step() {  # step NAME LIMIT CMD...
  local name=$1 limit=$2; shift 2
  local left=$(( BUDGET - ($(date +%s) - T0) ))
  [ $left -lt $limit ] && limit=$left
  if [ $limit -lt 20 ]; then echo "=== $name: SKIPPED (deadline)"; return 99; fi
  echo "=== $name (limit ${limit}s, t=$(( $(date +%s) - T0 ))s): $*"
  local s=$(date +%s); timeout $limit "$@"; local rc=$?
  echo "=== $name: rc=$rc in $(( $(date +%s) - s ))s"; return $rc
}
step gpu_check 60 python3 tools/gpu_check.py --json "$OUT/gpu_check.json"
step step_7b 150 python3 tools/bench_train_step.py --model 7b --seq 4096 --mbs 1 --images 1 --image-side 672 \
  --specs te --precisions bf16 fp8-delayed fp8-current --no-optimizer --steps 5 --warmup 2 --json "$OUT/step_7b.json"
step papo 90 python3 tools/bench_papo_overhead.py --model 7b --layers 4 --prompts 8 --n 8 --image-side 448 \
  --response-len 256 --dtype bfloat16 --repeats 3 --micro-batch-size 8 --json "$OUT/papo_7b4.json"
step mem_3b 90 python3 tools/bench_train_step.py --model 3b --seq 4096 --mbs 1 --images 1 --image-side 448 \
  --specs te --precisions bf16 --steps 3 --warmup 1 --json "$OUT/mem_3b.json"
step track 60 python3 tools/bench_train_step.py --model 7b --layers 4 --seq 4096 --mbs 1 --images 0 --specs te \
  --precisions bf16 fp8-delayed --steps 2 --warmup 1 --track-steps 20 --json "$OUT/track.json"
echo "=== all done at t=$(( $(date +%s) - T0 ))s"

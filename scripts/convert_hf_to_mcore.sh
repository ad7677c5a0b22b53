#!/usr/bin/env bash
# HF Qwen2.5-VL folder -> Megatron dist checkpoint (loadable by training at any TP/PP).
#   HF_DIR=/models/Qwen2.5-VL-3B-Instruct OUT=ckpt/qwen3b TP=2 PP=2 bash scripts/convert_hf_to_mcore.sh
# Extra arguments are passed to tools/convert_checkpoint.py (e.g. --force).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
HF_DIR=${HF_DIR:?set HF_DIR to the HF checkpoint folder}
OUT=${OUT:?set OUT to the output checkpoint folder}
TP=${TP:-1}
PP=${PP:-1}
DTYPE=${DTYPE:-bf16}
NPROC=${NPROC:-$((TP * PP))}
PYTHON=${PYTHON:-.venv/bin/python}
MASTER_PORT=${MASTER_PORT:-29511}
"$PYTHON" -m torch.distributed.run --nproc-per-node "$NPROC" --master-addr 127.0.0.1 \
  --master-port "$MASTER_PORT" tools/convert_checkpoint.py hf-to-mcore \
  --hf "$HF_DIR" --out "$OUT" --tp "$TP" --pp "$PP" --dtype "$DTYPE" "$@"

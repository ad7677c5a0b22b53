#!/usr/bin/env bash
# Megatron checkpoint (converted or training) -> HF folder for transformers and vLLM.
#   CKPT=ckpt/qwen3b OUT=hf/qwen3b-papo TP=2 PP=2 bash scripts/convert_mcore_to_hf.sh
# Extra arguments are passed to tools/convert_checkpoint.py (e.g. --naming hf_v5 --force).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
CKPT=${CKPT:?set CKPT to the Megatron checkpoint folder}
OUT=${OUT:?set OUT to the output HF folder}
TP=${TP:-1}
PP=${PP:-1}
NPROC=${NPROC:-$((TP * PP))}
PYTHON=${PYTHON:-.venv/bin/python}
MASTER_PORT=${MASTER_PORT:-29512}
MAX_SHARD_SIZE=${MAX_SHARD_SIZE:-5GB}
"$PYTHON" -m torch.distributed.run --nproc-per-node "$NPROC" --master-addr 127.0.0.1 \
  --master-port "$MASTER_PORT" tools/convert_checkpoint.py mcore-to-hf \
  --ckpt "$CKPT" --out "$OUT" --tp "$TP" --pp "$PP" --max-shard-size "$MAX_SHARD_SIZE" "$@"

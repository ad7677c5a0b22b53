#!/usr/bin/env bash
# The authors' examples/qwen2_5_vl_7b_grpo.sh as a preset (configs/preset/qwen2_5_vl_7b_grpo.yaml):
# Qwen2.5-VL-7B on ViRL39K, 4 GPUs per run in the authors' setup (NPROC_PER_NODE=4).
#   MODEL=/models/Qwen2.5-VL-7B-Instruct TRAIN=/data/PAPO_ViRL39K_train.parquet \
#   VAL=/data/PAPO_MMK12_test.parquet bash examples/qwen2_5_vl_7b_grpo.sh [overrides...]
set -euo pipefail
: "${MODEL:?set MODEL to a local Qwen2.5-VL-7B-Instruct HF folder}"
: "${TRAIN:?set TRAIN to the ViRL39K training parquet file}"
val=()
if [[ -n "${VAL:-}" ]]; then val=("data.val_files=[$VAL]"); fi
exec "$(dirname "${BASH_SOURCE[0]}")/../scripts/train.sh" preset=qwen2_5_vl_7b_grpo \
  model.hf_dir="$MODEL" "data.train_files=[$TRAIN]" "${val[@]}" "$@"

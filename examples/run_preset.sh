#!/usr/bin/env bash
# Shared body of the per-preset example scripts: run_preset.sh <preset> [overrides...]
#   MODEL=<HF folder> TRAIN=<training parquet> [VAL=<validation parquet>]
set -euo pipefail
preset="$1"; shift
: "${MODEL:?set MODEL to a local Qwen2.5-VL-Instruct HF folder (model.hf_dir)}"
: "${TRAIN:?set TRAIN to the ViRL39K training parquet file (data.train_files)}"
val=()
if [[ -n "${VAL:-}" ]]; then val=("data.val_files=[$VAL]"); fi
exec "$(dirname "${BASH_SOURCE[0]}")/../scripts/train.sh" "preset=$preset" \
  model.hf_dir="$MODEL" "data.train_files=[$TRAIN]" "${val[@]}" "$@"

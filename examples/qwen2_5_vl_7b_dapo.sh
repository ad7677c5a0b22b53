#!/usr/bin/env bash
# Like the authors' examples/qwen2_5_vl_7b_dapo.sh (configs/preset/qwen2_5_vl_7b_dapo.yaml);
# they used 4 GPUs: NPROC_PER_NODE=4 MODEL=... TRAIN=... [VAL=...] bash examples/qwen2_5_vl_7b_dapo.sh [overrides]
exec "$(dirname "${BASH_SOURCE[0]}")/run_preset.sh" qwen2_5_vl_7b_dapo "$@"

#!/usr/bin/env bash
# Like the authors' examples/qwen2_5_vl_3b_papo_d.sh (configs/preset/qwen2_5_vl_3b_papo_d.yaml);
# they used 2 GPUs: NPROC_PER_NODE=2 MODEL=... TRAIN=... [VAL=...] bash examples/qwen2_5_vl_3b_papo_d.sh [overrides]
exec "$(dirname "${BASH_SOURCE[0]}")/run_preset.sh" qwen2_5_vl_3b_papo_d "$@"

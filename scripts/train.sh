#!/usr/bin/env bash
# Launch the main job with torchrun, on one node or many; "$@" goes to Hydra.
#
#   scripts/train.sh [--dry-run] [hydra overrides...]
#
# Environment (each optional):
#   NNODES (1)  NODE_RANK (SLURM_NODEID or 0)  MASTER_ADDR (127.0.0.1)  MASTER_PORT (29500)
#   NPROC_PER_NODE (the node's GPU count, 1 without GPUs)  PYTHON (.venv/bin/python if present)
#   SHUTDOWN_TIMEOUT (900: seconds the ranks have to save a checkpoint after SIGTERM/SIGUSR1)
# One node: a standalone rendezvous (no address needed). Several: run this on every node with the
# same MASTER_ADDR/MASTER_PORT (node 0's address) and its own NODE_RANK.
# torchrun passes SIGTERM and SIGUSR1 on to the ranks (they save and stop) and waits
# SHUTDOWN_TIMEOUT s before killing them; a rank that fails stops all ranks of the node.
# --dry-run (or DRY_RUN=1) prints the exact command instead of running it.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DRY_RUN="${DRY_RUN:-0}"
if [[ "${1:-}" == "--dry-run" ]]; then DRY_RUN=1; shift; fi
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
  sed -n '2,14p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0
fi

PYTHON="${PYTHON:-}"
if [[ -z "$PYTHON" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-${SLURM_NODEID:-0}}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-29500}"
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
  NPROC_PER_NODE="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)"
  [[ "$NPROC_PER_NODE" =~ ^[1-9][0-9]*$ ]] || NPROC_PER_NODE=1
fi
SHUTDOWN_TIMEOUT="${SHUTDOWN_TIMEOUT:-900}"
for name in NNODES NODE_RANK NPROC_PER_NODE MASTER_PORT SHUTDOWN_TIMEOUT; do
  if ! [[ "${!name}" =~ ^[0-9]+$ ]]; then
    echo "scripts/train.sh: $name='${!name}' must be a non-negative integer" >&2; exit 2
  fi
done
if (( NODE_RANK >= NNODES )); then
  echo "scripts/train.sh: NODE_RANK=$NODE_RANK must be below NNODES=$NNODES" >&2; exit 2
fi

if (( NNODES == 1 )); then
  rendezvous=(--standalone --nnodes 1)
else
  rendezvous=(--nnodes "$NNODES" --node-rank "$NODE_RANK" --rdzv-backend c10d
              --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "${RDZV_ID:-megatron_papo}")
fi
# torchrun reads these (older versions ignore them): forward SIGUSR1 too, and give the ranks
# time to save before the SIGKILL
cmd=(env PET_SIGNALS_TO_HANDLE=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1
     TORCH_ELASTIC_SHUTDOWN_TIMEOUT="$SHUTDOWN_TIMEOUT"
     "$PYTHON" -m torch.distributed.run "${rendezvous[@]}" --nproc-per-node "$NPROC_PER_NODE"
     --max-restarts 0 -m megatron_papo.train "$@")

if [[ "$DRY_RUN" == 1 ]]; then
  printf '%q ' "${cmd[@]}"; printf '\n'; exit 0
fi
cd "$ROOT"
exec "${cmd[@]}"

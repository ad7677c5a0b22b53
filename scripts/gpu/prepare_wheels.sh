#!/usr/bin/env bash
# Here (no GPU), from the project root: the cp312 wheels the GPU tools need beyond what the lent
# H200's image has (Python 3.12, torch 2.11+cu130, transformers 5.17), into ./.whl (git-ignored),
# plus the on-device script. Transformer Engine comes from the kit (../shared/gpu/prepare.sh ->
# ./.gpucarry). Then, with the `device` tool (each call right after the previous one; the
# machine is given back ~30 s after a call):
#   call 1:    carry [".gpucarry/c1", ".gpucarry/p0"]  command: bash .gpucarry/p0/on_device.sh stash
#   calls 2-5: carry [".gpucarry/pN"]                   command: bash .gpucarry/pN/on_device.sh stash
#   call 6:    carry [".gpucarry/p5", ".whl"]           command: BUDGET=440 bash .whl/run_checks.sh
# Measured 2026-12-04: the five stash calls ~50 s after a ~45-90 s start, the install ~35 s.
set -euo pipefail
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
plat=(--no-deps --only-binary=:all: --python-version 3.12 --implementation cp
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl)
# megatron-core 0.16.1: the version CI tests (the kit's 0.19.2 stays installed underneath)
python3 -m pip download -q "${plat[@]}" megatron-core==0.16.1 hydra-core==1.3.2 omegaconf==2.3.0 \
  dill einops
python3 -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3   # sdist only on PyPI
cp "$(dirname "$0")/run_checks.sh" .whl/
ls -la .whl

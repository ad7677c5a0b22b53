#!/usr/bin/env python
"""Convert Qwen2.5-VL checkpoints between HF and Megatron (dist checkpoint), at any TP/PP.

  hf-to-mcore   HF folder (safetensors + config.json + tokenizer/processor files)
                -> Megatron dist checkpoint, loadable by training at ANY TP/PP
  mcore-to-hf   Megatron checkpoint (converted, or a training checkpoint with optimizer state)
                -> HF folder that transformers and vLLM load
  verify        max abs logit difference of transformers (HF folder) vs our model (Megatron
                checkpoint at --tp/--pp) on a text+image sample; exits 1 above --tolerance

Runs as one process or under torchrun (world size = a multiple of TP x PP), e.g.
  torchrun --nproc-per-node 4 tools/convert_checkpoint.py hf-to-mcore --hf Qwen2.5-VL-3B \\
      --out ckpt/qwen3b --tp 2 --pp 2
Outputs are written atomically (a crash never leaves a complete-looking folder) and are never
overwritten without --force.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="convert_checkpoint.py", description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def parallel(p):
        p.add_argument("--tp", type=_positive_int, default=1,
                       help="tensor-parallel size (default 1)")
        p.add_argument("--pp", type=_positive_int, default=1,
                       help="pipeline-parallel size (default 1)")
        p.add_argument("--first-stage-layers", type=_positive_int, default=None,
                       help="decoder layers of the first pipeline stage (default: even stages;"
                            " tools/pp_stages.py suggests a split)")
        p.add_argument("--last-stage-layers", type=_positive_int, default=None,
                       help="decoder layers of the last pipeline stage (default: even stages)")

    a = sub.add_parser("hf-to-mcore", help="HF folder -> Megatron dist checkpoint")
    a.add_argument("--hf", required=True, help="HF checkpoint folder")
    a.add_argument("--out", required=True, help="output checkpoint folder (must not exist)")
    parallel(a)
    a.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"],
                   help="parameter dtype of the Megatron checkpoint (default bf16)")
    a.add_argument("--force", action="store_true", help="replace --out if it exists")
    a.add_argument("--force-unlock", action="store_true",
                   help="take --out's lock even if the job holding it seems alive")

    b = sub.add_parser("mcore-to-hf", help="Megatron checkpoint -> HF folder")
    b.add_argument("--ckpt", required=True, help="Megatron checkpoint folder")
    b.add_argument("--out", required=True, help="output HF folder (must not exist)")
    parallel(b)
    b.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"],
                   help="dtype of the HF weights (default: the checkpoint's)")
    b.add_argument("--naming", default="hf", choices=["hf", "hf_v5"],
                   help="tensor names: 'hf' = model.*/visual.* (the released checkpoints and "
                        "what transformers' save_pretrained writes; default), 'hf_v5' = "
                        "model.language_model.*/model.visual.* (transformers 5 module names)")
    b.add_argument("--max-shard-size", default=_size("5GB"), type=_size,
                   help="largest safetensors file, in transformers' units: 5GB = 5*10^9 "
                        "bytes, 5GiB = 5*2^30, also KB/MB/TB, KiB/MiB/TiB or a byte count "
                        "(default 5GB)")
    b.add_argument("--hf-config", default=None,
                   help="folder with config.json/tokenizer to use instead of the checkpoint's hf/")
    b.add_argument("--force", action="store_true", help="replace --out if it exists")
    b.add_argument("--force-unlock", action="store_true",
                   help="take --out's lock even if the job holding it seems alive")

    c = sub.add_parser("verify", help="compare logits: transformers(HF) vs ours(Megatron)")
    c.add_argument("--hf", required=True, help="HF checkpoint folder")
    c.add_argument("--ckpt", required=True, help="Megatron checkpoint folder")
    parallel(c)
    c.add_argument("--tolerance", type=_non_negative_float, default=1e-3,
                   help="max abs logit difference allowed (default 1e-3; fp32 both sides)")
    return parser


_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def _size(text: str) -> int:
    """A byte count with transformers' units (``5GB`` = 5 * 10^9, ``5GiB`` = 5 * 2^30)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).upper() if match else ""
    if not match or (unit and unit not in _UNITS):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a size: use a number with one of B, KB, MB, GB, TB, KiB, MiB, "
            "GiB, TiB (e.g. 5GB = 5*10^9 bytes, 5GiB = 5*2^30) or a byte count")
    size = int(float(match.group(1)) * _UNITS[unit or "B"])
    if match.group(2).endswith("b") and unit in ("KB", "MB", "GB", "TB"):
        size //= 8  # "5Gb": gigabits, as transformers reads it
    if size <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: the shard size must be positive")
    return size


def _number(convert, smallest: float, what: str):
    """An argparse type: ``convert``ed text of at least ``smallest``, else a one-line error."""
    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not value >= smallest:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        return value
    return parse


_positive_int = _number(int, 1, "a positive whole number")
_non_negative_float = _number(float, 0.0, "a non-negative number")


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    from megatron_papo.compat import apply_cpu_patches

    apply_cpu_patches()
    import torch.distributed as dist

    from megatron_papo.cli import internal_error, is_user_error, quiet_redundant_logs, report
    from megatron_papo.conversion import checkpoint as ck
    from megatron_papo.parallel import init_processes
    from megatron_papo.runlock import acquire_on_rank0, output_lock, release_all

    quiet_redundant_logs()
    init_processes(timeout_minutes=60)  # long single-rank reads/writes between collectives
    stages = dict(first_stage_layers=args.first_stage_layers,
                  last_stage_layers=args.last_stage_layers)
    code = 0
    locks = []
    try:
        if args.command != "verify":  # one writer per output folder, refused before any work
            locks = [output_lock(args.out, f"--out {args.out}", "pass --force-unlock")]
            acquire_on_rank0(locks, args.force_unlock)
        if args.command == "hf-to-mcore":
            ck.hf_to_mcore(args.hf, args.out, args.tp, args.pp, args.dtype, args.force, **stages)
        elif args.command == "mcore-to-hf":
            from megatron_papo.conversion.locate import ModelPathError, resolve_model_path

            found = resolve_model_path(args.ckpt, option="--ckpt")
            if not found.is_megatron:
                raise ModelPathError(f"--ckpt {args.ckpt!r} is an HF folder: mcore-to-hf takes a "
                                     "Megatron checkpoint or a run folder")
            ck.mcore_to_hf(found.path, args.out, args.tp, args.pp, args.dtype, args.naming,
                           args.max_shard_size, args.force, args.hf_config, **stages)
        else:
            diff = ck.verify_conversion(args.hf, args.ckpt, args.tp, args.pp, **stages)
            ok = diff <= args.tolerance
            if dist.get_rank() == 0:
                print(f"[verify] max abs logit difference {diff:.3e} "
                      f"({'OK' if ok else 'ABOVE'} tolerance {args.tolerance:g})", flush=True)
            code = 0 if ok else 1
    except Exception as err:  # noqa: BLE001
        if not is_user_error(err):
            code = internal_error(err, "convert_checkpoint")
        else:
            report(err)  # one line, once for all ranks
            code = 2
    finally:
        release_all(locks)
        if dist.is_initialized():
            dist.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main())

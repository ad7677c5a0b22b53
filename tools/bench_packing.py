#!/usr/bin/env python
"""Tokens/s and peak memory of one PAPO update step on a long-tailed rollout batch: padded
micro-batches (every sample padded to the batch's longest) vs packed ones (rl/packing.py: each
micro-batch's samples in one row, micro-batches bin-packed under a token budget), same model,
same batch, same run.

  python tools/bench_packing.py                      # the CPU setting of docs/benchmarks.md
  python tools/bench_packing.py --hidden 512 --layers 4 --samples 32 --budget 8192

The batch: ``--samples`` samples of one image (``--image-tokens`` merged tokens: 256 = 448 x 448
px) + ``--prompt-len`` prompt tokens + a response whose length is log-normal with median
``--median`` and sigma ``--sigma``, clipped to [``--min-response``, ``--max-response``] (RL
responses: most short, a few running to the cap). The padded path runs ``--micro-batch-size``
samples per forward/backward; the packed path ``--budget`` tokens. Tokens/s counts real
(non-padding) tokens; "padding removed" is the share of the padded path's token slots that were
padding. Peak memory: live malloc bytes above the level before the step (testing/memory.py),
measured, the larger of the two variants' runs. Timings: median of --repeats, interleaved.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def response_lengths(args) -> list[int]:
    import numpy as np

    rng = np.random.default_rng(args.seed)
    raw = rng.lognormal(np.log(args.median), args.sigma, args.samples)
    return [int(x) for x in np.clip(np.round(raw), args.min_response, args.max_response)]


def rollout_batch(spec, hf: dict, args):
    """One image per sample (``image_tokens`` merged tokens), random prompt and response ids,
    right-padded; random advantages, old and masked log-probs (the frozen branch)."""
    import torch

    from megatron_papo.models.qwen2_5_vl.rope_index import get_rope_index
    from megatron_papo.rl.step import RolloutBatch

    g = torch.Generator().manual_seed(args.seed)
    vision = hf["vision_config"]
    patch, merge = vision["patch_size"], vision["spatial_merge_size"]
    side = int(round(args.image_tokens ** 0.5)) * merge  # patches per side
    low = min(spec.image_token_id, spec.vision_start_token_id) - 1
    lengths = response_lengths(args)
    rows, prompt_lens = [], []
    for n in lengths:
        prompt = ([spec.vision_start_token_id] + [spec.image_token_id] * (side // merge) ** 2
                  + [spec.vision_end_token_id]
                  + torch.randint(1, low, (args.prompt_len,), generator=g).tolist())
        rows.append(prompt + torch.randint(1, low, (n,), generator=g).tolist())
        prompt_lens.append(len(prompt))
    width = max(map(len, rows))
    count = len(rows)
    input_ids = torch.zeros(count, width, dtype=torch.long)
    attention = torch.zeros_like(input_ids)
    response = torch.zeros_like(input_ids)
    for i, (row, start) in enumerate(zip(rows, prompt_lens)):
        input_ids[i, :len(row)] = torch.tensor(row)
        attention[i, :len(row)] = 1
        response[i, start:len(row)] = 1
    grid = torch.tensor([[1, side, side]] * count)
    pixels = torch.randn(count * side * side, 3 * 2 * patch * patch, generator=g)
    old = -torch.rand(count, width, generator=g) * response
    return RolloutBatch(
        input_ids=input_ids, attention_mask=attention,
        position_ids=get_rope_index(input_ids, grid, spec.image_token_id, merge,
                                    attention_mask=attention),
        response_mask=response, advantages=torch.randn(count, generator=g),
        pixel_values=pixels, image_grid_thw=grid,
        images_per_sample=torch.ones(count, dtype=torch.long),
        masked_pixel_values=pixels * 0, old_logp=old, ref_logp=old.clone(),
        masked_logp=old - 0.1 * response)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="bench_packing.py", description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256, help="LM hidden size")
    parser.add_argument("--layers", type=int, default=4, help="LM decoder layers")
    parser.add_argument("--samples", type=int, default=16, help="samples in the batch")
    parser.add_argument("--image-tokens", type=int, default=256,
                        help="merged image tokens per sample (a square number)")
    parser.add_argument("--prompt-len", type=int, default=40, help="prompt text tokens")
    parser.add_argument("--median", type=float, default=300, help="median response tokens")
    parser.add_argument("--sigma", type=float, default=0.8, help="log-normal sigma")
    parser.add_argument("--min-response", type=int, default=10)
    parser.add_argument("--max-response", type=int, default=2048)
    parser.add_argument("--micro-batch-size", type=int, default=4,
                        help="samples per micro-batch, padded path")
    parser.add_argument("--budget", type=int, default=0,
                        help="tokens per micro-batch, packed path (default: the padded path's "
                             "micro-batch size x the longest sample)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name in ("samples", "micro_batch_size", "repeats", "hidden", "layers", "image_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if int(round(args.image_tokens ** 0.5)) ** 2 != args.image_tokens:
        parser.error(f"--image-tokens {args.image_tokens} must be a square number (256, 1024)")
    if args.samples % args.micro_batch_size:
        parser.error(f"--micro-batch-size {args.micro_batch_size} does not divide --samples "
                     f"{args.samples}")

    from megatron_papo.compat import apply_cpu_patches

    apply_cpu_patches()
    import torch
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from megatron_papo.models.qwen2_5_vl import text_spec_from_hf
    from megatron_papo.models.qwen2_5_vl.provider import build_model_chunks
    from megatron_papo.parallel import init_processes, initialize_model_parallel
    from megatron_papo.rl.packing import sample_lengths
    from megatron_papo.rl.step import PolicyUpdater, UpdateConfig
    from megatron_papo.testing.memory import PeakLive
    from megatron_papo.train.config import algorithm_preset
    from megatron_papo.models.qwen2_5_vl.tiny import sized_hf_config

    hf = sized_hf_config(args.hidden, args.layers, vision_hidden=64, initializer_range=0.02)
    hf["text_config"]["max_position_embeddings"] = 32768
    spec = text_spec_from_hf(hf)
    init_processes()
    initialize_model_parallel(1, 1)
    chunks = build_model_chunks(spec, use_distributed_optimizer=True)
    optimizer = get_megatron_optimizer(OptimizerConfig(
        optimizer="adam", lr=1e-6, use_distributed_optimizer=True, params_dtype=torch.float32,
        clip_grad=1.0), chunks)
    batch = rollout_batch(spec, hf, args)
    lengths = sample_lengths(batch.attention_mask)
    width = batch.input_ids.shape[1]
    budget = args.budget or args.micro_batch_size * width
    if budget < max(lengths):
        parser.error(f"--budget {budget} is below the longest sample ({max(lengths)} tokens)")
    loss = algorithm_preset("papo_no_kl_ref").loss

    def updater(packing):
        return PolicyUpdater(chunks, optimizer, UpdateConfig(
            micro_batch_size=args.micro_batch_size, mini_batch_size=len(batch),
            masked_branch="frozen", loss=loss, packing=packing,
            max_tokens_per_micro_batch=budget if packing else 0))

    runs = {"padded": updater(False), "packed": updater(True)}

    def once(name):
        with PeakLive() as peak:
            start = time.perf_counter()
            runs[name].update(batch)
            seconds = time.perf_counter() - start
        return seconds, peak.peak

    for name in runs:  # warm-up
        once(name)
    times = {name: [] for name in runs}
    peaks = {name: 0 for name in runs}
    for _ in range(args.repeats):
        for name in runs:
            seconds, peak = once(name)
            times[name].append(seconds)
            peaks[name] = max(peaks[name], peak)
    median = {name: statistics.median(v) for name, v in times.items()}
    tokens = sum(lengths)
    slots = len(lengths) * width
    micro = len(runs["packed"].micro_batches(batch, paired=False)[0])
    print(f"machine: CPU ({torch.get_num_threads()} threads), torch {torch.__version__}, float32")
    print(f"model: hidden {args.hidden}, {args.layers} layers (vision tower depth 2, hidden 64); "
          f"batch {len(lengths)} samples, {args.image_tokens} image tokens + {args.prompt_len} "
          f"prompt tokens + responses log-normal (median {args.median:g}, sigma {args.sigma}, "
          f"clipped to [{args.min_response}, {args.max_response}]: min {min(lengths)}, median "
          f"{int(statistics.median(lengths))}, max {max(lengths)} tokens per sample); "
          f"PAPO frozen update, median of {args.repeats}")
    print(f"padding removed: {1 - tokens / slots:.1%} of the padded path's {slots} token slots "
          f"({tokens} real tokens)")
    print(f"padded: {args.micro_batch_size} samples x {width} tokens per micro-batch "
          f"({len(lengths) // args.micro_batch_size} micro-batches): {median['padded']:.2f} s, "
          f"{tokens / median['padded']:.0f} tokens/s, peak {peaks['padded'] / 2**20:.0f} MiB")
    print(f"packed: <= {budget} tokens per micro-batch ({micro} micro-batches): "
          f"{median['packed']:.2f} s, {tokens / median['packed']:.0f} tokens/s, peak "
          f"{peaks['packed'] / 2**20:.0f} MiB")
    print(f"packed / padded: {median['padded'] / median['packed']:.2f}x tokens/s, "
          f"{peaks['packed'] / max(peaks['padded'], 1):.2f}x peak memory")
    return 0


if __name__ == "__main__":
    sys.exit(main())

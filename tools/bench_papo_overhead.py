#!/usr/bin/env python
"""Wall time of one PAPO update over one GRPO update on the same rollout batch, model and layout:
the masked branch ``frozen`` (the authors': one extra forward-only pass over the masked images,
then the update) and ``live`` (original and masked samples in one forward/backward).

  python tools/bench_papo_overhead.py                          # the default job's model and batch
  python tools/bench_papo_overhead.py --model 7b --layers 4 --prompts 8 --n 8 --image-side 448 (GPU)

GRPO = the chosen algorithm's loss with the perception and entropy terms off (same clipping,
aggregation and reference-KL setting), so the ratio isolates what PAPO adds. Goals: frozen
<= 1.15x, live <= 2.0x. Timings: median of --repeats, variants interleaved.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

GOALS = {"frozen": 1.15, "live": 2.0}


def _hf_config(args) -> dict:
    from megatron_papo.models.qwen2_5_vl.config import preset_hf_config
    from megatron_papo.models.qwen2_5_vl.tiny import sized_hf_config

    if args.model == "tiny":  # the default job's model (configs/model/tiny.yaml)
        return sized_hf_config(args.hidden, args.layers or 2, vision_hidden=64,
                               initializer_range=0.1)
    config = preset_hf_config(args.model)
    if args.layers:
        config["num_hidden_layers"] = args.layers
    return config


def rollout_batch(spec, hf: dict, args, device, seed: int = 0):
    """``prompts`` x ``n`` samples: prompt text + one image per prompt (shared by its samples),
    a response of ``response_len`` tokens, random advantages and old log-probs; masked images
    with ``mask_ratio`` of their patches blackened (zero pixels)."""
    import torch

    from megatron_papo.models.qwen2_5_vl.rope_index import get_rope_index
    from megatron_papo.rl.step import RolloutBatch

    g = torch.Generator().manual_seed(seed)
    vision = hf.get("vision_config") or {}
    patch, merge = vision.get("patch_size", 14), vision.get("spatial_merge_size", 2)
    side = max(merge, args.image_side // (patch * merge) * merge)
    low = min(spec.image_token_id, spec.vision_start_token_id) - 1
    rows, pixels, masked, grids = [], [], [], []
    for _ in range(args.prompts):
        image = torch.randn(side * side, 3 * 2 * patch * patch, generator=g)
        keep = (torch.rand(side * side, 1, generator=g) >= args.mask_ratio).to(image.dtype)
        prompt = torch.randint(1, low, (args.prompt_len,), generator=g).tolist()
        ids = ([spec.vision_start_token_id] + [spec.image_token_id] * (side * side // merge ** 2)
               + [spec.vision_end_token_id] + prompt)
        for _ in range(args.n):
            response = torch.randint(1, low, (args.response_len,), generator=g).tolist()
            rows.append(ids + response)
            grids.append([1, side, side])
            pixels.append(image)
            masked.append(image * keep)
    input_ids = torch.tensor(rows)
    n, length = input_ids.shape
    response_mask = torch.zeros_like(input_ids)
    response_mask[:, length - args.response_len:] = 1
    grid = torch.tensor(grids)
    old = -torch.rand(n, length, generator=g) * response_mask
    batch = RolloutBatch(
        input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
        position_ids=get_rope_index(input_ids, grid, spec.image_token_id),
        response_mask=response_mask, advantages=torch.randn(n, generator=g),
        pixel_values=torch.cat(pixels), image_grid_thw=grid,
        images_per_sample=torch.ones(n, dtype=torch.long),
        masked_pixel_values=torch.cat(masked), old_logp=old, ref_logp=old.clone())
    return batch.to(device)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="bench_papo_overhead.py", description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="tiny | 3b | 7b | 32b | 72b (shapes)")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (override)")
    parser.add_argument("--hidden", type=int, default=64, help="hidden size (tiny only)")
    parser.add_argument("--algorithm", default="papo_no_kl_ref",
                        help="the PAPO algorithm (configs/algorithm/<name>.yaml) whose terms are timed")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--n", type=int, default=8, help="samples per prompt")
    parser.add_argument("--prompt-len", type=int, default=12, help="prompt text tokens")
    parser.add_argument("--response-len", type=int, default=12)
    parser.add_argument("--image-side", type=int, default=56, help="pixels")
    parser.add_argument("--mask-ratio", type=float, default=0.6)
    parser.add_argument("--micro-batch-size", type=int, default=512)
    parser.add_argument("--optimizer-steps", type=int, default=1, help="per rollout batch")
    parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16"),
                        help="default: bfloat16 on a GPU, float32 on CPU")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    for name in ("prompts", "n", "response_len", "repeats", "micro_batch_size",
                 "optimizer_steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    samples = args.prompts * args.n
    if samples % args.optimizer_steps:
        parser.error(f"--optimizer-steps {args.optimizer_steps} does not divide the {samples} "
                     "samples (--prompts x --n)")
    mini = samples // args.optimizer_steps
    micro = min(args.micro_batch_size, mini)
    if mini % micro:
        parser.error(f"--micro-batch-size {micro} does not divide the {mini} samples per "
                     "optimizer step")

    from megatron_papo.compat import apply_cpu_patches

    apply_cpu_patches()
    import torch
    import torch.distributed as dist
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from megatron_papo.models.qwen2_5_vl import text_spec_from_hf
    from megatron_papo.models.qwen2_5_vl.config import ModelConfigError
    from megatron_papo.models.qwen2_5_vl.provider import build_model_chunks
    from megatron_papo.parallel import init_processes, initialize_model_parallel
    from megatron_papo.rl.step import PolicyUpdater, UpdateConfig
    from megatron_papo.train.config import algorithm_names, algorithm_preset

    if args.algorithm not in algorithm_names():
        parser.error(f"--algorithm {args.algorithm!r}: choose one of {algorithm_names()}")
    papo = algorithm_preset(args.algorithm).loss
    if not papo.needs_masked_branch:
        parser.error(f"--algorithm {args.algorithm} has no perception term: choose a PAPO preset")
    grpo = dataclasses.replace(papo, prcp_gamma=0.0, entropy_eta_original=0.0,
                               entropy_eta_masked=0.0)
    try:
        hf = _hf_config(args)
        spec = text_spec_from_hf(hf)
    except ModelConfigError as err:
        print(f"error: --model {args.model}: {err}", file=sys.stderr)
        return 2
    cuda = torch.cuda.is_available()
    dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    init_processes()
    initialize_model_parallel(1, 1)
    chunks = build_model_chunks(spec, params_dtype=dtype, use_distributed_optimizer=True)
    if cuda:
        for chunk in chunks:
            chunk.cuda()
    optimizer = get_megatron_optimizer(OptimizerConfig(
        optimizer="adam", lr=1e-6, use_distributed_optimizer=True, params_dtype=dtype,
        bf16=dtype == torch.bfloat16, clip_grad=1.0), chunks)
    device = torch.device("cuda" if cuda else "cpu")
    batch = rollout_batch(spec, hf, args, device)
    if dtype != torch.float32:
        batch = dataclasses.replace(batch, pixel_values=batch.pixel_values.to(dtype),
                                    masked_pixel_values=batch.masked_pixel_values.to(dtype))

    def updater(loss, branch):
        return PolicyUpdater(chunks, optimizer, UpdateConfig(
            micro_batch_size=micro, mini_batch_size=mini, masked_branch=branch, loss=loss))

    runs = {"grpo": updater(grpo, "frozen"), "frozen": updater(papo, "frozen"),
            "live": updater(papo, "live")}

    def once(name):
        start = time.perf_counter()
        run = runs[name]
        b = batch
        if name == "frozen":
            b = dataclasses.replace(batch, masked_logp=run.compute_logprobs(batch, masked=True))
        run.update(b)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for name in runs:  # warm-up
        once(name)
    times = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name in runs:
            times[name].append(once(name))
    median = {name: statistics.median(values) for name, values in times.items()}
    device_name = torch.cuda.get_device_name() if cuda else \
        f"CPU ({torch.get_num_threads()} threads)"
    print(f"machine: {device_name}, torch {torch.__version__}, {dtype}")
    print(f"model: {args.model} ({spec.transformer['num_layers']} layers, hidden "
          f"{spec.transformer['hidden_size']}); batch {args.prompts} prompts x {args.n} samples "
          f"of {batch.input_ids.shape[1]} tokens (image {args.image_side}px, response "
          f"{args.response_len}), {args.optimizer_steps} optimizer step(s) of {mini}, "
          f"micro-batch {micro}; loss {args.algorithm} (gamma {papo.prcp_gamma}, eta "
          f"{papo.entropy_eta_original}/{papo.entropy_eta_masked}); median of {args.repeats}")
    results = {}
    for name in runs:
        ratio = median[name] / median["grpo"]
        goal = GOALS.get(name)
        verdict = "" if goal is None else f"  (goal <= {goal:.2f}x: " \
            f"{'met' if ratio <= goal else 'MISSED'})"
        print(f"{name:7} {median[name] * 1e3:9.1f} ms   {ratio:5.2f}x GRPO{verdict}")
        results[name] = dict(ms=median[name] * 1e3, ratio=ratio, goal=goal)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(machine=device_name, date=time.strftime("%Y-%m-%d"),
                           argv=sys.argv[1:], results=results), f, indent=1)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())

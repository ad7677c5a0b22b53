#!/usr/bin/env python
"""Training-step speed of our Qwen2.5-VL (fwd + bwd + optimizer) SIDE BY SIDE with a plain
megatron-core GPTModel of the same language-model shapes, in the same run: ms per step, tokens/s,
model TFLOP/s and the ratio to the plain model, for each layer spec (local, te) and precision
(fp32, bf16, fp8-delayed, fp8-current).

  # an H100/H200 with the GPU kit (Transformer Engine): 7B shapes, one 672x672 image per sample
  python tools/bench_train_step.py --model 7b --seq 4096 --mbs 1 --images 1 \\
      --specs te --precisions bf16 fp8-delayed fp8-current --no-optimizer
  # any machine, toy size (what CI runs)
  python tools/bench_train_step.py --model tiny --seq 128 --mbs 2 --steps 2 --precisions fp32

Rows: ``gpt`` = megatron-core's GPTModel (RoPE, the same TransformerConfig: layers, widths,
heads, SwiGLU, QKV bias); ``ours`` = our model on the same number of text tokens (the language
model alone: this ratio should stay <= 1.10); ``ours+img`` = our model with the images' tokens
inside the same sequence length, the vision tower included (its FLOPs are counted). Model FLOPs
are the matmul FLOPs of the forward pass x 3 (no recompute counted), as for MFU.

``--track-steps N``: N optimizer steps of ``ours+img`` (or ``ours``) on ONE fixed batch from the
same initial weights per precision of a spec; prints each loss and the largest relative gap to
the first precision (FP8 must track bf16).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PRECISIONS = ("fp32", "bf16", "fp8-delayed", "fp8-current")


def _problem(spec: str, precision: str) -> str | None:
    """Why (spec, precision) cannot run here, as one line; None when it can."""
    from megatron_papo.models.qwen2_5_vl import precision as P

    problem = P.layer_spec_problem(spec, key="--specs")
    if problem is None and precision.startswith("fp8"):
        problem = P.fp8_problem("hybrid", precision.split("-")[1], spec, "bfloat16", prefix="")
        if problem:
            problem = (f"--precisions {precision} (with --specs {spec}): "
                       + problem.replace("; set fp8=null", ""))
    return problem


def _hf_config(args) -> dict:
    from megatron_papo.models.qwen2_5_vl import load_hf_config
    from megatron_papo.models.qwen2_5_vl.config import preset_hf_config
    from megatron_papo.models.qwen2_5_vl.tiny import sized_hf_config

    if args.model == "tiny":
        config = sized_hf_config(args.hidden or 128, args.layers or 4, vision_hidden=64)
    elif os.path.isdir(args.model) or args.model.endswith(".json"):
        config = load_hf_config(args.model)
    else:
        config = preset_hf_config(args.model)
    if args.layers and args.model != "tiny":
        (config.get("text_config") or config)["num_hidden_layers"] = args.layers
    return config


def _flops(hf: dict, seq: int, images: int, pixels: int, with_vision: bool) -> float:
    """Forward matmul FLOPs of one sample (the whole model as one pipeline stage)."""
    from megatron_papo.models.qwen2_5_vl.stages import stage_costs

    return stage_costs(hf, 1, seq_len=seq, image_pixels=pixels,
                       images=images if with_vision else 0)[0].flops


def _inputs(spec, hf: dict, args, device, with_images: bool, seed: int = 0) -> dict:
    import torch

    from megatron_papo.models.qwen2_5_vl.rope_index import get_rope_index

    g = torch.Generator().manual_seed(seed)
    vision = hf.get("vision_config") or {}
    patch, merge = vision.get("patch_size", 14), vision.get("spatial_merge_size", 2)
    side = args.image_side // (patch * merge) * merge  # patches per side, a multiple of merge
    per_image = side * side // merge ** 2
    rows, pixels, grids = [], [], []
    low = min(spec.image_token_id, spec.vision_start_token_id) - 1
    for _ in range(args.mbs):
        ids = []
        for _ in range(args.images if with_images else 0):
            ids += [spec.vision_start_token_id] + [spec.image_token_id] * per_image \
                + [spec.vision_end_token_id]
            grids.append([1, side, side])
            pixels.append(torch.randn(side * side, 3 * 2 * patch * patch, generator=g))
        if len(ids) >= args.seq:
            raise SystemExit(f"error: --images {args.images} of {args.image_side} px need "
                             f"{len(ids)} tokens, more than --seq {args.seq}: raise --seq or "
                             "lower --images / --image-side")
        ids += torch.randint(1, low, (args.seq - len(ids),), generator=g).tolist()
        rows.append(ids)
    input_ids = torch.tensor(rows)
    grid = torch.tensor(grids) if grids else None
    batch = dict(input_ids=input_ids, labels=torch.roll(input_ids, -1, dims=1),
                 position_ids=get_rope_index(input_ids, grid, spec.image_token_id),
                 pixel_values=torch.cat(pixels) if pixels else None, image_grid_thw=grid)
    return {k: (v.to(device) if v is not None else None) for k, v in batch.items()}


def _build(kind: str, spec, layer_spec: str, precision: str, args, seed: int):
    """(DDP-wrapped model chunk, optimizer or None) of ``kind`` (gpt | ours)."""
    import torch
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.models.gpt import GPTModel
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_papo.models.qwen2_5_vl import build_qwen25vl, language_transformer_config
    from megatron_papo.models.qwen2_5_vl.precision import fp8_fields
    from megatron_papo.models.qwen2_5_vl.specs import language_layer_spec

    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    fp8 = fp8_fields("hybrid", precision.split("-")[1]) if precision.startswith("fp8") else {}
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    config = language_transformer_config(spec, params_dtype=dtype, **fp8)
    if kind == "gpt":
        model = GPTModel(config, language_layer_spec(layer_spec), vocab_size=spec.vocab_size,
                         max_sequence_length=max(args.seq, 4096), position_embedding_type="rope",
                         rotary_base=spec.rotary_base,
                         share_embeddings_and_output_weights=spec.tie_word_embeddings)
    else:
        model = build_qwen25vl(spec, config, layer_spec)
    if torch.cuda.is_available():
        model.cuda()
    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=True), model)
    optimizer = None
    if not args.no_optimizer:
        optimizer = get_megatron_optimizer(OptimizerConfig(
            optimizer="adam", lr=args.lr, use_distributed_optimizer=True, params_dtype=dtype,
            bf16=dtype == torch.bfloat16, clip_grad=1.0), [ddp])
    return ddp, optimizer


def _train_step(kind: str, model, optimizer, batch: dict) -> float:
    """One fwd+bwd(+optimizer step) through megatron-core's schedule; returns the mean loss."""
    import torch
    from megatron.core.pipeline_parallel import get_forward_backward_func

    def forward_step(data_iterator, module):
        b = next(data_iterator)
        if kind == "gpt":
            out = module(b["input_ids"], b["position_ids"][0], None, labels=b["labels"])
        else:
            out = module(b["input_ids"], b["position_ids"], None, b["pixel_values"],
                         b["image_grid_thw"], labels=b["labels"])

        def loss(per_token):
            value = per_token.float().mean()
            return value, {"loss": value.detach()}
        return out, loss

    model.zero_grad_buffer()
    if optimizer is not None:
        optimizer.zero_grad()
    result = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter([batch]), model=[model],
        num_microbatches=1, seq_length=batch["input_ids"].shape[1],
        micro_batch_size=batch["input_ids"].shape[0], forward_only=False)
    if optimizer is not None:
        optimizer.step()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return float(result[0]["loss"])


def _time(kind, model, optimizer, batch, args) -> float:
    for _ in range(args.warmup):
        _train_step(kind, model, optimizer, batch)
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        _train_step(kind, model, optimizer, batch)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _machine() -> str:
    import megatron.core
    import torch

    if torch.cuda.is_available():
        device = torch.cuda.get_device_name()
    else:
        device = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} "\
                 "threads)"
    parts = [device, f"torch {torch.__version__}", f"megatron-core {megatron.core.__version__}"]
    try:
        import transformer_engine

        parts.append(f"Transformer Engine {transformer_engine.__version__}")
    except ImportError:
        pass
    return ", ".join(parts)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="bench_train_step.py", description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny",
                        help="tiny | a size (3b, 7b, 32b, 72b: public shapes) | an HF folder")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (override)")
    parser.add_argument("--hidden", type=int, default=None, help="hidden size (tiny only)")
    parser.add_argument("--seq", type=int, default=4096, help="tokens per sample")
    parser.add_argument("--mbs", type=int, default=1, help="samples per step")
    parser.add_argument("--images", type=int, default=1, help="images per sample (0: text only)")
    parser.add_argument("--image-side", type=int, default=672, help="image side in pixels")
    parser.add_argument("--specs", nargs="+", default=["local"], choices=("local", "te"))
    parser.add_argument("--precisions", nargs="+", default=None, choices=PRECISIONS,
                        help="default: bf16 on a GPU, fp32 on CPU")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (median)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--no-optimizer", action="store_true",
                        help="fwd+bwd only (a 7B LM with Adam states does not fit one 80 GB GPU)")
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--track-steps", type=int, default=0,
                        help="optimizer steps on one fixed batch per precision (loss tracking)")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    for name in ("seq", "mbs", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    if args.images < 0 or args.warmup < 0 or args.track_steps < 0:
        parser.error("--images, --warmup and --track-steps must be >= 0")
    if args.track_steps and args.no_optimizer:
        parser.error("--track-steps needs the optimizer: drop --no-optimizer")

    from megatron_papo.compat import apply_cpu_patches

    apply_cpu_patches()  # no-op with CUDA
    import torch
    import torch.distributed as dist

    cuda = torch.cuda.is_available()
    precisions = args.precisions or (["bf16"] if cuda else ["fp32"])
    problems = [p for p in (_problem(s, q) for s in args.specs for q in precisions) if p]
    if problems:
        print(f"error: {problems[0]}", file=sys.stderr)
        return 2
    from megatron_papo.models.qwen2_5_vl import text_spec_from_hf
    from megatron_papo.models.qwen2_5_vl.config import ModelConfigError
    from megatron_papo.parallel import init_processes, initialize_model_parallel

    try:
        hf = _hf_config(args)
        spec = text_spec_from_hf(hf)
    except (ModelConfigError, OSError, ValueError) as err:
        print(f"error: --model {args.model}: {err}", file=sys.stderr)
        return 2
    init_processes()
    initialize_model_parallel(1, 1)
    device = torch.device("cuda" if cuda else "cpu")
    with_images = args.images > 0 and bool(spec.vision)
    pixels = (args.image_side // 28 * 28) ** 2
    kinds = [("gpt", False), ("ours", False)] + ([("ours+img", True)] if with_images else [])
    machine = _machine()
    print(f"machine: {machine}")
    print(f"model: {args.model} ({spec.transformer['num_layers']} layers, hidden "
          f"{spec.transformer['hidden_size']}), "
          f"seq {args.seq}, mbs {args.mbs}, images/sample {args.images if with_images else 0} "
          f"of {args.image_side}px, {'fwd+bwd' if args.no_optimizer else 'fwd+bwd+optimizer'}, "
          f"median of {args.steps} steps after {args.warmup}")
    rows, tracks = [], []
    header = (f"{'spec':5} {'precision':12} {'model':9} {'ms/step':>9} {'tokens/s':>10} "
              f"{'TFLOP/s':>8} {'vs gpt':>7} {'vs first precision':>19}"
              + (f" {'peak GiB':>8}" if cuda else ""))
    print(header)
    first_ms: dict[tuple, float] = {}
    for layer_spec in args.specs:
        for precision in precisions:
            gpt_ms = None
            for kind, images in kinds:
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                model, optimizer = _build("gpt" if kind == "gpt" else "ours", spec, layer_spec,
                                          precision, args, seed=0)
                batch = _inputs(spec, hf, args, device, images)
                if precision != "fp32" and batch["pixel_values"] is not None:
                    batch["pixel_values"] = batch["pixel_values"].to(torch.bfloat16)
                seconds = _time("gpt" if kind == "gpt" else "ours", model, optimizer, batch,
                                args)
                ms = seconds * 1e3
                # what the allocator held at most over build + steps (weights, gradients,
                # optimizer state, activations): the planner's training terms, for comparison
                peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
                flops = 3 * args.mbs * _flops(hf, args.seq, args.images, pixels, images)
                gpt_ms = ms if kind == "gpt" else gpt_ms
                first = first_ms.setdefault((layer_spec, kind), ms)
                row = dict(spec=layer_spec, precision=precision, model=kind, ms=ms,
                           tokens_per_s=args.mbs * args.seq / seconds,
                           tflops=flops / seconds / 1e12, vs_gpt=ms / gpt_ms,
                           speedup_vs_first_precision=first / ms, peak_gib=peak)
                rows.append(row)
                print(f"{layer_spec:5} {precision:12} {kind:9} {ms:9.1f} "
                      f"{row['tokens_per_s']:10,.0f} {row['tflops']:8.2f} "
                      f"{row['vs_gpt']:6.2f}x {row['speedup_vs_first_precision']:17.2f}x"
                      + (f" {peak:8.2f}" if peak is not None else ""),
                      flush=True)
                del model, optimizer
                gc.collect()  # megatron's DDP hooks form cycles: free the model before the next
                if cuda:
                    torch.cuda.empty_cache()
        if args.track_steps:
            kind, images = kinds[-1]
            losses = {}
            for precision in precisions:
                model, optimizer = _build("ours", spec, layer_spec, precision, args, seed=0)
                batch = _inputs(spec, hf, args, device, images, seed=1)
                if precision != "fp32" and batch["pixel_values"] is not None:
                    batch["pixel_values"] = batch["pixel_values"].to(torch.bfloat16)
                losses[precision] = [_train_step("ours", model, optimizer, batch)
                                     for _ in range(args.track_steps)]
                del model, optimizer
                gc.collect()
            base = losses[precisions[0]]
            print(f"loss on one fixed batch ({kind}, spec {layer_spec}), step by step:")
            for precision, values in losses.items():
                gap = max(abs(a - b) / abs(b) for a, b in zip(values, base))
                tracks.append(dict(spec=layer_spec, precision=precision, model=kind,
                                   losses=values, max_relative_gap=gap))
                print(f"  {precision:12} " + " ".join(f"{v:.4f}" for v in values)
                      + f"  | max relative gap to {precisions[0]}: {gap:.2%}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(machine=machine, date=time.strftime("%Y-%m-%d"), argv=sys.argv[1:],
                           rows=rows, tracks=tracks), f, indent=1)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())

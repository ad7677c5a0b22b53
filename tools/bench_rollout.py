#!/usr/bin/env python
"""Rollout-bridge benchmark, three ratios against references measured in the same run:

  (a) weight push: bytes/s of Megatron -> vLLM (export through the name table, buckets, the
      engine's reload path, cache resets) vs a plain tensor copy of the same bytes (and vs the
      engine's reload of the same, ready-made HF tensors: the part that is vLLM's);
  (b) memory: peak extra live memory of a push vs the bucket size (bound: bucket + largest
      tensor), for several bucket sizes;
  (c) generation: generated tokens/s through RolloutEngine.generate (prompt processing,
      validation, seeds, gathering) vs the same vLLM engine driven directly (llm.generate with
      the same requests).

    .venv/bin/python tools/bench_rollout.py                 # one rank, TP 1
    .venv/bin/python tools/bench_rollout.py --nproc 2 --tp 2

A random Qwen2.5-VL (hidden 512, 8 layers, vocabulary 32000: ~63M parameters, fp32) is written
to --workdir first.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def make_model(folder: str, hidden: int, layers: int, vocab: int) -> None:
    import torch

    from megatron_papo.models.qwen2_5_vl.tiny import sized_hf_config, write_tiny_checkpoint

    write_tiny_checkpoint(folder, dtype=torch.float32, max_shard_size="2GB", hf_config=sized_hf_config(
        hidden, layers, head_dim=64, kv_heads=2, intermediate=4 * hidden, vocab=vocab))


def _prompts(count: int) -> list:
    import numpy as np
    from PIL import Image

    out = []
    for i in range(count):
        text = f"how many circles are in the image {i}"
        if i % 2:
            out.append([{"role": "user", "content": text}])
        else:
            rng = np.random.default_rng(i)
            image = Image.fromarray(rng.integers(0, 255, (112, 84, 3), dtype=np.uint8))
            out.append([{"role": "user", "content": [{"type": "image", "image": image},
                                                     {"type": "text", "text": text}]}])
    return out


def bench(folder: str, tp: int, buckets: list[int], prompts: int, n: int, tokens: int,
          repeats: int) -> dict:
    import torch
    import torch.distributed as dist

    from megatron_papo.conversion import checkpoint as ck
    from megatron_papo.models.qwen2_5_vl import load_hf_config, text_spec_from_hf
    from megatron_papo.models.qwen2_5_vl.provider import build_model_chunks
    from megatron_papo.parallel import initialize_model_parallel
    from megatron_papo.rollout import (
        EngineConfig,
        PushStats,
        RolloutEngine,
        SamplingConfig,
        iter_hf_weights,
    )
    from megatron_papo.rollout.engine import split_evenly
    from megatron_papo.testing.memory import PeakLive

    spec = text_spec_from_hf(load_hf_config(folder))
    initialize_model_parallel(tp, 1)
    chunks = build_model_chunks(spec, tp, 1, ddp=False)
    ck.load_hf_folder(chunks, spec, folder)
    engine = RolloutEngine(EngineConfig(folder, max_model_len=1024, kv_cache_mb=512,
                                        min_pixels=28 * 28, max_pixels=224 * 224))
    out = {}
    try:
        # (a) push vs plain copy of the same bytes
        tensors = [(name, t.clone()) for name, t in iter_hf_weights(chunks, spec, torch.float32)]
        total = sum(t.numel() * t.element_size() for _, t in tensors)
        targets = [torch.empty_like(t) for _, t in tensors]
        push, copy, raw = [], [], []
        for _ in range(repeats):
            dist.barrier()
            start = time.perf_counter()
            engine.llm.collective_rpc("reload_weights", kwargs=dict(
                weights_iterator=iter(tensors), is_checkpoint_format=True))
            raw.append(time.perf_counter() - start)
            dist.barrier()
            start = time.perf_counter()
            engine.load_weights(iter_hf_weights(chunks, spec, torch.float32, 64 * 2**20))
            push.append(time.perf_counter() - start)
            start = time.perf_counter()
            for (_, src), dst in zip(tensors, targets):
                dst.copy_(src)
            copy.append(time.perf_counter() - start)
        del tensors, targets
        out["push"] = dict(bytes=total, push_s=min(push), copy_s=min(copy), raw_s=min(raw))
        # (b) peak extra live memory per bucket size (the engine is not involved)
        out["memory"] = []
        for bucket in buckets:
            stats = PushStats()
            with PeakLive() as live:
                for _, view in iter_hf_weights(chunks, spec, torch.float32, bucket, stats=stats):
                    live.sample()
                    del view
            out["memory"].append(dict(bucket=bucket, peak=live.peak,
                                      largest=stats.largest_tensor_bytes))
        # (c) generation through the wrapper vs vLLM directly
        batch = _prompts(prompts)
        sampling = SamplingConfig(n=n, temperature=1.0, max_new_tokens=tokens, seed=0)
        encoded = [engine.encoder.encode_one(p, i) for i, p in enumerate(batch)]
        requests = [{"prompt": e.text, **({"multi_modal_data": {"image": e.images[0]}}
                                           if e.images else {})} for e in encoded]
        params = [engine._sampling_params(sampling, i) for i in range(len(batch))]
        engine.llm.generate(requests[:2], params[:2], use_tqdm=False)  # warm-up
        wrapped, direct = [], []
        for _ in range(repeats):
            dist.barrier()
            start = time.perf_counter()
            results = engine.generate(batch, sampling, dp_rank=0, dp_size=1)
            wrapped.append((time.perf_counter() - start,
                            sum(len(r.token_ids) for p in results for r in p.responses)))
            dist.barrier()
            start = time.perf_counter()
            mine = list(split_evenly(len(batch), engine.groups, engine.group))  # the same split
            outputs = engine.llm.generate([requests[i] for i in mine], [params[i] for i in mine],
                                          use_tqdm=False)
            count = torch.tensor(sum(len(c.token_ids) for o in outputs for c in o.outputs))
            if engine.rank % engine.config.tensor_parallel_size:
                count.zero_()  # one count per rollout group
            dist.all_reduce(count)
            count = int(count)
            direct.append((time.perf_counter() - start, count))
        out["generate"] = dict(wrapped=max(t / s for s, t in wrapped),
                               direct=max(t / s for s, t in direct))
    finally:
        engine.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=None, help="where the random model is written")
    parser.add_argument("--nproc", type=int, default=1)
    parser.add_argument("--tp", type=int, default=1, help="training tensor parallel size")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--buckets-mib", default="1,4,16,64")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from megatron_papo.compat import apply_cpu_patches
    from megatron_papo.testing import run_distributed

    apply_cpu_patches()
    workdir = args.workdir or tempfile.mkdtemp(prefix="bench_rollout_")
    folder = os.path.join(workdir, "hf")
    if not os.path.exists(os.path.join(folder, "config.json")):
        print(f"[bench] writing a random model to {folder}", flush=True)
        make_model(folder, args.hidden, args.layers, args.vocab)
    buckets = [int(float(b) * 2**20) for b in args.buckets_mib.split(",")]
    results = run_distributed(bench, args.nproc, folder, args.tp, buckets, args.prompts, args.n,
                              args.max_new_tokens, args.repeats, timeout=3600)
    r = results[0]
    p = r["push"]
    mib = 2**20
    print(f"\n[bench] {args.nproc} rank(s), training TP {args.tp}, model {p['bytes'] / mib:.0f} MiB "
          "(fp32)")
    push_bps, copy_bps = p["bytes"] / p["push_s"], p["bytes"] / p["copy_s"]
    print(f"(a) push {push_bps / mib:.0f} MiB/s ({p['push_s']:.3f} s) vs plain copy "
          f"{copy_bps / mib:.0f} MiB/s ({p['copy_s']:.3f} s): ratio {push_bps / copy_bps:.3f}")
    print(f"    the engine's own reload of ready HF tensors alone: {p['raw_s']:.3f} s; "
          f"push / that: {p['push_s'] / p['raw_s']:.2f}x the time")
    print("(b) bucket MiB | peak extra MiB (max over ranks) | bound bucket + largest tensor | "
          "peak / bound")
    for i, m in enumerate(r["memory"]):
        peak = max(res["memory"][i]["peak"] for res in results)
        bound = m["bucket"] + m["largest"]
        print(f"    {m['bucket'] / mib:10.0f} | {peak / mib:8.1f} | {bound / mib:8.1f} | "
              f"{peak / bound:.2f}")
    g = r["generate"]
    print(f"(c) generation {g['wrapped']:.0f} tok/s through RolloutEngine vs {g['direct']:.0f} "
          f"tok/s vLLM direct: ratio {g['wrapped'] / g['direct']:.3f}")


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Conversion benchmark: a random Qwen2.5-VL of about 1B parameters (bf16 on disk), converted
HF -> Megatron -> HF with N ranks under torchrun; prints time and peak RSS of both directions and
checks the memory bound: peak RSS per rank < 1.5 x (model bytes / ranks) + the largest tensor
(+ the measured RSS of an idle rank: interpreter, torch and megatron-core).

    .venv/bin/python tools/bench_conversion.py --nproc 2 --tp 2 --workdir /tmp/bench_conv
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def make_model(folder: str, hidden: int, layers: int, vocab: int) -> tuple[int, int]:
    from megatron_papo.compat import apply_cpu_patches

    apply_cpu_patches()
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = Qwen2_5_VLConfig(
        text_config=dict(hidden_size=hidden, intermediate_size=hidden * 11 // 4 // 64 * 64,
                         num_hidden_layers=layers, num_attention_heads=hidden // 128,
                         num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=4096,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                          "mrope_section": [16, 24, 24]}),
        vision_config=dict(depth=8, hidden_size=640, intermediate_size=1728, num_heads=8,
                           out_hidden_size=hidden, fullatt_block_indexes=[3, 7]),
        image_token_id=vocab - 5, video_token_id=vocab - 4, vision_start_token_id=vocab - 3,
        vision_end_token_id=vocab - 2, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = Qwen2_5_VLForConditionalGeneration(config).to(torch.bfloat16)
    model.save_pretrained(folder, max_shard_size="1GB")
    sizes = [p.numel() * p.element_size() for p in model.parameters()]
    return sum(sizes), max(sizes)


def run(args: list[str], nproc: int) -> tuple[float, float, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-addr", "127.0.0.1", "--master-port", str(port),
           os.path.join(ROOT, "tools", "convert_checkpoint.py")] + args
    start = time.time()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if done.returncode:
        raise SystemExit(done.stdout[-2000:] + done.stderr[-4000:])
    match = re.search(r"peak RSS ([0-9.]+) GiB", done.stdout)
    return time.time() - start, float(match.group(1)) * 2**30, done.stdout


def idle_rss() -> float:
    code = ("from megatron_papo.compat import apply_cpu_patches; apply_cpu_patches()\n"
            "import megatron.core, transformers\n"
            "from megatron_papo.conversion import checkpoint\n"
            "print(checkpoint._own_peak_rss())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=65536)
    parser.add_argument("--workdir", default="/tmp/megatron_papo_bench_conversion")
    args = parser.parse_args()
    shutil.rmtree(args.workdir, ignore_errors=True)
    os.makedirs(args.workdir)
    hf, mc, out = (os.path.join(args.workdir, n) for n in ("hf", "mc", "out"))
    model_bytes, largest = make_model(hf, args.hidden, args.layers, args.vocab)
    baseline = idle_rss()
    print(f"model: {model_bytes / 1e9:.2f} GB bf16 (~{model_bytes / 2e9:.2f}B params), largest "
          f"tensor {largest / 2**20:.0f} MiB; {args.nproc} ranks, TP={args.tp} PP={args.pp}; "
          f"idle rank RSS {baseline / 2**30:.2f} GiB")
    parallel = ["--tp", str(args.tp), "--pp", str(args.pp)]
    bound = 1.5 * model_bytes / args.nproc + largest
    rows = []
    for name, cli in (("hf-to-mcore", ["hf-to-mcore", "--hf", hf, "--out", mc, *parallel]),
                      ("mcore-to-hf", ["mcore-to-hf", "--ckpt", mc, "--out", out, *parallel,
                                       "--max-shard-size", "1GB"])):
        seconds, rss, _ = run(cli, args.nproc)
        ok = rss - baseline <= bound
        rows.append((name, seconds, rss))
        print(f"{name:12s} {seconds:7.1f} s   peak RSS/rank {rss / 2**30:5.2f} GiB "
              f"(above idle {(rss - baseline) / 2**30:5.2f} GiB; bound {bound / 2**30:.2f} GiB: "
              f"{'OK' if ok else 'EXCEEDED'})")
    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
    print(f"round trip wrote {len(index['weight_map'])} tensors; throughput "
          f"{model_bytes / 2**30 / rows[0][1]:.2f} GiB/s in, {model_bytes / 2**30 / rows[1][1]:.2f}"
          " GiB/s out (whole-command time, incl. start-up)")


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Forward+backward time of our Qwen2.5-VL (megatron-core, local spec) vs transformers' on the same
small random config, same inputs (text + one image), same threads. Prints the ratio ours/reference.

    .venv/bin/python tools/bench_model.py --layers 4 --hidden 256 --steps 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--vision-depth", type=int, default=4)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--text-len", type=int, default=128)
    parser.add_argument("--image", type=int, nargs=2, default=(16, 16), metavar=("H", "W"),
                        help="image size in 14-px patches (even numbers)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()

    from megatron_papo.compat import apply_cpu_patches

    apply_cpu_patches()
    import torch
    import torch.distributed as dist
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from megatron_papo.models.mapping.engine import load_hf_into_megatron
    from megatron_papo.models.qwen2_5_vl import (
        build_qwen25vl, language_transformer_config, mapping_table, tensor_dims, text_spec_from_hf)
    from megatron_papo.models.qwen2_5_vl.rope_index import get_rope_index
    from megatron_papo.parallel import initialize_model_parallel

    torch.set_num_threads(args.threads)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("gloo", rank=0, world_size=1)
    initialize_model_parallel(1, 1)
    head_dim = args.hidden // args.heads
    quarter = head_dim // 2
    section = [quarter - 2 * (quarter // 3), quarter // 3, quarter // 3]
    vocab, image_token = 1024, 1000
    hf_config = {
        "text_config": {"hidden_size": args.hidden, "intermediate_size": 4 * args.hidden,
                        "num_hidden_layers": args.layers, "num_attention_heads": args.heads,
                        "num_key_value_heads": args.kv_heads, "vocab_size": vocab,
                        "rms_norm_eps": 1e-6, "max_position_embeddings": 4096,
                        "rope_parameters": {"rope_type": "default", "rope_theta": 1e6,
                                            "mrope_section": section}},
        "vision_config": {"depth": args.vision_depth, "hidden_size": 128,
                          "intermediate_size": 256, "num_heads": 4, "out_hidden_size": args.hidden,
                          "window_size": 112, "fullatt_block_indexes": [args.vision_depth - 1]},
        "image_token_id": image_token, "vision_start_token_id": 1001,
        "vision_end_token_id": 1002, "video_token_id": 1003,
    }
    torch.manual_seed(0)
    reference = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**hf_config)).train()
    spec = text_spec_from_hf(hf_config)
    ours = build_qwen25vl(spec, language_transformer_config(spec)).train()
    sd = reference.state_dict()
    load_hf_into_megatron(ours, mapping_table(False), sd.__getitem__, tensor_dims(spec))

    h, w = args.image
    n_image = h * w // 4
    text = torch.randint(0, 1000, (args.batch, args.text_len))
    ids = torch.cat([text[:, :8], torch.full((args.batch, 1), 1001),
                     torch.full((args.batch, n_image), image_token), torch.full((args.batch, 1), 1002),
                     text[:, 8:]], dim=1)
    grid = torch.tensor([[1, h, w]] * args.batch)
    pixels = torch.randn(args.batch * h * w, 3 * 2 * 14 * 14)
    mm_types = (ids == image_token).int()
    positions = get_rope_index(ids, grid, image_token)

    def run_reference():
        reference.zero_grad(set_to_none=True)
        reference(input_ids=ids, pixel_values=pixels, image_grid_thw=grid,
                  mm_token_type_ids=mm_types).logits.float().mean().backward()

    def run_ours():
        ours.zero_grad(set_to_none=True)
        ours(ids, positions, None, pixels, grid).float().mean().backward()

    def timed(fn):
        fn()  # warm-up
        times = []
        for _ in range(args.steps):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    t_ref, t_ours = timed(run_reference), timed(run_ours)
    tokens = ids.numel()
    print(f"config: layers={args.layers} hidden={args.hidden} vision_depth={args.vision_depth} "
          f"batch={args.batch} seq={ids.shape[1]} ({n_image} image tokens/sample) "
          f"threads={args.threads}")
    print(f"transformers fwd+bwd: {t_ref * 1e3:8.1f} ms  ({tokens / t_ref:,.0f} tok/s)")
    print(f"megatron_papo fwd+bwd: {t_ours * 1e3:8.1f} ms  ({tokens / t_ours:,.0f} tok/s)")
    print(f"ratio ours/reference: {t_ours / t_ref:.2f}x time")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

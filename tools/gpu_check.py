#!/usr/bin/env python
"""GPU check of the Transformer Engine path (run on a GPU machine; CI has none).

Builds the tiny Qwen2.5-VL twice from the same HF weights, with the ``te`` spec and with the
``local`` spec, in bf16 on one GPU, and prints the max abs logit difference of each against
transformers (bf16) on a text+image sample; then an FP8 (delayed scaling) forward of the TE model.
Exits 1 if the TE spec is further from transformers than the local spec by more than --slack.

    python tools/gpu_check.py            # after the GPU kit's env.sh (megatron-core 0.19 + TE)
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slack", type=float, default=0.05)
    args = parser.parse_args()
    import torch
    import torch.distributed as dist

    from megatron_papo.compat import apply_cpu_patches

    apply_cpu_patches()  # no-op with CUDA
    assert torch.cuda.is_available(), "this check needs a GPU"
    torch.cuda.set_device(0)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29541")
    dist.init_process_group("nccl", rank=0, world_size=1)

    from megatron.core import parallel_state

    from megatron_papo.conversion.checkpoint import sample_inputs
    from megatron_papo.models.qwen2_5_vl import text_spec_from_hf
    from megatron_papo.models.qwen2_5_vl.provider import (
        build_model_chunks, forward_logits, load_hf_weights)
    from megatron_papo.models.qwen2_5_vl.rope_index import get_rope_index
    from megatron_papo.parallel import initialize_model_parallel
    from megatron_papo.testing.tiny import reference_model, tiny_hf_config

    hf_config = tiny_hf_config()
    reference = reference_model(hf_config).to(torch.bfloat16).cuda()
    sd = reference.state_dict()
    spec = text_spec_from_hf(hf_config)
    sample = sample_inputs(spec)
    cuda = {k: v.cuda() for k, v in sample.items() if v is not None}
    cuda["pixel_values"] = cuda["pixel_values"].to(torch.bfloat16)
    with torch.no_grad():
        ref = reference(**cuda).logits.float()
    positions = get_rope_index(cuda["input_ids"], cuda["image_grid_thw"], spec.image_token_id)
    results = {}
    for layer_spec, extra in (("local", {}), ("te", {}), ("te-fp8", {"fp8": "hybrid"})):
        initialize_model_parallel(1, 1)
        chunks = build_model_chunks(spec, ddp=False, layer_spec=layer_spec.split("-")[0],
                                    params_dtype=torch.bfloat16, **extra)
        for chunk in chunks:
            chunk.cuda()
        load_hf_weights(chunks, spec, lambda n: sd[n])
        logits = forward_logits(chunks, cuda["input_ids"], positions, None,
                                cuda["pixel_values"], cuda["image_grid_thw"])
        results[layer_spec] = (logits.float() - ref).abs().max().item()
        print(f"[gpu-check] {layer_spec:7s} max abs logit diff vs transformers (bf16): "
              f"{results[layer_spec]:.4f}", flush=True)
        parallel_state.destroy_model_parallel()
    dist.destroy_process_group()
    return 0 if results["te"] <= results["local"] + args.slack else 1


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Check of the Transformer Engine path against the local spec and transformers (GPU; the local
spec alone runs on CPU, which is what CI checks).

Builds the tiny Qwen2.5-VL from the same HF weights with each layer spec in bf16 and prints, for
the language model on text only, the vision tower's features and the whole model on text + image,
the max abs difference to transformers (bf16) and to the local spec; ``te-fp8`` is the TE model
with FP8 (hybrid, delayed scaling) in the forward. Exits 1 if the TE spec is further from
transformers than the local spec by more than --slack.

    python tools/gpu_check.py                     # GPU, after the GPU kit's env.sh (TE)
    python tools/gpu_check.py --specs local       # anywhere
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slack", type=float, default=0.05,
                        help="how much further from transformers TE may be than local (bf16)")
    parser.add_argument("--specs", nargs="+", default=["local", "te", "te-fp8"],
                        choices=("local", "te", "te-fp8"))
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    from megatron_papo.compat import apply_cpu_patches

    apply_cpu_patches()  # no-op with CUDA
    import torch
    import torch.distributed as dist

    from megatron_papo.models.qwen2_5_vl import precision

    cuda = torch.cuda.is_available()
    for name in args.specs:
        problem = precision.layer_spec_problem(name.split("-")[0], key="--specs")
        if problem is None and name == "te-fp8":
            problem = precision.fp8_problem("hybrid", "delayed", "te", "bfloat16", prefix="--specs "
                                            "te-fp8: ")
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            return 2
    device = torch.device("cuda" if cuda else "cpu")
    from megatron_papo.parallel import init_processes

    init_processes()

    from megatron.core import parallel_state

    from megatron_papo.conversion.checkpoint import sample_inputs
    from megatron_papo.models.qwen2_5_vl import text_spec_from_hf
    from megatron_papo.models.qwen2_5_vl.precision import fp8_fields
    from megatron_papo.models.qwen2_5_vl.provider import (
        build_model_chunks,
        forward_logits,
        load_hf_weights,
    )
    from megatron_papo.models.qwen2_5_vl.rope_index import get_rope_index
    from megatron_papo.parallel import initialize_model_parallel
    from megatron_papo.models.qwen2_5_vl.tiny import reference_model, tiny_hf_config

    hf_config = tiny_hf_config()
    reference = reference_model(hf_config).to(torch.bfloat16).to(device)
    sd = reference.state_dict()
    spec = text_spec_from_hf(hf_config)
    sample = sample_inputs(spec)
    inputs = {k: v.to(device) for k, v in sample.items() if v is not None}
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
    # text only: the tokens before the first image (no image-pad token among them)
    first_image = int((inputs["input_ids"][0] == spec.vision_start_token_id).nonzero()[0])
    text_ids = inputs["input_ids"][:1, :first_image]
    # FP8 GEMMs need the token count divisible by 8/16 (the trainer pads to 16 with model.fp8):
    # every spec sees the same inputs lengthened by text tokens to a multiple of 16
    length = inputs["input_ids"].shape[1]
    inputs["input_ids"] = _to_multiple(inputs["input_ids"], text_ids[0], 16)
    extra = inputs["input_ids"].shape[1] - length
    for key, value in inputs.items():  # per-token companions: the mask (1), type ids (0: text)
        if key != "input_ids" and value.dim() == 2 and value.shape[1] == length and extra:
            fill = 1 if key == "attention_mask" else 0
            inputs[key] = torch.cat([value, value.new_full((value.shape[0], extra), fill)], 1)
    text_ids = _to_multiple(text_ids, text_ids[0], 16)
    with torch.no_grad():
        ref = {"whole model": reference(**inputs).logits.float(),
               "language model": reference(input_ids=text_ids).logits.float(),
               "vision tower": _reference_features(reference, inputs)}
    positions = get_rope_index(inputs["input_ids"], inputs["image_grid_thw"], spec.image_token_id)
    text_positions = get_rope_index(text_ids, None, spec.image_token_id)
    outputs, failed = {}, []
    for name in args.specs:
        fp8 = fp8_fields("hybrid", "delayed") if name == "te-fp8" else {}
        initialize_model_parallel(1, 1)
        try:  # one spec failing does not hide the others' results
            chunks = build_model_chunks(spec, ddp=False, layer_spec=name.split("-")[0],
                                        params_dtype=torch.bfloat16, **fp8)
            for chunk in chunks:
                chunk.to(device)
            load_hf_weights(chunks, spec, lambda n: sd[n])
            with torch.no_grad():
                outputs[name] = {
                    "whole model": forward_logits(chunks, inputs["input_ids"], positions, None,
                                                  inputs["pixel_values"],
                                                  inputs["image_grid_thw"]).float(),
                    "language model": forward_logits(chunks, text_ids, text_positions).float(),
                    "vision tower": chunks[0].vision_model(inputs["pixel_values"],
                                                           inputs["image_grid_thw"]).float()}
        except Exception as err:  # noqa: BLE001 - reported, and the exit status says so
            failed.append(name)
            print(f"[gpu-check] FAIL: {name}: {type(err).__name__}: "
                  f"{str(err).splitlines()[0] if str(err) else ''}", flush=True)
        parallel_state.destroy_model_parallel()
    dist.destroy_process_group()
    results = {}
    for name, parts in outputs.items():
        for part, value in parts.items():
            if value.shape != ref[part].shape:
                print(f"[gpu-check] FAIL: {name} {part}: shape {tuple(value.shape)}, transformers "
                      f"{tuple(ref[part].shape)}")
                return 1
            row = {"vs transformers": (value - ref[part]).abs().max().item()}
            if name != "local" and "local" in outputs:
                row["vs local"] = (value - outputs["local"][part]).abs().max().item()
            results[f"{name} {part}"] = row
            print(f"[gpu-check] {name:7s} {part:15s} max abs diff (bf16): "
                  + "  ".join(f"{k} {v:.4f}" for k, v in row.items()), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    if failed:
        return 1
    if "te" in outputs and "local" in outputs:
        worse = [part for part in ref if results[f"te {part}"]["vs transformers"]
                 > results[f"local {part}"]["vs transformers"] + args.slack]
        if worse:
            print(f"[gpu-check] FAIL: the TE spec is further from transformers than the local "
                  f"spec by more than --slack {args.slack} on: {', '.join(worse)}")
            return 1
    return 0


def _to_multiple(ids, filler, multiple: int):
    """[1, n] ``ids`` followed by tokens of ``filler`` (cycled) up to a multiple of ``multiple``."""
    import torch

    short = -ids.shape[1] % multiple
    if not short:
        return ids
    extra = filler.repeat(-(-short // len(filler)))[:short]
    return torch.cat([ids, extra[None].to(ids.device)], dim=1)


def _reference_features(reference, inputs):
    """transformers' vision tower output: the merged features that replace the image-pad
    embeddings, [image tokens, hidden]."""
    visual = reference.model.visual
    out = visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
    out = getattr(out, "pooler_output", out)
    if isinstance(out, (tuple, list)):
        out = out[0]
    return out.float()


if __name__ == "__main__":
    sys.exit(main())

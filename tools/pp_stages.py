#!/usr/bin/env python
"""Parameters and forward FLOPs per pipeline stage of Qwen2.5-VL, and the first/last-stage layer
counts that balance them.

  tools/pp_stages.py --model 7b --pp 8
  tools/pp_stages.py --model qwen2_5_vl_72b_... | /models/Qwen2.5-VL-72B-Instruct --pp 16 \\
      --first-stage-layers 3 --last-stage-layers 4

Stage 0 holds the vision tower and the embedding besides its decoder layers, the last stage the
output layer; the table shows the given split (default: even, when PP divides the layers) and
the suggested one, with the slowest stage's share. Use the suggestion as
parallel.first_stage_layers / parallel.last_stage_layers (training) or --first-stage-layers /
--last-stage-layers (tools/convert_checkpoint.py).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _model_config(name: str) -> tuple[str, dict]:
    from megatron_papo.models.qwen2_5_vl import load_hf_config
    from megatron_papo.models.qwen2_5_vl.config import PRESETS, preset_hf_config

    if os.path.isdir(name) or name.endswith(".json"):
        return name, load_hf_config(name)
    match = re.search(r"(\d+)b", name.lower())
    if not match or f"{match.group(1)}b" not in PRESETS:
        raise SystemExit(f"error: --model {name!r}: give an HF folder, a size ({', '.join(PRESETS)})"
                         " or a preset name that contains one (qwen2_5_vl_7b_papo)")
    size = f"{match.group(1)}b"
    return f"Qwen2.5-VL-{size.upper()} (public shapes)", preset_hf_config(size)


def _table(title: str, costs) -> str:
    total_p, slowest = sum(c.params for c in costs), max(c.flops for c in costs)
    mean = sum(c.flops for c in costs) / len(costs)
    lines = [title, f"{'stage':>5} {'layers':>6} {'params (M)':>11} {'fwd TFLOP':>10} "
                    f"{'vs mean':>8}  also holds"]
    for i, c in enumerate(costs):
        lines.append(f"{i:>5} {c.layers:>6} {c.params / 1e6:>11.1f} {c.flops / 1e12:>10.2f} "
                     f"{c.flops / mean:>7.2f}x  {c.parts}")
    lines.append(f"total {sum(c.layers for c in costs):>6} {total_p / 1e6:>11.1f} "
                 f"{sum(c.flops for c in costs) / 1e12:>10.2f}   slowest stage "
                 f"{slowest / mean:.2f}x the mean (pipeline efficiency <= {mean / slowest:.0%})")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="pp_stages.py", description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True,
                        help="HF folder (config.json), a size (3b, 7b, 32b, 72b) or a preset name")
    parser.add_argument("--pp", type=int, required=True, help="pipeline-parallel size")
    parser.add_argument("--first-stage-layers", type=int, default=None)
    parser.add_argument("--last-stage-layers", type=int, default=None)
    parser.add_argument("--seq-len", type=int, default=4096,
                        help="tokens per sample, image tokens included (default 4096)")
    parser.add_argument("--image-pixels", type=int, default=1003520,
                        help="pixels of the one image per sample (default 1003520, the authors' "
                             "max_pixels; 0: text only)")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")  # megatron-core's import-time notes about TE/Apex
    from megatron_papo.models.qwen2_5_vl import ModelConfigError
    from megatron_papo.models.qwen2_5_vl.stages import (
        image_tokens,
        stage_costs,
        suggest_stage_layers,
    )

    label, hf = _model_config(args.model)
    sizes = dict(seq_len=args.seq_len, image_pixels=args.image_pixels)
    merged = image_tokens(hf, args.image_pixels)
    print(f"{label}, PP={args.pp}, one sample: {args.seq_len} tokens ({merged} of them the "
          f"image's merged patches), one image of {args.image_pixels} pixels")
    given = (args.first_stage_layers, args.last_stage_layers)
    try:
        if given != (None, None):
            print(_table(f"\ngiven: first_stage_layers={given[0]}, last_stage_layers={given[1]}",
                         stage_costs(hf, args.pp, *given, **sizes)))
        else:
            try:
                print(_table("\neven split", stage_costs(hf, args.pp, **sizes)))
            except ModelConfigError as err:
                print(f"\neven split: impossible ({err})")
        first, last = suggest_stage_layers(hf, args.pp, **sizes)
    except ModelConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(_table(f"\nsuggested: first_stage_layers={first}, last_stage_layers={last}",
                 stage_costs(hf, args.pp, first, last, **sizes)))
    flags = " ".join(f"parallel.{k}={v}" for k, v in (("first_stage_layers", first),
                                                     ("last_stage_layers", last)) if v is not None)
    print(f"\nuse: {flags or '(the even split)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Perception map of a trained model on one image and question: which response tokens depend
on the image (per-token KL between the original and PAPO-masked images, exact over the
vocabulary, averaged over several masks) and which image regions the response depends on (each
region covered in turn by the image's median colour, the response's total KL recorded).

  python tools/perception_map.py --model outputs/run/hf --image shapes.png \\
      --question "How many shapes are in the image?" --out outputs/map
  python tools/perception_map.py --model outputs/run/checkpoints/step_200 --image x.png \\
      --question "..." --response "<think> ... </think> \\boxed{3}" --region 56

Writes <out>/perception_map.png (image, heat map, shaded response), <out>/perception_map.html
(self-contained; hover for numbers) and <out>/perception_map.json (the numbers). Without
--response the model's greedy response is mapped. --question is the whole user text (include
your prompt template, e.g. the authors' instruction, if the model was trained with one).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FILLS = {"median": "median", "mean": "mean", "black": (0, 0, 0), "white": (255, 255, 255),
         "gray": (128, 128, 128)}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="perception_map.py", description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True,
                   help="an HF Qwen2.5-VL folder or a Megatron checkpoint (megatron_papo.json)")
    p.add_argument("--image", required=True, nargs="+",
                   help="an image file; several: the prompt shows them in order, then the "
                        "question (the token map masks all of them, the occlusion map covers "
                        "one region of one image at a time)")
    p.add_argument("--question", required=True, help="the user text after the image")
    p.add_argument("--response", default=None, help="map this response (default: generate)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--masks", type=int, default=8, help="random masks averaged per token")
    p.add_argument("--mask-ratio", type=float, default=0.6, help="training: algorithm.mask_ratio")
    p.add_argument("--mask-patch", type=int, default=14, help="training: algorithm.mask_patch")
    p.add_argument("--region", type=int, default=28,
                   help="occlusion region side in model-input pixels (28 = one merged patch)")
    p.add_argument("--fill", default="median", choices=list(FILLS),
                   help="cover of an occluded region: the image's median colour (its background: "
                        "removes the region's content), mean, black (PAPO's mask colour: also adds "
                        "a dark blob a model may read as content), white, gray")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="the distributions compared are the sampling ones at this temperature")
    p.add_argument("--min-pixels", type=int, default=None)
    p.add_argument("--max-pixels", type=int, default=None)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--batch-size", type=int, default=16, help="images per forward pass")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="perception_map", help="output folder")
    return p


def run(args) -> str:
    import torch

    from megatron_papo.data.images import ImageLoadError, load_image
    from megatron_papo.perception import PerceptionError, PerceptionScorer, write_html, write_png

    for name in ("masks", "region", "max_new_tokens", "batch_size"):
        if getattr(args, name) < 1:
            raise PerceptionError(f"--{name.replace('_', '-')} {getattr(args, name)} must be >= 1")
    if not 0 < args.mask_ratio <= 1:
        raise PerceptionError(f"--mask-ratio {args.mask_ratio} must be in (0, 1]")
    if args.temperature <= 0:
        raise PerceptionError(f"--temperature {args.temperature} must be > 0")
    images = []
    for path in args.image:
        try:
            images.append(load_image(path))
        except ImageLoadError as err:
            raise PerceptionError(f"--image {path}: {err}") from None
    image = images[0] if len(images) == 1 else images
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise PerceptionError(f"--out {args.out} is a file: give a folder")
    if not os.path.isdir(args.model):
        raise PerceptionError(f"--model {args.model!r} is not a folder")
    scorer = PerceptionScorer(args.model, getattr(torch, args.dtype), args.min_pixels,
                              args.max_pixels, args.temperature, args.batch_size)
    response = args.response
    if response is None:
        response = scorer.generate(image, args.question, args.max_new_tokens)
        print(f"[map] generated response: {response!r}", flush=True)
    result = scorer.perception_map(image, args.question, response, masks=args.masks,
                                   mask_ratio=args.mask_ratio, mask_patch=args.mask_patch,
                                   region=args.region, fill=FILLS[args.fill], seed=args.seed)
    os.makedirs(args.out, exist_ok=True)
    paths = {ext: os.path.join(args.out, f"perception_map.{ext}") for ext in ("png", "html",
                                                                              "json")}
    write_png(result, image, paths["png"])
    write_html(result, image, paths["html"])
    with open(paths["json"], "w") as f:
        f.write(result.to_json())
    hottest = sorted(zip(result.token_kl, result.tokens), reverse=True)[:5]
    print("[map] tokens with the highest perception KL: "
          + ", ".join(f"{t!r} {v:.3g}" for v, t in hottest))
    hot = max(range(len(result.region_kl)), key=result.region_kl.__getitem__)
    where = f" of image {result.region_image[hot] + 1}" if len(images) > 1 else ""
    print(f"[map] occlusion: hottest region {result.regions[hot]}{where} (KL "
          f"{result.region_kl[hot]:.3g}), coldest {min(result.region_kl):.3g}")
    print(f"[map] wrote {paths['png']}, {paths['html']}, {paths['json']}")
    return args.out


def main(argv=None) -> int:
    from megatron_papo.compat import apply_cpu_patches

    args = _parser().parse_args(argv)
    apply_cpu_patches()
    from megatron_papo.cli import run_main

    return run_main(run, args, prog="perception_map")


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""The table of docs/experiments.md "GRPO vs PAPO maps", rebuilt from the stored maps.

    python docs/runs/perception_maps_grpo_papo_seed1/table.py --images DIR   # the four images
    python docs/runs/perception_maps_grpo_papo_seed1/table.py                # the table

--images writes test<r>.png for rows 0, 4, 6, 3 of seed 1's held-out split (the images
tools/perception_map.py was given). Without it: one row per stored map
(<model>_<fill>_row<r>.json beside this script): the response, the answer token's KL (the
token inside \\boxed{}), the mean region KL over the regions that cover part of a shape (a
pixel of the model-input image differs from the white background by more than 8 in a channel)
and over those that do not.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROWS = (0, 4, 6, 3)
SEED = 1
BACKGROUND = (255, 255, 255)


def _held_out_rows() -> list[dict]:
    """The first rows of the main job's held-out split for trainer.seed=SEED."""
    from megatron_papo.data.synthetic import TEST_SEED_OFFSET, counting_rows

    return counting_rows(max(ROWS) + 1, SEED + TEST_SEED_OFFSET)


def export_images(folder: str) -> None:
    os.makedirs(folder, exist_ok=True)
    rows = _held_out_rows()
    for r in ROWS:
        with open(os.path.join(folder, f"test{r}.png"), "wb") as f:
            f.write(rows[r]["image"])
        print(f"test{r}.png: {rows[r]['answer']} shapes")


def table() -> str:
    from PIL import Image

    answers = [row["answer"] for row in _held_out_rows()]
    lines = ["| model | cover | row (shapes) | response | answer-token KL | regions covering a "
             "shape: mean KL (n) | background regions: mean / max KL (n) |",
             "|---|---|---|---|---|---|---|"]
    for model in ("grpo", "papo"):
        for fill in ("median", "gray"):
            for r in ROWS:
                m = json.load(open(os.path.join(HERE, f"{model}_{fill}_row{r}.json")))
                image = Image.open(os.path.join(HERE, f"test{r}.png")).convert("RGB")
                image = image.resize(tuple(m["image_size"]), Image.BICUBIC)
                shape, background = [], []
                for box, kl in zip(m["regions"], m["region_kl"]):
                    raw = image.crop(tuple(box)).tobytes()  # RGB bytes
                    pixels = [raw[i:i + 3] for i in range(0, len(raw), 3)]
                    covers = any(max(abs(c - b) for c, b in zip(p, BACKGROUND)) > 8 for p in pixels)
                    (shape if covers else background).append(kl)
                digit = next((i for i, t in enumerate(m["tokens"]) if re.fullmatch(r"\d", t.strip())),
                             None)
                answer_kl = "-" if digit is None else f"{m['token_kl'][digit]:.2f}"
                true = answers[r]
                lines.append(
                    f"| {model} | {fill} | {r} ({true}) | `{m['response']}` | "
                    f"{answer_kl} | {sum(shape) / len(shape):.2f} ({len(shape)}) | "
                    f"{sum(background) / max(len(background), 1):.3f} / "
                    f"{max(background, default=0):.3f} ({len(background)}) |")
    return "\n".join(lines)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", default=None, help="write the four images here and stop")
    args = p.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(HERE))))
    if args.images:
        export_images(args.images)
    else:
        print(table())

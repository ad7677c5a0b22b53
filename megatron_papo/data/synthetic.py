"""The embedded default dataset: count the shapes drawn on an image (generated in code, nothing
to download). The answer depends on the image only (the question text is the same for every
row), so a model that learns it really looks: swapping images between samples drops accuracy to
chance.

The hint variant (``hint`` = p, ``data=counting_hint``) prefixes each question with "I think
there are H shapes.": H is the true count with probability p, else another count. The text then
answers part of the rows, so how much a policy reads the image can be measured: on the rows
whose hint is wrong, a policy that follows the hint is wrong, one that counts is right (column
``hint``: "right" / "wrong")."""

from __future__ import annotations

import io
import os
import random

from PIL import Image

QUESTION = "How many shapes are in the image?"
COLORS = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180)]


def draw_shapes(count: int, size: int, rng: random.Random):
    """A ``size`` x ``size`` RGB image with ``count`` non-overlapping filled circles/squares."""
    from PIL import ImageDraw  # ~50 ms (its fonts): the CLIs that import this package skip it

    image = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    cells = size // 14 // 2 * 2 or 1                      # a coarse grid: shapes never touch
    step = size / cells
    places = rng.sample([(r, c) for r in range(cells) for c in range(cells)], count)
    for r, c in places:
        x0, y0 = c * step + step * 0.15, r * step + step * 0.15
        x1, y1 = (c + 1) * step - step * 0.15, (r + 1) * step - step * 0.15
        color = rng.choice(COLORS)
        if rng.random() < 0.5:
            draw.ellipse((x0, y0, x1, y1), fill=color)
        else:
            draw.rectangle((x0, y0, x1, y1), fill=color)
    return image


def counting_rows(n: int, seed: int = 0, size: int = 56, min_count: int = 1,
                  max_count: int = 4, hint: float | None = None) -> list[dict]:
    """Rows {"image": PNG bytes, "problem", "answer"} with counts uniform in [min, max];
    ``hint`` = p: the problem starts with a hint that is right with probability p (its own
    generator: the images and answers are those of ``hint=None``), and a "hint" column says
    "right" or "wrong"."""
    if hint is not None and not 0.0 <= hint <= 1.0:
        raise ValueError(f"data.synthetic_hint={hint} must be in [0, 1] (null: no hint)")
    rng = random.Random(seed)
    hints = random.Random(seed + 7_777)
    rows = []
    for _ in range(n):
        count = rng.randint(min_count, max_count)
        buffer = io.BytesIO()
        draw_shapes(count, size, rng).save(buffer, format="PNG")
        row = {"image": buffer.getvalue(), "problem": QUESTION, "answer": str(count)}
        if hint is not None:
            right = hints.random() < hint
            said = count if right else hints.choice(
                [c for c in range(min_count, max_count + 1) if c != count])
            row.update(problem=f"I think there are {said} shapes. {QUESTION}",
                       hint="right" if right else "wrong")
        rows.append(row)
    return rows


TEST_SEED_OFFSET = 10_000  # the held-out split's seed: the training seed + this (disjoint rows)


def write_counting_dataset(folder: str, train: int = 2048, test: int = 256, seed: int = 0,
                           size: int = 56, max_count: int = 4,
                           hint: float | None = None) -> dict[str, str]:
    """Parquet files ``train.parquet`` and ``test.parquet`` (disjoint seeds); returns the paths.
    ``hint``: the hint variant (:func:`counting_rows`)."""
    import datasets  # imports torch (seconds): only writing the files needs it

    os.makedirs(folder, exist_ok=True)
    paths = {}
    for split, count, split_seed in (("train", train, seed), ("test", test, seed + TEST_SEED_OFFSET)):
        path = os.path.join(folder, f"{split}.parquet")
        datasets.Dataset.from_list(counting_rows(count, split_seed, size, 1, max_count, hint)
                                   ).to_parquet(path)
        paths[split] = path
    return paths

"""The embedded default dataset: count the shapes drawn on an image (generated in code, nothing
to download). The answer depends on the image only (the question text is the same for every
row), so a model that learns it really looks: swapping images between samples drops accuracy to
chance."""

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
                  max_count: int = 4) -> list[dict]:
    """Rows {"image": PNG bytes, "problem", "answer"} with counts uniform in [min, max]."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        count = rng.randint(min_count, max_count)
        buffer = io.BytesIO()
        draw_shapes(count, size, rng).save(buffer, format="PNG")
        rows.append({"image": buffer.getvalue(), "problem": QUESTION, "answer": str(count)})
    return rows


def write_counting_dataset(folder: str, train: int = 2048, test: int = 256, seed: int = 0,
                           size: int = 56, max_count: int = 4) -> dict[str, str]:
    """Parquet files ``train.parquet`` and ``test.parquet`` (disjoint seeds); returns the paths."""
    import datasets  # imports torch (seconds): only writing the files needs it

    os.makedirs(folder, exist_ok=True)
    paths = {}
    for split, count, split_seed in (("train", train, seed), ("test", test, seed + 10_000)):
        path = os.path.join(folder, f"{split}.parquet")
        datasets.Dataset.from_list(counting_rows(count, split_seed, size, 1, max_count)
                                   ).to_parquet(path)
        paths[split] = path
    return paths

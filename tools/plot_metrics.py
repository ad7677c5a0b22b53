#!/usr/bin/env python
"""Plot a run's metrics.jsonl to a PNG: reward, accuracy (training and held-out), format rate,
the perception KL, entropies (original / masked image), clip fractions and time per phase.

    .venv/bin/python tools/plot_metrics.py outputs/2026-11-23_12-00-00          # -> metrics.png
    .venv/bin/python tools/plot_metrics.py run/metrics.jsonl --out curves.png
"""

from __future__ import annotations

import argparse
import json
import os
import sys

PANELS = [
    ("reward", ["reward"]),
    ("accuracy", ["accuracy", "val/accuracy"]),
    ("format", ["format", "val/format"]),
    ("perception KL (KL_prcp)", ["loss/kl_prcp"]),
    ("entropy", ["entropy/original", "entropy/masked"]),
    ("clip fraction", ["clip/high", "clip/low"]),
    ("groups with differing rewards", ["groups_with_signal"]),
    ("seconds per phase", ["time/rollout", "time/reward", "time/batch", "time/logprobs",
                           "time/masked_scoring", "time/update", "time/sync"]),
]


def read_records(path: str) -> list[dict]:
    if os.path.isdir(path):
        path = os.path.join(path, "metrics.jsonl")
    if not os.path.exists(path):
        raise SystemExit(f"plot_metrics: no metrics file at '{path}' (give a run folder or its "
                         "metrics.jsonl)")
    records = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                raise SystemExit(f"plot_metrics: line {number} of '{path}' is not JSON") from None
    if not records:
        raise SystemExit(f"plot_metrics: '{path}' holds no records")
    return records


def plot(records: list[dict], out: str) -> list[str]:
    """Write the PNG; returns the panel titles that had data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(title, keys) for title, keys in PANELS
              if any(k in r for r in records for k in keys)]
    cols = 2
    rows = max(1, -(-len(panels) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(11, 3 * rows), squeeze=False)
    for ax, (title, keys) in zip(axes.flat, panels):
        for key in keys:
            points = [(r["step"], r[key]) for r in records if key in r and "step" in r]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker="o" if key.startswith("val/") else None, markersize=3,
                        label=key)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return [title for title, _ in panels]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="a run folder or its metrics.jsonl")
    parser.add_argument("--out", default=None, help="PNG path (default: <run>/metrics.png)")
    args = parser.parse_args()
    records = read_records(args.run)
    folder = args.run if os.path.isdir(args.run) else os.path.dirname(args.run) or "."
    out = args.out or os.path.join(folder, "metrics.png")
    titles = plot(records, out)
    print(f"plot_metrics: {len(records)} records, panels: {', '.join(titles)} -> {out}")


if __name__ == "__main__":
    sys.exit(main())

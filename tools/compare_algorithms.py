#!/usr/bin/env python
"""GRPO vs PAPO on the same seeds: runs the main job once per (algorithm, seed), then prints the
learning curves, the final held-out accuracy (avg@k) and the accuracy with the images swapped
between prompts (vision dependence: a model that looks drops towards chance, 0.25 on the
embedded counting task), and writes a PNG of the curves.

    .venv/bin/python tools/compare_algorithms.py                       # grpo vs the default, seed 0
    .venv/bin/python tools/compare_algorithms.py --algorithms grpo papo_no_kl_ref papo_h \\
        --seeds 0 1 2 --out outputs/compare -- trainer.steps=150       # Hydra overrides after --

Runs are sequential (each uses every core); a finished run (its metrics hold the final
evaluation) is reused, so an interrupted comparison continues where it stopped. Every run takes
all `trainer.steps` (the default job's early stop, `trainer.stop_at_accuracy`, is off here: the
algorithms compare after the same number of steps; pass it after -- to turn it back on).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _records(folder: str) -> list[dict]:
    path = os.path.join(folder, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _finished(records: list[dict]) -> dict | None:
    return next((r for r in reversed(records) if "val_swapped/accuracy" in r), None)


def run_one(algorithm: str, seed: int, folder: str, overrides: list[str], launcher: list[str]
            ) -> float:
    """The main job for one (algorithm, seed); returns its wall seconds (0 when reused)."""
    if _finished(_records(folder)):
        print(f"[compare] {algorithm} seed {seed}: finished run found in {folder}, reused",
              flush=True)
        return 0.0
    if os.path.exists(os.path.join(folder, "metrics.jsonl")):
        os.remove(os.path.join(folder, "metrics.jsonl"))  # an interrupted run starts over
    command = [*launcher, "-m", "megatron_papo.train", f"algorithm={algorithm}",
               f"trainer.seed={seed}", f"trainer.output_dir={folder}", f"hydra.run.dir={folder}",
               "trainer.export_hf=false", "trainer.stop_at_accuracy=null", *overrides]
    print(f"[compare] {algorithm} seed {seed}: {' '.join(command)}", flush=True)
    start = time.perf_counter()
    log_path = os.path.join(folder, "train.log")
    os.makedirs(folder, exist_ok=True)
    with open(log_path, "w") as log:
        done = subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise SystemExit(f"compare_algorithms: the {algorithm} run (seed {seed}) failed with exit "
                         f"code {done.returncode}; see {log_path}")
    return time.perf_counter() - start


def summary(records: list[dict]) -> dict:
    steps = [r for r in records if "reward" in r and "step" in r]
    final = _finished(records) or {}
    reached = next((r["step"] for r in steps if r["accuracy"] >= 0.8), None)
    return {
        "curve": [(r["step"], r["accuracy"]) for r in steps],
        "held_out": [(r["step"], r["val/accuracy"]) for r in records if "val/accuracy" in r
                     and not r.get("after_warm_start")],
        "final_accuracy": final.get("val/accuracy"),
        "swapped_accuracy": final.get("val_swapped/accuracy"),
        "final_kl_prcp": steps[-1].get("loss/kl_prcp") if steps else None,
        "first_step_train_accuracy_0.8": reached,
        "seconds_per_step": (sum(r["seconds"] for r in steps) / len(steps)) if steps else None,
    }


def plot(results: dict, out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(12, 4))
    colors = {}
    for (algorithm, seed), s in sorted(results.items()):
        color = colors.setdefault(algorithm, f"C{len(colors)}")
        label = algorithm if seed == min(k[1] for k in results if k[0] == algorithm) else None
        if s["curve"]:
            ax[0].plot(*zip(*s["curve"]), color=color, alpha=0.7, label=label)
        if s["held_out"]:
            ax[1].plot(*zip(*s["held_out"]), "o-", color=color, alpha=0.7, label=label)
    ax[0].set(title="training accuracy (per rollout batch)", xlabel="step", ylim=(0, 1))
    ax[1].set(title="held-out accuracy (avg@k)", xlabel="step", ylim=(0, 1))
    for a in ax:
        a.axhline(0.25, color="grey", lw=0.8, ls="--")
        a.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--algorithms", nargs="+", default=["grpo", "papo_no_kl_ref"],
                   help="algorithm presets to compare (default: grpo and the default PAPO "
                        "variant, papo_no_kl_ref)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--out", default=os.path.join("outputs", "compare"))
    p.add_argument("--nproc", type=int, default=1, help="processes per run (torchrun when > 1)")
    p.add_argument("overrides", nargs="*", help="Hydra overrides for every run (after --)")
    args = p.parse_args(argv)
    launcher = [sys.executable]
    if args.nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--nproc-per-node", str(args.nproc)]
    results = {}
    for seed in args.seeds:
        for algorithm in args.algorithms:
            folder = os.path.abspath(os.path.join(args.out, f"{algorithm}_seed{seed}"))
            run_one(algorithm, seed, folder, args.overrides, launcher)
            results[(algorithm, seed)] = summary(_records(folder))

    print("\n[compare] training accuracy every 25 steps")
    for (algorithm, seed), s in sorted(results.items()):
        points = " ".join(f"{a:.2f}" for step, a in s["curve"] if step % 25 == 0)
        print(f"  {algorithm:>16} seed {seed}: {points}")
    print("\n| algorithm | seed | held-out accuracy | with images swapped | first step with train "
          "acc >= 0.8 | final KL_prcp | s/step |")
    print("|---|---|---|---|---|---|---|")

    def fmt(x, spec=".3f"):
        return "-" if x is None else format(x, spec)
    for (algorithm, seed), s in sorted(results.items()):
        print(f"| {algorithm} | {seed} | {fmt(s['final_accuracy'])} | "
              f"{fmt(s['swapped_accuracy'])} | {fmt(s['first_step_train_accuracy_0.8'], 'd')} | "
              f"{fmt(s['final_kl_prcp'])} | {fmt(s['seconds_per_step'], '.2f')} |")
    for algorithm in args.algorithms:
        finals = [results[(algorithm, seed)]["final_accuracy"] for seed in args.seeds]
        swaps = [results[(algorithm, seed)]["swapped_accuracy"] for seed in args.seeds]
        if all(x is not None for x in finals + swaps):
            print(f"[compare] {algorithm}: mean held-out accuracy {sum(finals) / len(finals):.3f}, "
                  f"with images swapped {sum(swaps) / len(swaps):.3f} over seeds {args.seeds}")
    os.makedirs(args.out, exist_ok=True)
    png = os.path.join(args.out, "compare.png")
    plot(results, png)
    with open(os.path.join(args.out, "compare.json"), "w") as f:
        json.dump({f"{a}_seed{s}": v for (a, s), v in results.items()}, f, indent=1)
    print(f"[compare] curves: {png}; numbers: {os.path.join(args.out, 'compare.json')}")


if __name__ == "__main__":
    main()

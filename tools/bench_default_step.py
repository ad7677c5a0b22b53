#!/usr/bin/env python
"""The default job's step time at a reference commit vs the working tree, in the same run.

    .venv/bin/python tools/bench_default_step.py --ref 4776cce            # 25 steps, 2 rounds
    .venv/bin/python tools/bench_default_step.py --ref HEAD~3 --steps 40 --rounds 3 \
        --set trainer.seed=1 --set rollout.n=4

Checks the reference commit out into a temporary git worktree (removed at the end), then runs
``python -m megatron_papo.train`` (the default job: warm start, then ``--steps`` RL steps; no
held-out evaluation, checkpoint or export) from the reference tree and from this tree in turn
(``--rounds`` times, interleaved: ref, this, ref, this, ...), each with the package imported
from its own tree. Prints per variant the start-up (seconds from the command to RL's first
step), the medians over steps 11-end of ``time/*`` and of the whole step (median of the rounds),
the ratio to the reference, and whether the two trees give
identical metrics (reward, accuracy, every loss term: a speed-up must not change the math; when
they differ, the largest relative difference). The CPU time stolen by the hypervisor during each
run is printed (``/proc/stat``): runs with much steal are noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXED = ["trainer.eval_every=0", "trainer.stop_at_accuracy=null", "trainer.save_every=0",
         "trainer.export_hf=false", "trainer.eval_prompts=32", "trainer.resume=none"]
FIRST_TIMED_STEP = 11


def _steal() -> tuple[int, int] | None:
    try:
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
    except OSError:
        return None
    return values[7], sum(values)


def _check_imports_from(tree: str) -> None:
    """The package must come from ``tree`` (PYTHONPATH), not from the editable install."""
    where = subprocess.run(
        [sys.executable, "-c", "import megatron_papo, os; print(os.path.realpath("
         "megatron_papo.__file__))"], env=dict(os.environ, PYTHONPATH=tree), cwd=tree,
        capture_output=True, text=True, check=True).stdout.strip()
    if not where.startswith(os.path.realpath(tree) + os.sep):
        raise SystemExit(f"bench_default_step: {tree} imports megatron_papo from {where}; "
                         "cannot compare trees in this environment")


def run_job(tree: str, folder: str, steps: int, overrides: list[str]) -> dict:
    shutil.rmtree(folder, ignore_errors=True)
    before, start = _steal(), time.time()
    with open(f"{folder}.log", "w") as log:
        done = subprocess.run(
            [sys.executable, "-m", "megatron_papo.train", f"hydra.run.dir={folder}",
             f"trainer.output_dir={folder}", f"trainer.steps={steps}", *FIXED, *overrides],
            cwd=tree, env=dict(os.environ, PYTHONPATH=tree), stdout=log,
            stderr=subprocess.STDOUT)
    if done.returncode:
        raise SystemExit(f"bench_default_step: the run in {tree} failed (exit "
                         f"{done.returncode}); see {folder}.log")
    after = _steal()
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        logged = [json.loads(line) for line in f if line.strip()]
    records = [r for r in logged if "reward" in r]
    # the start-up: from the command's start to RL's first step (the warm start's evaluation)
    startup = next((r["val/elapsed"] for r in logged if r.get("after_warm_start")), float("nan"))
    timed = [r for r in records if r["step"] >= FIRST_TIMED_STEP]
    phases = sorted({k for r in timed for k in r if k.startswith("time/")})
    result = {"seconds": statistics.median(r["seconds"] for r in timed),
              **{k[5:]: statistics.median(r.get(k, 0.0) for r in timed) for k in phases}}
    steal = (100.0 * (after[0] - before[0]) / max(after[1] - before[1], 1)
             if before and after else float("nan"))
    return {"times": result, "records": records, "wall": time.time() - start, "steal": steal,
            "startup": startup}


def compare_metrics(a: list[dict], b: list[dict]) -> tuple[bool, float]:
    keys = sorted(k for k in a[0] if k in ("reward", "accuracy") or k.startswith("loss/"))
    worst, same = 0.0, len(a) == len(b)
    for x, y in zip(a, b):
        for k in keys:
            if x.get(k) != y.get(k):
                same = False
                if k in x and k in y:
                    worst = max(worst, abs(x[k] - y[k]) / max(abs(x[k]), 1e-12))
    return same, worst


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 2)[2])
    parser.add_argument("--ref", required=True, help="the reference commit (any git revision)")
    parser.add_argument("--steps", type=int, default=25, help="RL steps per run (timed: 11-end)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a Hydra override for both runs (repeatable)")
    parser.add_argument("--out", default=None, help="run folders (default: a temporary folder)")
    args = parser.parse_args(argv)
    if args.steps < FIRST_TIMED_STEP:
        parser.error(f"--steps must be >= {FIRST_TIMED_STEP} (steps 11-end are timed)")
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", args.ref], cwd=ROOT, check=True,
                                capture_output=True, text=True).stdout.strip()
    except subprocess.CalledProcessError:
        parser.error(f"--ref {args.ref}: not a commit of this repository")
    out = os.path.abspath(args.out or tempfile.mkdtemp(prefix="bench_default_step_"))
    os.makedirs(out, exist_ok=True)
    reference = tempfile.mkdtemp(prefix=f"bench_ref_{commit}_")
    subprocess.run(["git", "worktree", "add", "--detach", "--force", reference, commit],
                   cwd=ROOT, check=True, capture_output=True)
    try:
        trees = {f"ref {commit}": reference, "this tree": ROOT}
        for tree in trees.values():
            _check_imports_from(tree)
        runs: dict[str, list[dict]] = {name: [] for name in trees}
        for round_index in range(args.rounds):
            for k, (name, tree) in enumerate(trees.items()):
                result = run_job(tree, os.path.join(out, f"{k}_r{round_index}"), args.steps,
                                 args.set)
                runs[name].append(result)
                print(f"[bench] round {round_index + 1}/{args.rounds} {name}: "
                      f"{result['times']['seconds']:.2f} s/step, start-up "
                      f"{result['startup']:.1f} s, {result['wall']:.0f} s run, "
                      f"steal {result['steal']:.0f}%", flush=True)
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", reference], cwd=ROOT,
                       capture_output=True)
        shutil.rmtree(reference, ignore_errors=True)
    summary = {name: {key: statistics.median(r["times"][key] for r in results)
                      for key in results[0]["times"]} for name, results in runs.items()}
    startup = {name: statistics.median(r["startup"] for r in results)
               for name, results in runs.items()}
    names = list(summary)
    columns = [k for k in summary[names[0]] if k != "seconds"]
    print(f"\nthe default job + {' '.join(args.set) or 'no overrides'}; median over steps "
          f"{FIRST_TIMED_STEP}-{args.steps}, median of {args.rounds} rounds; start-up: seconds "
          "from the command to RL's first step (the warm start's evaluation done)")
    print("| tree | start-up s | s/step | vs ref | " + " | ".join(columns) + " |")
    print("|---|---|---|---|" + "---|" * len(columns))
    base = summary[names[0]]["seconds"]
    for name in names:
        s = summary[name]
        print(f"| {name} | {startup[name]:.1f} | {s['seconds']:.2f} | "
              f"{s['seconds'] / base:.2f}x | "
              + " | ".join(f"{s.get(c, 0.0):.3f}" for c in columns) + " |")
    same, worst = compare_metrics(runs[names[0]][0]["records"], runs[names[1]][0]["records"])
    print("metrics (reward, accuracy, loss terms, every step): "
          + ("identical" if same else f"DIFFER (largest relative difference {worst:.2e})"))
    return 0


if __name__ == "__main__":
    sys.exit(main())

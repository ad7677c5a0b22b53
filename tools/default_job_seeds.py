#!/usr/bin/env python
"""The default job as a user runs it, once per seed, and the table README shows (issue #22's
measures): held-out accuracy at the end (and the step it stopped at), with the images swapped,
the first held-out evaluation >= 0.8 in seconds from the command's start (and its step), the
whole run's wall time, the median step time over steps 11-end and its phases.

    .venv/bin/python tools/default_job_seeds.py --seeds 0 1 2 3 4          # runs, then the table
    .venv/bin/python tools/default_job_seeds.py --seeds 0 1 --out outputs/seeds -- rollout.n=4
    .venv/bin/python tools/default_job_seeds.py --report outputs/default_seeds  # table only

Each run is ``python -m megatron_papo.train trainer.seed=S trainer.output_dir=<out>/seed<S>``
plus the overrides after ``--`` (nothing else: the default's own evaluation schedule, early
stop and export), one after the other (each uses the whole machine); the wall time is taken
around the command. A finished run in the folder is reused (its wall time from run.json).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIRST_TIMED_STEP = 11
TARGET = 0.8


def _records(folder: str) -> list[dict]:
    path = os.path.join(folder, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def summary(records: list[dict], wall: float | None) -> dict:
    """One run's row."""
    steps = [r for r in records if "reward" in r]
    evals = [r for r in records if "val/accuracy" in r and not r.get("after_warm_start")
             and r.get("step", 0) > 0]
    final = next((r for r in reversed(records) if "val_swapped/accuracy" in r), {})
    reached = next((r for r in evals if r["val/accuracy"] >= TARGET), None)
    timed = [r for r in steps if r["step"] >= FIRST_TIMED_STEP]
    phases = sorted({k for r in timed for k in r if k.startswith("time/")})
    return {
        "final": final.get("val/accuracy"), "final_step": final.get("step"),
        "swapped": final.get("val_swapped/accuracy"),
        "reached_s": reached.get("val/elapsed") if reached else None,
        "reached_step": reached["step"] if reached else None,
        "wall": wall,
        "step_s": statistics.median(r["seconds"] for r in timed) if timed else None,
        "phases": {k[5:]: statistics.median(r.get(k, 0.0) for r in timed) for k in phases},
    }


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def table(rows: dict[int, dict]) -> list[str]:
    lines = ["| seed | held-out at the end (step) | images swapped | first held-out >= 0.8: "
             "seconds from the command (step) | whole run | s/step (median, steps 11-end) |",
             "|---|---|---|---|---|---|"]
    for seed, r in sorted(rows.items()):
        lines.append(f"| {seed} | {_fmt(r['final'], '.3f')} ({_fmt(r['final_step'], 'd')}) | "
                     f"{_fmt(r['swapped'], '.3f')} | {_fmt(r['reached_s'], '.0f')} s "
                     f"({_fmt(r['reached_step'], 'd')}) | {_fmt(r['wall'], '.0f')} s | "
                     f"{_fmt(r['step_s'], '.2f')} |")
    known = [r for r in rows.values() if r["reached_s"] is not None]
    lines.append("")
    lines.append(f"median first held-out >= {TARGET}: "
                 + (f"{statistics.median(r['reached_s'] for r in known):.0f} s"
                    if len(known) == len(rows) else
                    f"not reached by {len(rows) - len(known)} of {len(rows)} runs")
                 + "; median s/step: "
                 + _fmt(statistics.median(r["step_s"] for r in rows.values()
                                          if r["step_s"] is not None)
                        if any(r["step_s"] is not None for r in rows.values()) else None, ".2f")
                 + "; runs under 6 min: "
                 + f"{sum(1 for r in rows.values() if r['wall'] is not None and r['wall'] < 360)}"
                 + f"/{len(rows)}; final >= 0.9: "
                 + f"{sum(1 for r in rows.values() if (r['final'] or 0) >= 0.9)}/{len(rows)}")
    phases = sorted({k for r in rows.values() for k in r["phases"]})
    if phases:
        lines.append("phases (median s, steps 11-end): " + "; ".join(
            f"seed {seed}: " + ", ".join(f"{k} {r['phases'].get(k, 0.0):.2f}" for k in phases)
            for seed, r in sorted(rows.items())))
    return lines


def run(seed: int, folder: str, overrides: list[str]) -> float:
    """The default command for ``seed``; its wall seconds."""
    if any("val_swapped/accuracy" in r for r in _records(folder)):
        with open(os.path.join(folder, "run.json")) as f:
            print(f"[seeds] seed {seed}: finished run found in {folder}, reused", flush=True)
            return json.load(f)["wall"]
    command = [sys.executable, "-m", "megatron_papo.train", f"trainer.seed={seed}",
               f"trainer.output_dir={folder}", f"hydra.run.dir={folder}", *overrides]
    print(f"[seeds] seed {seed}: {' '.join(command)}", flush=True)
    os.makedirs(folder, exist_ok=True)
    start = time.perf_counter()
    with open(os.path.join(folder, "command.log"), "w") as log:
        done = subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"default_job_seeds: seed {seed} failed with exit code "
                         f"{done.returncode}; see {os.path.join(folder, 'command.log')}")
    with open(os.path.join(folder, "run.json"), "w") as f:
        json.dump({"seed": seed, "wall": wall, "command": command}, f)
    return wall


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    p.add_argument("--out", default=os.path.join("outputs", "default_seeds"))
    p.add_argument("--report", default=None, metavar="FOLDER",
                   help="print the table of the seed<S> runs in FOLDER (runs nothing)")
    p.add_argument("overrides", nargs="*", help="Hydra overrides for every run (after --)")
    args = p.parse_args(argv)
    rows = {}
    if args.report:
        found = sorted(int(d[4:]) for d in os.listdir(args.report)
                       if d.startswith("seed") and d[4:].isdigit())
        if not found:
            raise SystemExit(f"default_job_seeds: --report {args.report}: no seed<S> run folder")
        for seed in found:
            folder = os.path.join(args.report, f"seed{seed}")
            wall = None
            if os.path.exists(os.path.join(folder, "run.json")):
                with open(os.path.join(folder, "run.json")) as f:
                    wall = json.load(f)["wall"]
            rows[seed] = summary(_records(folder), wall)
    else:
        for seed in args.seeds:
            folder = os.path.abspath(os.path.join(args.out, f"seed{seed}"))
            wall = run(seed, folder, args.overrides)
            rows[seed] = summary(_records(folder), wall)
    print("\n".join(table(rows)))


if __name__ == "__main__":
    main()

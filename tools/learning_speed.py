#!/usr/bin/env python
"""How many RL steps until the main job learns: one run per (setting, seed), stopped as soon as
the 5-step moving average of the TRAINING accuracy reaches --threshold (fresh prompts at
temperature 1: an unbiased, per-step estimate), or after --max-steps. One JSON line per run
(steps to the threshold, wall seconds, s/step, accuracy per 20 steps) on stdout and in
<out>/summary.jsonl.

    .venv/bin/python tools/learning_speed.py --seeds 0 1 2 \\
        --setting base= --setting opt4=trainer.optimizer_steps_per_rollout=4

A setting is NAME=OVERRIDES (Hydra overrides of the main job, separated by spaces; empty: the
default). Runs go one after the other (each uses the whole machine).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_one(name: str, overrides: list[str], seed: int, max_steps: int, threshold: float,
            out: str) -> dict:
    folder = os.path.join(out, f"{name}_s{seed}")
    args = [sys.executable, "-m", "megatron_papo.train", f"trainer.seed={seed}",
            f"trainer.steps={max_steps}", "trainer.eval_every=0", "trainer.save_every=0",
            "trainer.export_hf=false", "trainer.resume=none", f"trainer.output_dir={folder}",
            f"hydra.run.dir={folder}", *overrides]
    start = time.time()
    os.makedirs(folder, exist_ok=True)
    with open(f"{folder}.log", "w") as log:
        job = subprocess.Popen(args, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
        path, seen, accs, reached, seconds = os.path.join(folder, "metrics.jsonl"), 0, [], None, 0.0
        try:
            while reached is None:
                done = job.poll() is not None
                if os.path.exists(path):
                    with open(path) as f:
                        lines = f.read().splitlines()
                    for line in lines[seen:]:
                        record = json.loads(line)
                        if "accuracy" in record:
                            accs.append(record["accuracy"])
                            seconds += record["seconds"]
                            if len(accs) >= 5 and sum(accs[-5:]) / 5 >= threshold:
                                reached = record["step"]
                                break
                    seen = len(lines)
                if done:
                    break
                time.sleep(1)
        finally:
            if job.poll() is None:  # reached: the rest of the run is not needed
                os.killpg(job.pid, signal.SIGKILL)
            job.wait()
    return dict(name=name, seed=seed, reached=reached, steps_run=len(accs),
                wall_s=round(time.time() - start, 1),
                s_per_step=round(seconds / max(len(accs), 1), 3),
                accuracy_per_20_steps=[round(sum(accs[i:i + 20]) / len(accs[i:i + 20]), 2)
                                       for i in range(0, len(accs), 20)],
                overrides=overrides)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="learning_speed.py", description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", action="append", default=[], metavar="NAME=OVERRIDES",
                        help="a setting to measure (repeatable; default: base=)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--max-steps", type=int, default=150)
    parser.add_argument("--threshold", type=float, default=0.8)
    parser.add_argument("--out", default="outputs/learning_speed")
    args = parser.parse_args(argv)
    settings = []
    for item in args.setting or ["base="]:
        name, sep, overrides = item.partition("=")
        if not sep or not name:
            parser.error(f"--setting {item!r}: expected NAME=OVERRIDES")
        settings.append((name, overrides.split()))
    os.makedirs(args.out, exist_ok=True)
    for seed in args.seeds:
        for name, overrides in settings:
            result = run_one(name, overrides, seed, args.max_steps, args.threshold, args.out)
            print(json.dumps(result), flush=True)
            with open(os.path.join(args.out, "summary.jsonl"), "a") as f:
                f.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""END-TO-END step time of the main job (rollout + reward + batch + log-probs + masked scoring +
update + weight sync) for GRPO and for PAPO with the frozen masked branch scored by the trainer
(an extra Megatron forward) or by the rollout engine (a vLLM prefill), in the same run.

    .venv/bin/python tools/bench_papo_step.py                      # hidden 256, 4 layers
    .venv/bin/python tools/bench_papo_step.py --hidden 64 --layers 2 --prompts 64 --new-tokens 16
    .venv/bin/python tools/bench_papo_step.py ... --setting padded=trainer.packing=false \
        --setting packed=trainer.packing=true          # any Hydra overrides, compared the same way

Each variant is the main job (``python -m megatron_papo.train``) on the embedded tiny model at
the given width, from its initial weights (no warm start, no evaluation during training, no
checkpoint), for --steps steps, with ``optim.lr=0``: every step runs in full (the optimizer too)
but the policy never moves, so all variants sample the SAME responses (same seeds, same
weights) and compare on identical batches; the variants run one after the other, --rounds times,
interleaved (A B C A B C). A variant's time is the median over its rounds of the median step
time over steps 2..end (step 1 pays one-off allocation). Every variant is ``papo_no_kl_ref``
(the main job's default without dynamic sampling); GRPO = ``papo_no_kl_ref`` with the
perception and both entropy weights at 0 (same clipping and aggregation, no masked branch), so
the ratios isolate what PAPO adds. Goal (issue 24): PAPO (engine) / GRPO <= 1.15x.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GRPO_LOSS = ["algorithm.loss.prcp_gamma=0.0", "algorithm.loss.entropy_eta_original=0.0",
             "algorithm.loss.entropy_eta_masked=0.0"]
VARIANTS = {
    "grpo": GRPO_LOSS,
    "papo_trainer": ["algorithm.masked_logprobs=trainer"],
    "papo_engine": ["algorithm.masked_logprobs=engine"],
}
GOAL = 1.15
PHASES = ("rollout", "reward", "batch", "logprobs", "masked_scoring", "update", "sync")


def run_variant(name: str, extra: list[str], args, folder: str) -> dict:
    overrides = [
        f"model.tiny_hidden_size={args.hidden}", f"model.tiny_layers={args.layers}",
        f"model.tiny_vision_hidden_size={args.vision_hidden}",
        f"trainer.steps={args.steps}", "trainer.warmup_steps=0", "trainer.eval_every=0",
        "optim.lr=0.0",
        "trainer.eval_prompts=8", "trainer.eval_k=1", "trainer.save_every=0",
        "trainer.export_hf=false", "trainer.stop_at_accuracy=null", "trainer.resume=none",
        # without the main job's dynamic sampling: its extra draws depend on the rewards (at
        # lr 0 from the random initial weights no group has signal: ten draws every step)
        "algorithm=papo_no_kl_ref",
        f"trainer.prompts_per_step={args.prompts}", f"rollout.n={args.n}",
        f"rollout.max_new_tokens={args.new_tokens}", f"trainer.seed={args.seed}",
        f"trainer.output_dir={folder}", f"hydra.run.dir={folder}", *extra]
    os.makedirs(folder, exist_ok=True)
    with open(f"{folder}.log", "w") as log:
        done = subprocess.run([sys.executable, "-m", "megatron_papo.train", *overrides], cwd=ROOT,
                              stdout=log, stderr=subprocess.STDOUT)
    if done.returncode:
        raise SystemExit(f"bench_papo_step: the {name} run failed (exit {done.returncode}); "
                         f"see {folder}.log")
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        steps = [r for r in map(json.loads, f) if "reward" in r and r.get("step", 0) >= 2]
    return {"seconds": statistics.median(r["seconds"] for r in steps),
            "response_length": statistics.mean(r["response_length"] for r in steps),
            **{p: statistics.median(r.get(f"time/{p}", 0.0) for r in steps) for p in PHASES}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256, help="language model hidden size")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers")
    parser.add_argument("--vision-hidden", type=int, default=64, help="vision tower hidden size")
    parser.add_argument("--prompts", type=int, default=32, help="prompts per step")
    parser.add_argument("--n", type=int, default=8, help="samples per prompt")
    parser.add_argument("--new-tokens", type=int, default=32, help="rollout.max_new_tokens")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--setting", action="append", default=[], metavar="NAME=OVERRIDES",
                        help="compare these instead of --variants: a name and Hydra overrides "
                             "separated by spaces (repeatable; the first is the reference)")
    parser.add_argument("--out", default=None, help="run folders (default: a temporary folder, removed at the end)")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error("--steps must be >= 2 (step 1 is not timed)")
    variants = {name: VARIANTS[name] for name in args.variants}
    if args.setting:
        variants = {}
        for setting in args.setting:
            name, _, overrides = setting.partition("=")
            if not name or not _:
                parser.error(f"--setting {setting!r}: write NAME=OVERRIDES")
            variants[name] = overrides.split()
    if args.out:
        return _measure(variants, args, args.out)
    with tempfile.TemporaryDirectory(prefix="bench_papo_step_") as out:  # removed afterwards
        return _measure(variants, args, out)


def _measure(variants: dict[str, list[str]], args, out: str) -> int:
    runs: dict[str, list[dict]] = {name: [] for name in variants}
    start = time.time()
    for round_index in range(args.rounds):
        for name, extra in variants.items():
            result = run_variant(name, extra, args, os.path.join(out, f"{name}_r{round_index}"))
            runs[name].append(result)
            print(f"[bench] round {round_index + 1}/{args.rounds} {name}: "
                  f"{result['seconds']:.2f} s/step ({time.time() - start:.0f}s elapsed)",
                  flush=True)
    summary = {name: {key: statistics.median(r[key] for r in results) for key in results[0]}
               for name, results in runs.items()}
    reference = next(iter(summary))
    base = summary[reference]["seconds"]
    print(f"\nhidden {args.hidden}, {args.layers} layers, vision {args.vision_hidden}; "
          f"{args.prompts} prompts x {args.n} samples, <= {args.new_tokens} new tokens; median "
          f"step over steps 2-{args.steps}, median of {args.rounds} rounds")
    print(f"| variant | s/step | vs {reference} | " + " | ".join(PHASES)
          + " | response tokens |")
    print("|---|---|---|" + "---|" * len(PHASES) + "---|")
    for name, s in summary.items():
        ratio = f"{s['seconds'] / base:.2f}x"
        print(f"| {name} | {s['seconds']:.2f} | {ratio} | "
              + " | ".join(f"{s[p]:.2f}" for p in PHASES) + f" | {s['response_length']:.1f} |")
    if len(runs) > 1:
        print("round by round, vs " + reference + ": " + "; ".join(
            name + " " + "/".join(f"{r['seconds'] / runs[reference][k]['seconds']:.2f}"
                                  for k, r in enumerate(results)) + "x"
            for name, results in runs.items() if name != reference))
    if reference == "grpo" and "papo_engine" in summary:
        ratio = summary["papo_engine"]["seconds"] / base
        print(f"\nPAPO (engine-scored masked branch) / GRPO = {ratio:.2f}x (goal <= {GOAL}x: "
              f"{'met' if ratio <= GOAL else 'missed'})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "summary": summary, "runs": runs}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

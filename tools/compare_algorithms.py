#!/usr/bin/env python
"""Settings compared on the same seeds: runs the main job once per (setting, seed), then prints
the learning curves, the final held-out accuracy (avg@k), the accuracy with the images swapped
between prompts (vision dependence: a model that looks drops towards chance, 0.25 on the
embedded counting task) and, on the hint task (data=counting_hint), the accuracy on prompts
whose hint is wrong; with several seeds, each setting against the first one, paired by seed
(mean difference, its spread, an exact sign-flip test); writes a PNG of the curves.

    .venv/bin/python tools/compare_algorithms.py                       # grpo vs the default, seed 0
    .venv/bin/python tools/compare_algorithms.py --algorithms grpo papo --seeds 0 1 2 3 4 \
        --store docs/runs/grpo_vs_papo -- trainer.steps=150            # Hydra overrides after --
    .venv/bin/python tools/compare_algorithms.py --seeds 0 1 2 3 4 \
        --setting "papo=algorithm=papo_no_kl_ref" \
        --setting "no_prcp=algorithm=papo_no_kl_ref algorithm.loss.prcp_gamma=0 \
                   algorithm.loss.entropy_eta_original=0 algorithm.loss.entropy_eta_masked=0"
    .venv/bin/python tools/compare_algorithms.py --report docs/runs/grpo_vs_papo  # tables only

A setting is NAME=OVERRIDES (Hydra overrides separated by spaces); ``--algorithms A B`` is short
for ``--setting A=algorithm=A --setting B=algorithm=B``. Runs are sequential (each uses every
core); a finished run (its metrics hold the final evaluation) is reused, so an interrupted
comparison continues where it stopped. Every run takes all `trainer.steps` (the default job's
early stop, `trainer.stop_at_accuracy`, is off here: the settings compare after the same number
of steps; pass it after -- to turn it back on).

``--store FOLDER``: each run's metrics.jsonl (small) is copied to FOLDER/<setting>_seed<S>.jsonl
with FOLDER/runs.json (the commit, whether the tree had uncommitted changes, the date, the
machine, each setting's overrides), so ``--report FOLDER`` rebuilds every table from the stored
metrics alone (nothing is run).
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from megatron_papo.machine import describe as describe_machine  # noqa: E402  (light: no torch)


def _records(folder: str) -> list[dict]:
    path = os.path.join(folder, "metrics.jsonl")
    return _records_file(path) if os.path.exists(path) else []


def _finished(records: list[dict]) -> dict | None:
    return next((r for r in reversed(records) if "val_swapped/accuracy" in r), None)


def run_one(setting: str, seed: int, folder: str, overrides: list[str], launcher: list[str]
            ) -> float:
    """The main job for one (setting, seed); returns its wall seconds (0 when reused)."""
    if _finished(_records(folder)):
        print(f"[compare] {setting} seed {seed}: finished run found in {folder}, reused",
              flush=True)
        return 0.0
    if os.path.exists(os.path.join(folder, "metrics.jsonl")):
        os.remove(os.path.join(folder, "metrics.jsonl"))  # an interrupted run starts over
    command = [*launcher, "-m", "megatron_papo.train", f"trainer.seed={seed}",
               f"trainer.output_dir={folder}", f"hydra.run.dir={folder}",
               "trainer.export_hf=false", "trainer.stop_at_accuracy=null", *overrides]
    print(f"[compare] {setting} seed {seed}: {' '.join(command)}", flush=True)
    start = time.perf_counter()
    log_path = os.path.join(folder, "train.log")
    os.makedirs(folder, exist_ok=True)
    with open(log_path, "w") as log:
        done = subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise SystemExit(f"compare_algorithms: the {setting} run (seed {seed}) failed with exit "
                         f"code {done.returncode}; see {log_path}")
    return time.perf_counter() - start


def summary(records: list[dict]) -> dict:
    steps = [r for r in records if "reward" in r and "step" in r]
    final = _finished(records) or {}
    reached = next((r["step"] for r in steps if r["accuracy"] >= 0.8), None)
    held_out = [r for r in records if "val/accuracy" in r and not r.get("after_warm_start")
                and r.get("step", 0) > 0]
    return {
        "held_out_0.8_step": next((r["step"] for r in held_out if r["val/accuracy"] >= 0.8),
                                  None),
        "wrong_hint_accuracy": final.get("val/accuracy@wrong"),
        "right_hint_accuracy": final.get("val/accuracy@right"),
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


# (summary key, column title, format) of the per-run and per-setting tables
MEASURES = (("final_accuracy", "held-out accuracy", ".3f"),
            ("swapped_accuracy", "images swapped", ".3f"),
            ("wrong_hint_accuracy", "wrong-hint accuracy", ".3f"),
            ("held_out_0.8_step", "first held-out >= 0.8 (step)", "d"),
            ("first_step_train_accuracy_0.8", "first train acc >= 0.8 (step)", "d"))


def sign_flip_p(differences: list[float]) -> float:
    """Exact two-sided p-value of a mean paired difference: the share of the 2^n sign flips of
    the differences whose mean is at least as far from 0 (no distribution assumed)."""
    observed = abs(statistics.fmean(differences))
    flips = list(itertools.product((1, -1), repeat=len(differences)))
    extreme = sum(abs(statistics.fmean(s * d for s, d in zip(signs, differences)))
                  >= observed - 1e-12 for signs in flips)
    return extreme / len(flips)


def _fmt(x, spec=".3f"):
    return "-" if x is None else format(x, spec)


def report(results: dict, settings: list[str], seeds: list[int]) -> list[str]:
    """The tables (markdown lines): every run; each setting's mean, spread and range; each
    setting against the first, paired by seed."""
    measures = [m for m in MEASURES if any(r.get(m[0]) is not None for r in results.values())]
    lines = ["| setting | seed | " + " | ".join(t for _, t, _ in measures) + " | s/step |",
             "|---|---|" + "---|" * len(measures) + "---|"]
    for name in settings:
        for seed in seeds:
            r = results[(name, seed)]
            lines.append(f"| {name} | {seed} | " + " | ".join(
                _fmt(r.get(k), f) for k, _, f in measures)
                + f" | {_fmt(r.get('seconds_per_step'), '.2f')} |")
    lines += ["", "| setting | measure | mean | sd | min-max | runs that reached it |",
              "|---|---|---|---|---|---|"]
    for name in settings:
        for key, title, _ in measures:
            values = [results[(name, s)].get(key) for s in seeds]
            known = [v for v in values if v is not None]
            if not known:
                lines.append(f"| {name} | {title} | - | - | - | 0/{len(values)} |")
                continue
            sd = statistics.stdev(known) if len(known) > 1 else 0.0
            lines.append(f"| {name} | {title} | {statistics.fmean(known):.3f} | {sd:.3f} | "
                         f"{min(known):.3f}-{max(known):.3f} | {len(known)}/{len(values)} |")
    if len(seeds) > 1:
        reference = settings[0]
        lines += ["", f"Paired by seed against {reference} (difference = setting - "
                      f"{reference}; p: exact two-sided sign-flip test over the seeds where "
                      "both runs have the measure):", "",
                  "| setting | measure | seeds | mean difference | sd | p |",
                  "|---|---|---|---|---|---|"]
        for name in settings[1:]:
            for key, title, _ in measures:
                pairs = [(results[(name, s)].get(key), results[(reference, s)].get(key))
                         for s in seeds]
                differences = [a - b for a, b in pairs if a is not None and b is not None]
                if len(differences) < 2:
                    lines.append(f"| {name} | {title} | {len(differences)} | - | - | - |")
                    continue
                lines.append(f"| {name} | {title} | {len(differences)} | "
                             f"{statistics.fmean(differences):+.3f} | "
                             f"{statistics.stdev(differences):.3f} | "
                             f"{sign_flip_p(differences):.3f} |")
    return lines


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()


def code_state() -> dict:
    """The commit the runs start from and whether the tree differs from it (taken before the
    first run: a commit made while they run does not relabel them)."""
    return {"commit": _git("rev-parse", "HEAD"),
            "uncommitted_changes": bool(_git("status", "--porcelain", "--untracked-files=no")),
            "date": datetime.datetime.now().isoformat(timespec="seconds")}


def store_runs(folder: str, runs: dict, settings: dict, seeds: list[int],
               overrides: list[str], state: dict) -> None:
    """Each run's metrics.jsonl as FOLDER/<setting>_seed<S>.jsonl, and FOLDER/runs.json with
    ``state`` (this invocation's code state: runs it reused from an earlier invocation ran at
    that one's; say so in the write-up when the two differ)."""
    os.makedirs(folder, exist_ok=True)
    for (name, seed), run_folder in runs.items():
        shutil.copyfile(os.path.join(run_folder, "metrics.jsonl"),
                        os.path.join(folder, f"{name}_seed{seed}.jsonl"))
    manifest = {**state,
                "machine": describe_machine(),
                "settings": settings, "seeds": seeds, "overrides": overrides}
    with open(os.path.join(folder, "runs.json"), "w") as f:
        json.dump(manifest, f, indent=1)


def load_stored(folder: str) -> tuple[dict, dict]:
    """(the manifest, {(setting, seed): summary}) of a --store folder."""
    path = os.path.join(folder, "runs.json")
    if not os.path.exists(path):
        raise SystemExit(f"compare_algorithms: --report {folder}: no runs.json there (a folder "
                         "written by --store)")
    with open(path) as f:
        manifest = json.load(f)
    results = {}
    for name in manifest["settings"]:
        for seed in manifest["seeds"]:
            metrics = os.path.join(folder, f"{name}_seed{seed}.jsonl")
            if not os.path.exists(metrics):
                raise SystemExit(f"compare_algorithms: --report {folder}: {metrics} is missing")
            results[(name, seed)] = summary(_records_file(metrics))
    return manifest, results


def _records_file(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _settings(p: argparse.ArgumentParser, args) -> dict[str, list[str]]:
    if args.setting:
        settings = {}
        for item in args.setting:
            name, sep, overrides = item.partition("=")
            if not sep or not name.strip() or "/" in name:
                p.error(f"--setting {item!r}: write NAME=OVERRIDES (a name without '/')")
            if name in settings:
                p.error(f"--setting {name}: given twice")
            settings[name] = overrides.split()
        return settings
    return {a: [f"algorithm={a}"] for a in args.algorithms}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--algorithms", nargs="+", default=["grpo", "papo_no_kl_ref"],
                   help="algorithm presets to compare (default: grpo and the default PAPO "
                        "variant, papo_no_kl_ref)")
    p.add_argument("--setting", action="append", default=[], metavar="NAME=OVERRIDES",
                   help="a setting to compare instead of --algorithms (repeatable; the first is "
                        "the reference of the paired comparison)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--out", default=os.path.join("outputs", "compare"))
    p.add_argument("--store", default=None, metavar="FOLDER",
                   help="copy each run's metrics and a manifest here (e.g. docs/runs/NAME)")
    p.add_argument("--report", default=None, metavar="FOLDER",
                   help="print the tables of a --store folder (runs nothing)")
    p.add_argument("--nproc", type=int, default=1, help="processes per run (torchrun when > 1)")
    p.add_argument("overrides", nargs="*", help="Hydra overrides for every run (after --)")
    args = p.parse_args(argv)
    if args.report:
        manifest, results = load_stored(args.report)
        print(f"[compare] {args.report}: commit {manifest['commit'][:10]}"
              + (" (with uncommitted changes)" if manifest.get("uncommitted_changes") else "")
              + f", {manifest['date']}, {manifest['machine']}; seeds {manifest['seeds']}; "
              f"overrides {' '.join(manifest['overrides']) or 'none'}")
        if manifest.get("note"):
            print(f"[compare]   note: {manifest['note']}")
        for name, overrides in manifest["settings"].items():
            print(f"[compare]   {name}: {' '.join(overrides)}")
        print("\n".join(report(results, list(manifest["settings"]), manifest["seeds"])))
        return
    settings = _settings(p, args)
    state = code_state()
    launcher = [sys.executable]
    if args.nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--nproc-per-node", str(args.nproc)]
    results, folders = {}, {}
    for seed in args.seeds:
        for name, overrides in settings.items():
            folder = os.path.abspath(os.path.join(args.out, f"{name}_seed{seed}"))
            run_one(name, seed, folder, [*overrides, *args.overrides], launcher)
            results[(name, seed)] = summary(_records(folder))
            folders[(name, seed)] = folder

    print("\n[compare] training accuracy every 25 steps")
    for (name, seed), s in sorted(results.items()):
        points = " ".join(f"{a:.2f}" for step, a in s["curve"] if step % 25 == 0)
        print(f"  {name:>16} seed {seed}: {points}")
    print()
    print("\n".join(report(results, list(settings), args.seeds)))
    os.makedirs(args.out, exist_ok=True)
    png = os.path.join(args.out, "compare.png")
    plot(results, png)
    with open(os.path.join(args.out, "compare.json"), "w") as f:
        json.dump({f"{a}_seed{s}": v for (a, s), v in results.items()}, f, indent=1)
    print(f"[compare] curves: {png}; numbers: {os.path.join(args.out, 'compare.json')}")
    if args.store:
        store_runs(args.store, folders, settings, args.seeds, args.overrides, state)
        print(f"[compare] metrics stored in {args.store} (rebuild the tables: "
              f"tools/compare_algorithms.py --report {args.store})")


if __name__ == "__main__":
    main()

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
for ``--setting A=algorithm=A --setting B=algorithm=B``. Runs are sequential unless ``--jobs N``
(N at once, each one process; a run's metrics are the same either way); a finished run (its
metrics hold the final evaluation) is reused, so an interrupted comparison continues where it
stopped. Every run takes all `trainer.steps` (the default job's
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


def _command(seed: int, folder: str, overrides: list[str], launcher: list[str]) -> list[str]:
    return [*launcher, "-m", "megatron_papo.train", f"trainer.seed={seed}",
            f"trainer.output_dir={folder}", f"hydra.run.dir={folder}",
            "trainer.export_hf=false", "trainer.stop_at_accuracy=null",
            # one process per run (--nproc: torchrun's ranks): --jobs decides what runs at once
            "parallel.processes=1", *overrides]


def run_all(runs: list[tuple[str, int, str, list[str]]], launcher: list[str], jobs: int = 1
            ) -> None:
    """The main job for each (setting, seed, folder, overrides), ``jobs`` at a time (a finished
    run is reused, an interrupted one starts over). Any failure or interrupt stops the runs still
    going (none outlives the tool) and exits with one line naming the run and its log."""
    pending, running = list(runs), {}
    try:
        while pending or running:
            while pending and len(running) < jobs:
                setting, seed, folder, overrides = pending.pop(0)
                if _finished(_records(folder)):
                    print(f"[compare] {setting} seed {seed}: finished run found in {folder}, "
                          "reused", flush=True)
                    continue
                if os.path.exists(os.path.join(folder, "metrics.jsonl")):
                    os.remove(os.path.join(folder, "metrics.jsonl"))  # starts over
                command = _command(seed, folder, overrides, launcher)
                print(f"[compare] {setting} seed {seed}: {' '.join(command)}", flush=True)
                os.makedirs(folder, exist_ok=True)
                log_path = os.path.join(folder, "train.log")
                with open(log_path, "w") as log:
                    process = subprocess.Popen(command, cwd=ROOT, stdout=log,
                                               stderr=subprocess.STDOUT)
                running[process.pid] = (process, setting, seed, log_path, time.perf_counter())
            if not running:
                continue
            pid, status = os.wait()  # whichever run ends first (the tool has no other child)
            process, setting, seed, log_path, start = running.pop(pid)
            process.returncode = os.waitstatus_to_exitcode(status)
            if process.returncode != 0:
                raise SystemExit(f"compare_algorithms: the {setting} run (seed {seed}) failed "
                                 f"with exit code {process.returncode}; see {log_path}")
            print(f"[compare] {setting} seed {seed}: done in "
                  f"{time.perf_counter() - start:.0f} s", flush=True)
    finally:
        for process, *_ in running.values():
            process.terminate()
        for process, *_ in running.values():
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


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
        "monitor": monitor_summary(records),
    }


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def hacked_step(steps: list[dict]) -> int | None:
    """The first step t0 at which a run counts as HACKED (the definition frozen in
    docs/experiments.md before the gamma sweep): KL_prcp > 4 x the median of steps 1-10 and at
    least 0.5 nats above it, while over steps t..t+9 the mean training accuracy is at least 0.05
    below its mean over steps t-10..t-1 or the mean format rate is below 0.5. Windows are cut
    at the run's first and last steps; None: not hacked."""
    by_step = {r["step"]: r for r in steps if "loss/kl_prcp" in r}
    first = [by_step[t]["loss/kl_prcp"] for t in range(1, 11) if t in by_step]
    if not first:
        return None
    base = statistics.median(first)
    for t in sorted(by_step):
        kl = by_step[t]["loss/kl_prcp"]
        if not (kl > 4 * base and kl >= base + 0.5):
            continue
        after = [by_step[u] for u in range(t, t + 10) if u in by_step]
        before = [by_step[u]["accuracy"] for u in range(t - 10, t) if u in by_step]
        drop = before and (_mean([r["accuracy"] for r in after]) <= _mean(before) - 0.05)
        if drop or _mean([r["format"] for r in after]) < 0.5:
            return t
    return None


def monitor_summary(records: list[dict]) -> dict:
    """The perception-hacking monitor's record of one run, judged by the frozen definition: its
    alerts (steps), the hacked step t0, true positives (alerts in [t0 - 5, t0 + 10]), false
    positives (every other alert), a miss (hacked, no alert in the window); and the paper's
    symptoms over the run: KL_prcp and the high-side clip fraction (first 10 steps' mean, the
    maximum and its step, the last 10 steps' mean)."""
    steps = [r for r in records if "reward" in r and "step" in r]
    alerts = [r["step"] for r in steps if r.get("alert/perception_hacking")]
    t0 = hacked_step(steps)
    true = [a for a in alerts if t0 is not None and t0 - 5 <= a <= t0 + 10]

    def trace(key):
        values = [(r["step"], r[key]) for r in steps if key in r]
        if not values:
            return None
        peak = max(values, key=lambda v: v[1])
        return (_mean([v for _, v in values[:10]]), peak[1], peak[0],
                _mean([v for _, v in values[-10:]]))

    return {"alerts": alerts, "hacked_step": t0, "true_alerts": len(true),
            "false_alerts": len(alerts) - len(true), "missed": t0 is not None and not true,
            "kl_prcp": trace("loss/kl_prcp"), "clip_high": trace("clip/high"),
            "final_format": steps[-1].get("format") if steps else None}


def monitor_report(monitors: dict, settings: list[str], seeds: list[int]) -> list[str]:
    """The perception-hacking table: one row per run."""
    def trace(t, spec):
        return "-" if t is None else (f"{t[0]:{spec}} / {t[1]:{spec}} ({t[2]}) / "
                                      f"{t[3]:{spec}}")

    lines = ["| setting | seed | hacked at (t0) | alerts (steps) | true / false alerts | miss "
             "| KL_prcp first 10 / max (step) / last 10 | clip-high first 10 / max (step) / "
             "last 10 | format at the end |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name in settings:
        for seed in seeds:
            m = monitors[(name, seed)]
            lines.append(
                f"| {name} | {seed} | {_fmt(m['hacked_step'], 'd')} | "
                f"{', '.join(map(str, m['alerts'])) or 'none'} | {m['true_alerts']} / "
                f"{m['false_alerts']} | {'yes' if m['missed'] else 'no'} | "
                f"{trace(m['kl_prcp'], '.2f')} | {trace(m['clip_high'], '.4f')} | "
                f"{_fmt(m['final_format'], '.2f')} |")
    return lines


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
    monitors = {key: r["monitor"] for key, r in results.items()}
    if any(m["kl_prcp"] for m in monitors.values()):
        lines += ["", "Perception-hacking monitor per run (hacked: the definition in "
                      "docs/experiments.md, 'The monitor's rule, frozen before the gamma sweep'; "
                      "true alerts: within [t0 - 5, t0 + 10]):", "",
                  *monitor_report(monitors, settings, seeds)]
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
    p.add_argument("--jobs", type=int, default=1,
                   help="runs at once (default 1). One run of the tiny model keeps ~1.1 of this "
                        "machine's 2 cores busy (Python-bound): --jobs 2 finishes two runs in "
                        "the time of one (docs/experiments.md)")
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
    if args.jobs < 1:
        p.error(f"--jobs {args.jobs}: at least 1")
    settings = _settings(p, args)
    state = code_state()
    launcher = [sys.executable]
    if args.nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--nproc-per-node", str(args.nproc)]
    folders = {(name, seed): os.path.abspath(os.path.join(args.out, f"{name}_seed{seed}"))
               for seed in args.seeds for name in settings}
    run_all([(name, seed, folder, [*settings[name], *args.overrides])
             for (name, seed), folder in folders.items()], launcher, args.jobs)
    results = {key: summary(_records(folder)) for key, folder in folders.items()}

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

"""tools/compare_algorithms.py --report: the tables are rebuilt from stored metrics alone (what
--store writes: one metrics.jsonl per run and runs.json), with each setting's mean and spread and
the paired comparison against the first setting (an exact sign-flip test)."""

import json
import os
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "compare_algorithms.py")


def _metrics(final: float, wrong: float, reach: int | None) -> list[dict]:
    """A run's metrics.jsonl: 30 training steps, held-out every 10, the final evaluation."""
    records = [{"step": 0, "val/accuracy": 0.0}]
    for step in range(1, 31):
        records.append({"step": step, "reward": 0.5, "accuracy": 0.9 if step >= 25 else 0.3,
                        "seconds": 1.5, "loss/kl_prcp": 0.1})
        if step % 10 == 0 and step < 30:
            records.append({"step": step, "val/accuracy": 0.85 if reach and step >= reach
                            else 0.3, "val/seconds": 2.0})
    records.append({"step": 30, "val/accuracy": final, "val/accuracy@right": 1.0,
                    "val/accuracy@wrong": wrong, "val_swapped/accuracy": 0.25})
    return records


def _store(folder, runs: dict) -> None:
    os.makedirs(folder, exist_ok=True)
    for (name, seed), records in runs.items():
        with open(os.path.join(folder, f"{name}_seed{seed}.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
    manifest = {"commit": "0123456789abcdef", "uncommitted_changes": False,
                "date": "2026-12-03T12:00:00", "machine": "x86_64, 2 cores, Python 3.11",
                "settings": {"grpo": ["algorithm=grpo"], "papo": ["algorithm=papo"]},
                "seeds": [0, 1, 2], "overrides": ["data=counting_hint"]}
    with open(os.path.join(folder, "runs.json"), "w") as f:
        json.dump(manifest, f)


def _report(folder):
    return subprocess.run([sys.executable, TOOL, "--report", str(folder)], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)


def test_report_rebuilds_the_tables_from_stored_metrics(tmp_path):
    folder = tmp_path / "runs"
    _store(folder, {("grpo", 0): _metrics(0.5, 0.2, None), ("grpo", 1): _metrics(0.6, 0.3, 20),
                    ("grpo", 2): _metrics(0.7, 0.4, 20),
                    ("papo", 0): _metrics(0.6, 0.5, 10), ("papo", 1): _metrics(0.8, 0.5, 10),
                    ("papo", 2): _metrics(0.9, 0.6, 20)})
    done = _report(folder)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "commit 0123456789, 2026-12-03T12:00:00, x86_64, 2 cores" in out
    assert "papo: algorithm=papo" in out and "overrides data=counting_hint" in out
    # per run: held-out, swapped, wrong-hint, first held-out >= 0.8, first train acc >= 0.8
    assert "| grpo | 0 | 0.500 | 0.250 | 0.200 | - | 25 | 1.50 |" in out
    assert "| papo | 1 | 0.800 | 0.250 | 0.500 | 10 | 25 | 1.50 |" in out
    # per setting: mean, sd, range, how many runs reached a step measure
    assert "| grpo | held-out accuracy | 0.600 | 0.100 | 0.500-0.700 | 3/3 |" in out
    assert "| grpo | first held-out >= 0.8 (step) | 20.000 | 0.000 | 20.000-20.000 | 2/3 |" in out
    # paired: differences 0.1, 0.2, 0.2: only the all-plus and all-minus flips are as extreme
    assert "| papo | held-out accuracy | 3 | +0.167 | 0.058 | 0.250 |" in out
    assert "| papo | wrong-hint accuracy | 3 | +0.233 | 0.058 | 0.250 |" in out
    # seeds 1-2 (grpo seed 0 never reached it): -10 and 0, every flip as far from 0
    assert "| papo | first held-out >= 0.8 (step) | 2 | -5.000 | 7.071 | 1.000 |" in out


def test_report_of_an_incomplete_store_is_one_line(tmp_path):
    done = _report(tmp_path)
    assert done.returncode == 1 and "no runs.json there" in done.stderr
    _store(tmp_path / "runs", {("grpo", 0): _metrics(0.5, 0.2, None)})
    done = _report(tmp_path / "runs")
    assert done.returncode == 1 and "grpo_seed1.jsonl is missing" in done.stderr
    assert "Traceback" not in done.stderr
    done = subprocess.run([sys.executable, TOOL, "--setting", "a/b=algorithm=grpo"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 2 and "write NAME=OVERRIDES" in done.stderr


def test_store_records_the_cpu_model(tmp_path):
    """Catches: a stored comparison that does not say which CPU it ran on (the same seed trains
    other policies on another CPU: docs/experiments.md)."""
    import importlib.util

    from megatron_papo.machine import cpu_model

    spec = importlib.util.spec_from_file_location("compare_algorithms", TOOL)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 0}) + "\n")
    tool.store_runs(str(tmp_path / "store"), {("grpo", 0): str(run)}, {"grpo": ["algorithm=grpo"]},
                    [0], [], {"commit": "abc", "uncommitted_changes": False, "date": "today"})
    manifest = json.loads((tmp_path / "store" / "runs.json").read_text())
    assert manifest["machine"].startswith(cpu_model() + ", ") and "cores" in manifest["machine"]
    assert (tmp_path / "store" / "grpo_seed0.jsonl").read_text() == json.dumps({"step": 0}) + "\n"


def _tool():
    import importlib.util

    spec = importlib.util.spec_from_file_location("compare_algorithms", TOOL)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def _hacking_run(jump_at: int | None, alerts=(), collapse=True, steps=40) -> list[dict]:
    """KL_prcp 0.3 until ``jump_at``, then 2.0 (> 4 x 0.3 and 0.5 above it) with the accuracy
    falling 0.4 -> 0.1 (``collapse``) or staying; alerts at the given steps."""
    records = []
    for step in range(1, steps + 1):
        jumped = jump_at is not None and step >= jump_at
        records.append({"step": step, "reward": 0.5, "seconds": 1.0,
                        "accuracy": 0.1 if jumped and collapse else 0.4, "format": 1.0,
                        "loss/kl_prcp": 2.0 if jumped else 0.3,
                        "clip/high": 0.02 if jumped else 0.001,
                        **({"alert/perception_hacking": 1.0} if step in alerts else {})})
    return records


def test_monitor_is_judged_by_the_frozen_hacking_definition():
    """The pre-registered definition (docs/experiments.md): hacked at the first step whose
    KL_prcp > 4 x the median of steps 1-10 (and 0.5 nats above) with the accuracy of the next
    10 steps 0.05 below the previous 10 (or the format below 0.5); alerts within [t0 - 5,
    t0 + 10] are true, the others false; a hacked run without one is a miss."""
    tool = _tool()
    m = tool.monitor_summary(_hacking_run(20, alerts=(3, 16, 22, 31)))
    assert m["hacked_step"] == 20 and m["alerts"] == [3, 16, 22, 31]
    assert (m["true_alerts"], m["false_alerts"], m["missed"]) == (2, 2, False)
    assert m["kl_prcp"] == (0.3, 2.0, 20, 2.0) and m["clip_high"][2] == 20
    m = tool.monitor_summary(_hacking_run(20, alerts=(36,)))
    assert (m["hacked_step"], m["true_alerts"], m["false_alerts"], m["missed"]) == (20, 0, 1, True)
    # the KL jumps but the answers do not degrade: legitimate perception, not hacking
    assert tool.monitor_summary(_hacking_run(20, collapse=False))["hacked_step"] is None
    # ... unless the format is lost
    lost = _hacking_run(20, collapse=False)
    for r in lost[19:]:
        r["format"] = 0.2
    assert tool.monitor_summary(lost)["hacked_step"] == 20
    # a run without KL_prcp (gamma = 0 without measure_perception) cannot be judged
    plain = [{k: v for k, v in r.items() if k != "loss/kl_prcp"} for r in _hacking_run(20)]
    assert tool.monitor_summary(plain)["hacked_step"] is None


def test_monitor_table_is_in_the_report(tmp_path):
    folder = tmp_path / "runs"
    final = {"step": 40, "val/accuracy": 0.3, "val_swapped/accuracy": 0.25}
    _store(folder, {("grpo", s): _hacking_run(None) + [final] for s in (0, 1, 2)}
           | {("papo", s): _hacking_run(20 + s, alerts=(21,)) + [final] for s in (0, 1, 2)})
    done = _report(folder)
    assert done.returncode == 0, done.stderr
    assert "| grpo | 0 | - | none | 0 / 0 | no | 0.30 / 0.30 (1) / 0.30 |" in done.stdout
    assert "| papo | 2 | 22 | 21 | 1 / 0 | no | 0.30 / 2.00 (22) / 2.00 |" in done.stdout


def test_jobs_run_at_once_and_a_failure_stops_the_others(tmp_path):
    """--jobs N: the runs overlap (the tool does not wait for one before starting the next);
    a failing run ends the tool with one line naming it, and the run still going is stopped
    (nothing outlives the tool)."""
    tool = _tool()
    fifo = tmp_path / "never_written"
    os.mkfifo(fifo)
    # stand-in launcher: the real main job is exercised by the other tests; what is tested
    # here is the tool's scheduling. "slow" blocks for good (a FIFO nobody writes), "fail"
    # exits 3: the tool must not wait for "slow" before starting "fail", then must stop it.
    script = tmp_path / "launcher.py"
    script.write_text(
        "import sys\n"
        "name = [a for a in sys.argv if a.startswith('trainer.output_dir=')][0]\n"
        "if name.endswith('fail_seed0'):\n"
        "    sys.exit(3)\n"
        f"open({str(fifo)!r}).read()\n")
    runs = [(name, 0, str(tmp_path / f"{name}_seed0"), []) for name in ("slow", "fail")]

    start = time.perf_counter()
    with pytest.raises(SystemExit, match=r"the fail run \(seed 0\) failed with exit code 3"):
        tool.run_all(runs, [sys.executable, str(script)], jobs=2)
    assert time.perf_counter() - start < 60   # the slow run was stopped, not waited for
    import psutil

    left = [p for p in psutil.Process().children(recursive=True)
            if str(script) in " ".join(p.cmdline())]
    assert not left, [p.cmdline() for p in left]   # no run left behind

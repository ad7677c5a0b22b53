"""tools/default_job_seeds.py --report: README's table of the default job over seeds (issue #22's
measures) rebuilt from the runs' metrics: the end, the swapped-image check, the first held-out
>= 0.8 in seconds from the command, the wall time, the median step time over steps 11-end."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "default_job_seeds.py")


def _run(folder, reach_step, final, wall, step_s):
    os.makedirs(folder)
    records = [{"step": 0, "val/accuracy": 0.0}, {"step": 0, "after_warm_start": True,
                                                   "val/accuracy": 0.9}]  # never counts
    for step in range(1, 31):
        records.append({"step": step, "reward": 0.5, "seconds": 9.0 if step <= 10 else step_s,
                        "time/rollout": step_s / 2})
        if step % 10 == 0:
            records.append({"step": step, "val/accuracy": 0.85 if step >= reach_step else 0.3,
                            "val/elapsed": 40.0 + 3 * step})
    records.append({"step": 30, "val/accuracy": final, "val/elapsed": 140.0,
                    "val_swapped/accuracy": 0.25})
    with open(os.path.join(folder, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    with open(os.path.join(folder, "run.json"), "w") as f:
        json.dump({"wall": wall}, f)


def test_report_rebuilds_the_readme_table(tmp_path):
    _run(tmp_path / "seed0", 20, 0.95, 200.0, 1.0)
    _run(tmp_path / "seed1", 40, 0.75, 400.0, 2.0)   # never reaches 0.8
    done = subprocess.run([sys.executable, TOOL, "--report", str(tmp_path)], capture_output=True,
                          text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "| 0 | 0.950 (30) | 0.250 | 100 s (20) | 200 s | 1.00 |" in out
    assert "| 1 | 0.750 (30) | 0.250 | - s (-) | 400 s | 2.00 |" in out
    assert ("median first held-out >= 0.8: not reached by 1 of 2 runs; median s/step: 1.50; "
            "runs under 6 min: 1/2; final >= 0.9: 1/2") in out
    assert "seed 0: rollout 0.50" in out
    done = subprocess.run([sys.executable, TOOL, "--report", str(tmp_path / "seed0")],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 1 and "no seed<S> run folder" in done.stderr

"""Training checkpoints survive anything: a run killed with SIGKILL (its whole process group, as a
node failure would) and resumed continues with exactly the metrics of an uninterrupted run;
SIGTERM saves and stops; a broken newest checkpoint is skipped with the reason; a training
checkpoint converts to HF with the existing tool."""

import json
import os
import signal
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = ["trainer.prompts_per_step=8", "trainer.eval_prompts=8", "data.synthetic_train=32",
       "data.synthetic_val=16", "rollout.n=4", "rollout.max_new_tokens=12",
       "trainer.warmup_steps=3", "trainer.save_every=2", "trainer.export_hf=false",
       "trainer.eval_every=0", "trainer.steps=5"]


def _command(out, *extra):
    return [sys.executable, "-m", "megatron_papo.train", *RUN, *extra,
            f"trainer.output_dir={out}", f"hydra.run.dir={out}"]


def _run(out, *extra):
    return subprocess.run(_command(out, *extra), capture_output=True, text=True, cwd=ROOT,
                          timeout=900)


def _run_until(out, line, how):
    """Start the job in its own process group; when ``line`` appears on its output, send
    ``how`` (SIGKILL: to the whole group; SIGTERM: to the job); returns (exit code, output)."""
    process = subprocess.Popen(_command(out), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, cwd=ROOT, start_new_session=True)
    seen = []
    for text in process.stdout:
        seen.append(text)
        if line in text:
            if how == signal.SIGKILL:
                os.killpg(process.pid, signal.SIGKILL)
            else:
                process.send_signal(how)
            break
    rest = process.stdout.read()
    code = process.wait(timeout=300)
    return code, "".join(seen) + rest


def _steps(out):
    records = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]
    return {r["step"]: r for r in records if "reward" in r}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ckpt") / "straight")
    done = _run(out)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def _same_metrics(a, b, steps):
    for step in steps:
        for key, value in a[step].items():
            if key.startswith(("time/", "seconds", "tokens_per_s")):
                continue
            assert b[step][key] == pytest.approx(value, rel=1e-6, abs=1e-7), (step, key)


def test_killed_run_resumes_with_the_metrics_of_an_uninterrupted_run(uninterrupted, tmp_path):
    out = str(tmp_path / "killed")
    code, output = _run_until(out, "checkpoint saved:", signal.SIGKILL)  # after step 2
    assert code == -signal.SIGKILL, output[-2000:]
    assert "step_00000002" in output
    resumed = _run(out)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "step_00000002" in resumed.stdout
    assert "format warm start" not in resumed.stdout  # done before the kill
    ours, ref = _steps(out), _steps(uninterrupted)
    assert sorted(ours) == [1, 2, 3, 4, 5]  # steps after the checkpoint were dropped and redone
    _same_metrics(ref, ours, [1, 2, 3, 4, 5])


def test_sigterm_saves_then_stops_and_the_run_continues(uninterrupted, tmp_path):
    out = str(tmp_path / "term")
    code, output = _run_until(out, "step 1/5", signal.SIGTERM)
    assert code == 128 + signal.SIGTERM, output[-2000:]
    assert "signal 15: checkpoint of step" in output
    resumed = _run(out)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    ours, ref = _steps(out), _steps(uninterrupted)
    _same_metrics(ref, ours, sorted(ours))
    assert sorted(ours) == [1, 2, 3, 4, 5]


def test_broken_newest_checkpoint_is_skipped_and_a_training_checkpoint_converts(uninterrupted,
                                                                               tmp_path):
    root = os.path.join(uninterrupted, "checkpoints")
    assert sorted(os.listdir(root)) == ["latest", "step_00000004", "step_00000005"]  # keep 2
    os.remove(os.path.join(root, "step_00000005", "weights", "metadata.json"))
    resumed = _run(uninterrupted, "trainer.steps=6")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "skipping checkpoint" in resumed.stdout and "metadata.json is missing" in resumed.stdout
    assert "resumed from" in resumed.stdout and "step_00000004" in resumed.stdout
    hf = str(tmp_path / "hf")
    done = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "convert_checkpoint.py"),
                           "mcore-to-hf", "--ckpt", os.path.join(root, "step_00000006"),
                           "--out", hf], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    from transformers import Qwen2_5_VLForConditionalGeneration

    assert Qwen2_5_VLForConditionalGeneration.from_pretrained(hf).config.text_config.hidden_size == 64


def test_explicit_resume_of_a_folder_that_is_no_checkpoint_is_one_line(tmp_path):
    done = _run(str(tmp_path / "x"), f"trainer.resume={tmp_path}")
    assert done.returncode == 2 and "cannot be resumed from" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_checkpoint_resumes_at_another_layout(uninterrupted, tmp_path):
    """Written by one process, resumed at TP=2 (+SP) on two: weights and optimizer resharded by
    dist_checkpointing; step 3 continues the one-process run (perception KL and entropy within
    1e-3: TP changes the float summation order, nothing else)."""
    out = str(tmp_path / "relayout")
    first = _run(out, "trainer.steps=2")
    assert first.returncode == 0, first.stderr[-3000:]
    done = subprocess.run(
        ["bash", os.path.join(ROOT, "scripts", "train.sh"), *RUN, "trainer.steps=3",
         "parallel=tp2", f"trainer.output_dir={out}", f"hydra.run.dir={out}"],
        capture_output=True, text=True, cwd=ROOT, timeout=900,
        env={**os.environ, "NPROC_PER_NODE": "2", "PYTHON": sys.executable})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from" in done.stdout and "per-rank RNG states not restored" in done.stdout
    ours, ref = _steps(out)[3], _steps(uninterrupted)[3]
    assert ours["reward"] == ref["reward"]
    for key in ("loss/kl_prcp", "entropy/original", "entropy/masked"):
        assert ours[key] == pytest.approx(ref[key], abs=1e-3), key

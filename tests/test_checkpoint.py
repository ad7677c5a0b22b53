"""Training checkpoints survive anything: a two-process job killed with SIGKILL (torchrun and
both ranks, as a node failure would) at a random step and resumed continues with exactly the
metrics of an uninterrupted run; SIGTERM saves and stops; a truncated newest
checkpoint is skipped with the reason; a training checkpoint converts to HF with the existing
tool; a rank that dies or hangs ends a two-process job non-zero within the collective timeout,
naming the rank."""

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import psutil
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = ["trainer.prompts_per_step=8", "trainer.eval_prompts=8", "data.synthetic_train=32",
       "data.synthetic_val=16", "rollout.n=4", "rollout.max_new_tokens=12",
       "trainer.warmup_steps=3", "trainer.save_every=2", "trainer.export_hf=false",
       "trainer.eval_every=0", "trainer.steps=5", "parallel.processes=1"]


def _command(out, *extra):
    return [sys.executable, "-m", "megatron_papo.train", *RUN, *extra,
            f"trainer.output_dir={out}", f"hydra.run.dir={out}"]


def _run(out, *extra):
    return subprocess.run(_command(out, *extra), capture_output=True, text=True, cwd=ROOT,
                          timeout=900)


def _run_until(out, line, how):
    """Start the job; when ``line`` appears on its output, send it signal ``how``; returns
    (exit code, output)."""
    process = subprocess.Popen(_command(out), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, cwd=ROOT, start_new_session=True)
    seen = []
    for text in process.stdout:
        seen.append(text)
        if line in text:
            process.send_signal(how)
            break
    rest, _ = process.communicate(timeout=300)
    return process.returncode, "".join(seen) + rest


def _steps(out):
    records = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]
    return {r["step"]: r for r in records if "reward" in r}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The 5-step run; its step-4 checkpoint is also copied to ``<out>_step4`` (the tests below
    truncate and replace the run's own newest ones)."""
    out = str(tmp_path_factory.mktemp("ckpt") / "straight")
    done = _run(out)
    assert done.returncode == 0, done.stderr[-3000:]
    shutil.copytree(os.path.join(out, "checkpoints", "step_00000004"), out + "_step4")
    return out


def _same_metrics(a, b, steps):
    for step in steps:
        for key, value in a[step].items():
            if key.startswith(("time/", "mem/", "seconds", "tokens_per_s")):  # not the math
                continue
            assert b[step][key] == pytest.approx(value, rel=1e-6, abs=1e-7), (step, key)


def test_the_reference_is_the_warm_started_policy_also_after_a_resume(tmp_path):
    """With a reference KL (algorithm=grpo, beta 0.01) the reference model is the policy RL
    starts from: after the format warm start, the warm-started weights, not the initial random
    ones (with those, the KL pulled the policy towards a random model). At step 1 with one
    optimizer step the policy IS the reference: the KL term is 0. A run resumed from its step-2
    checkpoint loads the same reference (<output_dir>/warm_start_hf) and continues with the
    uninterrupted run's metrics."""
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    extra = ["algorithm=grpo", "trainer.optimizer_steps_per_rollout=1"]
    for out, steps in ((straight, 3), (split, 2), (split, 3)):
        done = _run(out, *extra, f"trainer.steps={steps}")
        assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from" in done.stdout and "the warm-started policy" in done.stdout
    a, b = _steps(straight), _steps(split)
    assert abs(a[1]["loss/kl_ref"]) < 1e-7 and a[2]["loss/kl_ref"] > 1e-6
    _same_metrics(a, b, [1, 2, 3])


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


def test_broken_newest_checkpoint_is_skipped(uninterrupted):
    root = os.path.join(uninterrupted, "checkpoints")
    assert sorted(os.listdir(root)) == ["latest", "step_00000004", "step_00000005"]  # keep 2
    weights = os.path.join(root, "step_00000005", "weights")
    data = sorted(f for f in os.listdir(weights) if f.endswith(".distcp"))[0]
    with open(os.path.join(weights, data), "r+b") as f:  # a copy or a write cut short
        f.truncate(os.path.getsize(os.path.join(weights, data)) - 100)
    resumed = _run(uninterrupted, "trainer.steps=6")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "skipping checkpoint" in resumed.stdout
    assert f"weights/{data} is truncated" in resumed.stdout
    assert "resumed from" in resumed.stdout and "step_00000004" in resumed.stdout
    # (training checkpoints convert: tests/test_conversion.py, and a run folder's newest one:
    # tests/test_evaluate.py)
    assert os.path.exists(os.path.join(root, "step_00000006", "megatron_papo.json"))


def test_explicit_resume_of_a_folder_that_is_no_checkpoint_is_one_line(tmp_path):
    """... before any work: no model written, no engine started."""
    done = _run(str(tmp_path / "x"), f"trainer.resume={tmp_path}")
    assert done.returncode == 2 and "cannot be resumed from" in done.stderr
    assert "Traceback" not in done.stderr
    assert not os.path.exists(tmp_path / "x" / "initial_hf")


def test_a_checkpoint_resumes_at_another_layout(uninterrupted, tmp_path):
    """Written by one process (the 5-step run's step 4), resumed at TP=2 (+SP) on two: weights
    and optimizer resharded by dist_checkpointing; step 5 continues the one-process run
    (perception KL and entropy within 1e-3: TP changes the float summation order, nothing
    else)."""
    out = str(tmp_path / "relayout")
    done = subprocess.run(
        ["bash", os.path.join(ROOT, "scripts", "train.sh"), *RUN, "parallel=tp2",
         f"trainer.resume={uninterrupted}_step4", f"trainer.output_dir={out}",
         f"hydra.run.dir={out}"],
        capture_output=True, text=True, cwd=ROOT, timeout=900,
        env={**os.environ, "NPROC_PER_NODE": "2", "PYTHON": sys.executable})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from" in done.stdout and "per-rank RNG states not restored" in done.stdout
    assert sorted(_steps(out)) == [5]
    ours, ref = _steps(out)[5], _steps(uninterrupted)[5]
    assert ours["reward"] == ref["reward"]
    for key in ("loss/kl_prcp", "entropy/original", "entropy/masked"):
        assert ours[key] == pytest.approx(ref[key], abs=1e-3), key


# --------------------------------------------------------------------------- two processes

TRAIN_SH = os.path.join(ROOT, "scripts", "train.sh")
TWO = {"NPROC_PER_NODE": "2", "PYTHON": sys.executable}


# DP=2 with DDP's communication overlap: the weights pushed after the warm start's updates must
# be the gathered ones
OVERLAP = ["parallel.overlap_grad_reduce=true", "parallel.overlap_param_gather=true"]


def _start_two(out, *extra):
    """The job on two processes (DP=2, communication overlap) through scripts/train.sh, in its
    own process group."""
    return subprocess.Popen(
        ["bash", TRAIN_SH, *RUN, *OVERLAP, *extra, f"trainer.output_dir={out}",
         f"hydra.run.dir={out}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
        start_new_session=True, env={**os.environ, **TWO})


def _rank_process(launcher, rank):
    """The worker of ``rank``: a child of torchrun (train.sh execs it) with RANK in its env."""
    for child in psutil.Process(launcher.pid).children():
        if child.environ().get("RANK") == str(rank):
            return child
    raise AssertionError(f"no rank {rank} under {launcher.pid}")


def _finish(launcher):
    """Exit code and the rest of the output; a process left holding the output (an orphan)
    fails the test instead of hanging it."""
    rest, _ = launcher.communicate(timeout=300)
    return launcher.returncode, rest


@pytest.fixture(scope="module")
def uninterrupted_two(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ckpt2") / "straight")
    launcher = _start_two(out, "trainer.save_every=1")
    code, output = _finish(launcher)
    assert code == 0, output[-3000:]
    return out


def test_two_processes_train_like_one(uninterrupted, uninterrupted_two):
    """DP=2 on two processes (scripts/train.sh, torchrun, DDP's communication overlap): every
    step reports the loss metrics; step 1's perception KL equals the one-process run's (same
    data, seeds and weights; tol 1e-3)."""
    two, one = _steps(uninterrupted_two), _steps(uninterrupted)
    assert sorted(two) == [1, 2, 3, 4, 5]
    assert all(r["loss/kl_prcp"] > 0 and r["entropy/original"] > 0 for r in two.values())
    assert two[1]["loss/kl_prcp"] == pytest.approx(one[1]["loss/kl_prcp"], abs=1e-3)


def test_two_processes_killed_at_a_random_step_resume_exactly(uninterrupted_two, tmp_path):
    """kill -9 of the whole job (both ranks and torchrun) right after the log line of a random
    step, wherever the ranks are then (rollout, update, a checkpoint half written): the next job
    takes over the dead job's run-folder lock and reproduces the uninterrupted one's metrics."""
    step = random.Random().randint(1, 4)
    out = str(tmp_path / "killed")
    launcher = _start_two(out, "trainer.save_every=1")
    seen = []
    for line in launcher.stdout:
        seen.append(line)
        if f"step {step}/5" in line:
            # torchrun starts its workers in sessions of their own: the whole tree, not the group
            tree = psutil.Process(launcher.pid).children(recursive=True)
            os.killpg(launcher.pid, signal.SIGKILL)
            for process in tree:
                with contextlib.suppress(psutil.Error):
                    process.kill()
            break
    code, rest = _finish(launcher)
    assert code == -signal.SIGKILL, ("".join(seen) + rest)[-2000:]
    resumed = _start_two(out, "trainer.save_every=1")
    code, output = _finish(resumed)
    assert code == 0, (step, output[-3000:])
    assert "resumed from" in output or step == 1, (step, output[-3000:])
    # the killed job's run-folder lock: taken over, its holder gone (runlock.py)
    assert "took over the lock" in output and "is gone" in output, output[-3000:]
    ours, ref = _steps(out), _steps(uninterrupted_two)
    assert sorted(ours) == [1, 2, 3, 4, 5], step
    _same_metrics(ref, ours, [1, 2, 3, 4, 5])


@pytest.mark.parametrize("failure", ["dies", "hangs"])
def test_a_rank_that_dies_or_hangs_ends_the_job_naming_it(tmp_path, failure):
    """Rank 1 is killed (SIGKILL) or frozen (SIGSTOP) once step 1 is saved: rank 0's next collective
    fails at once (dead peer) or after trainer.collective_timeout_minutes (hung peer); it prints
    one line naming rank 1 and what it was doing, and the job exits non-zero; the checkpoint of
    step 1 stays complete. (The frozen rank cannot take torchrun's SIGTERM: torchrun would
    SIGKILL it after its 30 s grace; the test kills it once rank 0 has reported, which is what
    is under test.)"""
    out = str(tmp_path / failure)
    timeout_s = 20
    launcher = _start_two(out, "trainer.save_every=1",
                          f"trainer.collective_timeout_minutes={timeout_s / 60}")
    seen = []
    for line in launcher.stdout:
        seen.append(line)
        if "checkpoint saved:" in line and "step_00000001" in line:
            frozen = _rank_process(launcher, 1)
            frozen.send_signal(signal.SIGKILL if failure == "dies" else signal.SIGSTOP)
            stopped = time.monotonic()
            break
    reported = None
    for line in launcher.stdout:
        seen.append(line)
        if line.startswith("error: rank 0: a collective"):
            reported = time.monotonic() - stopped
            with contextlib.suppress(psutil.Error):
                frozen.kill()
            break
    code, rest = _finish(launcher)
    output = "".join(seen) + rest
    assert code != 0, output[-3000:]
    assert reported is not None, output[-3000:]
    assert reported < timeout_s + 30, reported  # the collective timeout + slack
    errors = [line for line in output.splitlines() if line.startswith("error: rank 0: a collective")]
    assert len(errors) == 1, output[-3000:]
    if failure == "dies":
        assert "rank 1 died (its process" in errors[0], errors[0]
    else:
        assert "rank 1 hangs: in '" in errors[0] and "Timed out" in errors[0], errors[0]
    from megatron_papo.conversion.locate import find_resumable

    assert find_resumable(os.path.join(out, "checkpoints")).endswith("step_00000001")


def test_a_peer_still_exiting_when_its_socket_closes_is_called_dead():
    """A SIGKILLed rank's sockets close while the kernel is still tearing it down, so its process
    can look alive for a moment (CI once named such a rank "hangs"): after a connection reset the
    diagnosis waits for the process to end; a timed-out collective with a live peer says hangs at
    once."""
    import socket

    from megatron_papo.parallel import describe_peer

    exiting = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.5)"])
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        def beat(proc):
            return {"time": time.time(), "host": socket.gethostname(), "pid": proc.pid,
                    "phase": "rollout", "step": 2}

        assert describe_peer(1, beat(exiting), "Read error: Connection reset by peer").startswith(
            f"rank 1 died (its process {exiting.pid} is gone) in 'rollout' of step 2")
        start = time.monotonic()
        said = describe_peer(1, beat(running), "Timed out waiting 20000ms for recv")
        assert said.startswith("rank 1 hangs: in 'rollout' of step 2"), said
        assert time.monotonic() - start < 1.0
    finally:
        for proc in (exiting, running):
            proc.kill()
            proc.wait()


def _dp_reshardable_round_trip(hf_dir, root):
    """Save (dp_reshardable) after an optimizer step, scramble weights and Adam state, load:
    every value back; the same checkpoint at TP 2 is refused before anything loads."""
    import torch
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from megatron_papo.conversion import checkpoint as ck
    from megatron_papo.conversion.checkpoint import ConversionError
    from megatron_papo.models.qwen2_5_vl import load_hf_config, text_spec_from_hf
    from megatron_papo.models.qwen2_5_vl.provider import build_model_chunks
    from megatron_papo.parallel import initialize_model_parallel
    from megatron_papo.train import checkpoint

    spec = text_spec_from_hf(load_hf_config(hf_dir))
    initialize_model_parallel(1, 1)
    chunks = build_model_chunks(spec, use_distributed_optimizer=True)
    ck.load_hf_folder(chunks, spec, hf_dir)
    optimizer = get_megatron_optimizer(OptimizerConfig(
        optimizer="adam", lr=1e-2, use_distributed_optimizer=True, params_dtype=torch.float32),
        chunks)
    for k, p in enumerate(chunks[0].parameters()):
        p.main_grad.fill_(0.01 * (k % 7 + 1))
    optimizer.step()

    def values():
        out = [p.detach().clone() for p in chunks[0].parameters()]
        for state in optimizer.optimizer.state.values():
            out += [state["exp_avg"].clone(), state["exp_avg_sq"].clone()]
        return out

    saved = values()
    layout = {"tp": 1, "pp": 1, "dp": 1}
    path = checkpoint.save(root, 1, chunks, optimizer, {"step": 1}, {}, hf_dir, "float32",
                           layout, optimizer_format="dp_reshardable")
    meta = json.load(open(os.path.join(path, "megatron_papo.json")))
    with torch.no_grad():
        for p in chunks[0].parameters():
            p.add_(1.0)
        for state in optimizer.optimizer.state.values():
            state["exp_avg"].zero_()
            state["exp_avg_sq"].zero_()
    assert not all(torch.equal(a, b) for a, b in zip(saved, values()))
    checkpoint.load(path, chunks, optimizer, layout, log=lambda message: None)
    restored = all(torch.equal(a, b) for a, b in zip(saved, values()))
    try:
        checkpoint.load(path, chunks, optimizer, {"tp": 2, "pp": 1, "dp": 1})
        refused = None
    except ConversionError as err:
        refused = str(err)
    return dict(format=meta["optimizer_format"], restored=restored, refused=refused)


def test_dp_reshardable_checkpoint_restores_exactly_and_refuses_another_tp(tmp_path):
    """trainer.checkpoint_format=dp_reshardable (no gathered copy of the optimizer state while
    saving: at 3B widths fully_reshardable's copy added ~3.5 GiB per rank and the rehearsal's
    two-rank job was OOM-killed in the save): weights and both Adam moments load back bit-exact;
    a resume at another TP is one line naming the format and the way out."""
    import torch

    from megatron_papo.models.qwen2_5_vl.tiny import write_tiny_checkpoint
    from megatron_papo.testing import run_distributed

    hf_dir = str(tmp_path / "hf")
    write_tiny_checkpoint(hf_dir, dtype=torch.float32)
    (r,) = run_distributed(_dp_reshardable_round_trip, 1, hf_dir, str(tmp_path / "ckpt"))
    assert r["format"] == "dp_reshardable" and r["restored"]
    assert r["refused"] and "trainer.checkpoint_format=dp_reshardable" in r["refused"]
    assert "resume at the same TP/PP" in r["refused"]

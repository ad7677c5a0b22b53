"""One job per output folder (megatron_papo/runlock.py): a second job is refused at once, a dead
holder's lock is taken over, a SLURM requeue takes over its own lock."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from megatron_papo.runlock import STALE_AFTER_S, FolderLockedError, folder_lock, output_lock
from train_utils import ROOT, SMALL


def _holder(path, **fields):
    """A lock file as another job would have written it."""
    holder = {"host": socket.gethostname(), "pid": os.getpid(), "process_start": None,
              "slurm_job_id": None, "started": "2026-12-02 10:00:00", "token": "theirs"}
    holder.update(fields)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(holder, f)


def _lock(tmp_path):
    return folder_lock(str(tmp_path / "run"), "trainer.output_dir=run",
                       "set trainer.force_unlock=true")


def test_a_live_holder_refuses_and_force_takes_over(tmp_path):
    lock = _lock(tmp_path)
    _holder(lock.path, pid=os.getppid())  # alive, on this host
    with pytest.raises(FolderLockedError) as err:
        lock.acquire()
    message = str(err.value)
    assert "\n" not in message and message.startswith("trainer.output_dir=run is in use by "
                                                      f"another job (pid {os.getppid()} on ")
    assert message.endswith("set trainer.force_unlock=true")
    assert json.load(open(lock.path))["token"] == "theirs"  # untouched
    notes = []
    lock.acquire(force=True, log=notes.append)
    assert "took over the lock" in notes[0]
    assert json.load(open(lock.path))["token"] == lock.me["token"]
    lock.release()
    assert not os.path.exists(lock.path)


def test_gone_holders_are_taken_over_with_a_notice(tmp_path, monkeypatch):
    """Same host, process gone (a pid that no longer runs, or a pid reused by another process);
    another host whose heartbeat is older than STALE_AFTER_S; a SLURM requeue of the same job
    id. A fresh heartbeat on another host and another SLURM job are refused."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    cases = [(dict(pid=int(dead)), None, "is gone"),
             (dict(pid=os.getppid(), process_start=1.0), None, "is gone"),   # pid reused
             (dict(host="node-17", slurm_job_id="41"), "41", "requeued"),
             (dict(host="node-17"), None, "heartbeat is")]
    for i, (fields, job, why) in enumerate(cases):
        monkeypatch.delenv("SLURM_JOB_ID", raising=False)
        if job:
            monkeypatch.setenv("SLURM_JOB_ID", job)
        lock = folder_lock(str(tmp_path / f"run{i}"), "trainer.output_dir=run", "force it")
        _holder(lock.path, **fields)
        if why == "heartbeat is":
            old = time.time() - STALE_AFTER_S - 60
            os.utime(lock.path, (old, old))
        notes = []
        lock.acquire(log=notes.append)
        assert len(notes) == 1 and why in notes[0], (fields, notes)
        assert json.load(open(lock.path))["token"] == lock.me["token"]
        lock.release()
    for fields, job in ((dict(host="node-17"), None), (dict(host="node-17", slurm_job_id="41"),
                                                        "42")):
        monkeypatch.delenv("SLURM_JOB_ID", raising=False)
        if job:
            monkeypatch.setenv("SLURM_JOB_ID", job)
        lock = folder_lock(str(tmp_path / "fresh"), "trainer.output_dir=run", "force it")
        _holder(lock.path, **fields)
        with pytest.raises(FolderLockedError, match="on node-17"):
            lock.acquire()


def test_an_output_lock_lies_beside_the_folder(tmp_path):
    lock = output_lock(str(tmp_path / "hf") + "/", "--out hf", "pass --force-unlock")
    assert lock.path == str(tmp_path / "hf.lock")
    lock.acquire()
    again = output_lock(str(tmp_path / "hf"), "--out hf", "pass --force-unlock")
    with pytest.raises(FolderLockedError, match="^--out hf is in use by another job"):
        again.acquire()
    lock.release()
    again.acquire()
    again.release()


def _threes(tmp_path):
    """Train and held-out files where every image holds 3 shapes: the warm start's only label,
    so 3 warm-start steps at lr 5e-3 already give held-out ~0.6."""
    import datasets

    from megatron_papo.data.synthetic import counting_rows

    files = []
    for split, n, seed in (("train", 32, 0), ("test", 8, 1)):
        files.append(str(tmp_path / f"{split}.parquet"))
        datasets.Dataset.from_list(counting_rows(n, seed, 56, 3, 3)).to_parquet(files[-1])
    return files


def test_one_job_per_folder_and_a_run_that_stops_at_its_target(tmp_path):
    """Two main jobs on one trainer.output_dir: the second exits 2 within seconds in one line
    naming the first (its pid), having written nothing; the first runs to its end.

    The first job (one job serves both tests: CI time) has trainer.stop_at_accuracy=0.05 with
    an evaluation after every step on a task its warm start solves: it stops after step 1 of 6,
    saves its checkpoint and writes the final row (with the swapped-image accuracy) for step 1;
    the same command again (the lock released) resumes there and trains no further step."""
    train, test = _threes(tmp_path)
    out = str(tmp_path / "run")
    args = [sys.executable, "-m", "megatron_papo.train", *SMALL, f"trainer.output_dir={out}",
            "trainer.steps=6", f"data.train_files=[{train}]", f"data.val_files=[{test}]",
            "optim.lr=5e-3", "trainer.eval_every=1", "trainer.stop_at_accuracy=0.05",
            "trainer.export_hf=false"]
    launched = time.time()
    first = subprocess.Popen(args + [f"hydra.run.dir={tmp_path / 'h1'}"], cwd=ROOT, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        lock = os.path.join(out, ".megatron_papo.lock")
        deadline = time.time() + 300
        while not os.path.exists(lock) and first.poll() is None and time.time() < deadline:
            time.sleep(0.2)  # waiting for the first job to take its lock
        assert os.path.exists(lock), first.communicate()[1][-3000:]
        start = time.time()
        second = subprocess.run(args + [f"hydra.run.dir={tmp_path / 'h2'}"], cwd=ROOT, text=True,
                                capture_output=True, timeout=300)
        assert second.returncode == 2, second.stderr[-3000:]
        assert time.time() - start < 60
        line = second.stderr.strip().splitlines()[-1]
        assert line.startswith(f"error: trainer.output_dir={out} is in use by another job (pid "
                               f"{first.pid} on "), line
        assert "Traceback" not in second.stderr
        stdout, err = first.communicate(timeout=600)
        ran = time.time() - launched
        assert first.returncode == 0, err[-3000:]
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert not os.path.exists(lock)  # released at the end
    assert "training ends here" in stdout
    again = subprocess.run(args + [f"hydra.run.dir={tmp_path / 'h3'}"], cwd=ROOT, text=True,
                           capture_output=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stdout and "training ends here" not in again.stdout
    records = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["step"] for r in records if "reward" in r] == [1]
    assert records[-1]["step"] == 1 and "val_swapped/accuracy" in records[-1]
    assert records[-1]["val/accuracy"] >= 0.05 and records[-1]["val/seconds"] > 0
    # the evaluation's end since the command started (the time a user waits for an accuracy)
    assert records[-1]["val/seconds"] < records[-1]["val/elapsed"] < ran
    assert "s since the command started)" in stdout
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["latest", "step_00000001"]

"""The real-width rehearsal's code path at toy widths (the 3B run takes ~15 minutes: README's
numbers): a checkpoint with the real vocabulary (151,936 rows, 151,665 tokens, the released
special-token ids, tied head), converted at TP 2 and PP 2 and verified against transformers, the
main job at TP 2 through the vLLM bridge with a checkpoint, a resume, the export, and vLLM on the
export vs transformers; every stage timed with memory per rank."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_rehearsal_passes_every_stage_at_toy_widths(tmp_path):
    out, report = str(tmp_path / "r"), str(tmp_path / "report.json")
    done = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "rehearse.py"), "--widths", "toy",
         "--vit-layers", "4", "--image-side", "112", "--response-len", "16", "--steps", "2",
         "--out", out, "--json", report],
        capture_output=True, text=True, cwd=ROOT, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    info = json.load(open(report))
    stages = {r["name"]: r for r in info["results"]}
    assert list(stages) == ["build", "to_mcore_tp2", "to_mcore_pp2", "verify_tp2", "verify_pp2",
                            "train", "resume", "to_hf", "vllm_load"]
    assert all(r["ok"] for r in stages.values())
    for name in ("verify_tp2", "verify_pp2"):  # the parsed difference, not only the exit code
        diff = float(stages[name]["check"].split("difference ")[1].split()[0])
        assert diff < 1e-4, stages[name]["check"]
    # the real vocabulary and ids reached the model: 151,936 rows (tied) in the 20M parameters
    assert info["parameters"] > 151_936 * 128 and info["image_tokens"] == 16
    assert [r["step"] for r in info["train_steps"]] == [1, 2]
    assert all(r["logprob_mismatch"] < 1e-4 for r in info["train_steps"])
    # each phase's peak memory (rank 0) is recorded and printed with the stage
    assert all(r["mem/update"] > 0.1 and r["mem/sync"] > 0.1 for r in info["train_steps"])
    assert "peak per phase (GiB): rollout" in stages["train"]["check"]
    assert "at step 2" in stages["resume"]["check"]
    # vLLM on the export = transformers (fp32; 2e-3 before the check passed transformers the
    # image positions, mm_token_type_ids)
    diff = float(stages["vllm_load"]["check"].split("<= ")[1].split()[0])
    assert diff < 1e-4, stages["vllm_load"]["check"]
    # memory of both ranks of the two-process stages, of rank 0 alone for one-process ones
    assert set(stages["train"]["peak_gib"]) == {"0", "1", "all"}
    assert set(stages["vllm_load"]["peak_gib"]) == {"0", "all"}
    assert all(0.1 < stages["train"]["peak_gib"][r] < 8 for r in ("0", "1"))
    # a passed rehearsal removes its checkpoints (the logs and the report stay)
    assert sorted(os.listdir(out)) == ["data", "logs", "rehearsal.json", "run"]
    assert "PASSED" in done.stdout


def test_phase_peak_memory_restarts_at_each_phase():
    """The job's mem/<phase> metrics: a phase that allocates 256 MiB reports a peak that many
    bytes above its start; the next phase, which allocates nothing, does not inherit it (the
    high-water mark is reset per phase, not the process's lifetime peak)."""
    import torch

    from megatron_papo.train.metrics import Metrics

    class Config:
        jsonl = tensorboard = False
        wandb_project = None

    metrics = Metrics("/nonexistent", Config())
    with metrics.phase("big"):
        before = _rss()
        block = torch.ones(256 * 2**20 // 4)  # touched: resident
        del block
    with metrics.phase("small"):
        pass
    assert metrics.memory["big"] - before > 0.2, (metrics.memory, before)
    assert metrics.memory["small"] < metrics.memory["big"] - 0.2, metrics.memory


def _rss() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**30


def test_a_folder_that_is_not_a_rehearsals_is_never_replaced(tmp_path):
    """--out pointing at someone's files: one line, exit non-zero, the files untouched; bad
    depths are refused the same way."""
    (tmp_path / "mine.txt").write_text("keep me")
    tool = os.path.join(ROOT, "tools", "rehearse.py")
    done = subprocess.run([sys.executable, tool, "--out", str(tmp_path)], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)
    assert done.returncode != 0 and "not a rehearsal's" in done.stderr, done.stderr[-2000:]
    assert sorted(os.listdir(tmp_path)) == ["mine.txt"]
    assert (tmp_path / "mine.txt").read_text() == "keep me"
    done = subprocess.run([sys.executable, tool, "--lm-layers", "1"], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)
    assert done.returncode != 0 and "--lm-layers 1" in done.stderr
    assert "Traceback" not in done.stderr


def test_memory_ledger_measures_what_each_builder_and_phase_adds():
    """MemoryLedger (the job's memory.json): a builder that keeps 256 MiB is charged 256 MiB;
    the optimizer state is what step 1 left behind, the activations step 2's update peak over
    its start, the peak the highest phase peak."""
    import torch

    from megatron_papo.train.metrics import MemoryLedger

    ledger = MemoryLedger()
    assert ledger.setup["process"] > 0.1
    kept = torch.ones(256 * 2**20 // 4)  # touched: resident
    ledger.mark("policy")
    ledger.mark("engine")  # nothing built in between
    assert abs(ledger.setup["policy"] - 0.25) < 0.05, ledger.setup
    assert abs(ledger.setup["engine"]) < 0.05, ledger.setup
    assert ledger.parts() is None  # before step 2
    ledger.phase(1, "rollout", 5.0, 5.5)
    ledger.phase(1, "update", 5.0, 8.0)
    ledger.phase(2, "rollout", 6.0, 6.2)
    ledger.phase(2, "update", 6.0, 7.5)
    ledger.phase(2, "sync", 6.0, 6.75)
    ledger.phase(3, "update", 6.0, 20.0)  # after step 2: not recorded
    parts = ledger.parts()
    assert parts["optimizer state"] == 1.0 and parts["activations"] == 1.5
    assert parts["weight push"] == 0.75 and parts["rollout"] == pytest.approx(0.2)
    assert parts["peak"] == 8.0 and parts["log-prob pass"] == 0.0
    del kept


def test_memory_mode_sets_measured_parts_beside_the_plan_at_toy_widths(tmp_path):
    """tools/rehearse.py --memory tp1 (the 3B run: docs/benchmarks.md): the main job on one
    process for 2 steps (CI time: the two-rank layouts run the same code per rank, and
    tests/test_train.py checks a two-process job's memory.json), its measured parts beside the
    planner's CPU prediction, the table rebuilt from the stored report; an unknown
    configuration is one line before any work."""
    out, report = str(tmp_path / "m"), str(tmp_path / "memory.json")
    done = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "rehearse.py"), "--widths", "toy",
         "--vit-layers", "1", "--image-side", "112", "--response-len", "16", "--memory", "tp1",
         "--out", out, "--json", report], capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    info = json.load(open(report))
    assert list(info["memory"]) == ["tp1"] and info["passed"]
    ranks = info["memory"]["tp1"]["measured"]
    assert len(ranks) == 1 and all(r["policy"] > 0.03 and r["engine"] > 0.3 for r in ranks)
    assert info["cpu"]["packs_bf16"] in (True, False)  # the planner plans for the CPU it ran on
    assert "tp1         0 " in done.stdout and "memory: PASSED" in done.stdout
    again = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "rehearse.py"),
                            "--report", report], capture_output=True, text=True, cwd=ROOT)
    assert again.returncode == 0 and "tp1         0 " in again.stdout, again.stderr[-2000:]
    wrong = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "rehearse.py"),
                            "--memory", "tp4", "--out", str(tmp_path / "x")],
                           capture_output=True, text=True, cwd=ROOT)
    assert wrong.returncode != 0 and not os.path.exists(tmp_path / "x")
    assert wrong.stderr.strip().splitlines() == [
        "rehearse.py: --memory tp4: unknown configuration tp4; choose from "
        "tp1,tp2,tp2_mb2,pp2"]


def test_the_cpu_planner_stays_within_15_percent_of_the_stored_3b_measurements():
    """docs/runs/rehearsal_memory_3b*.json: the 3B-width --memory runs of docs/benchmarks.md
    (four configurations, each rank's measured parts; three more predicted before their run).
    The planner's CPU peak must stay within 15 % of every rank's measured peak; a change to the
    planner that breaks that fails here."""
    from megatron_papo.testing.rehearsal import MEMORY_TOLERANCE, memory_table

    info = json.load(open(os.path.join(ROOT, "docs", "runs", "rehearsal_memory_3b.json")))
    assert set(info["memory"]) == {"tp1", "tp2", "tp2_mb2", "pp2"}
    table, worst = memory_table(info)
    assert worst <= MEMORY_TOLERANCE, table
    assert len(table.splitlines()) == 1 + 1 + 2 + 2 + 2  # header + the ranks of each
    # the run predicted before it ran (2 vision blocks, 336 px)
    held_out = json.load(open(os.path.join(ROOT, "docs", "runs",
                                           "rehearsal_memory_3b_heldout.json")))
    table, worst = memory_table(held_out)
    assert worst <= MEMORY_TOLERANCE, table

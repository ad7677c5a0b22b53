"""The GPU path seen from a CPU machine: the Transformer Engine spec and FP8 are refused with one
line naming the key, the cause and the fix; the FP8 checks name the GPU that cannot run it; the
two benchmark scripts (training step vs plain GPTModel, PAPO update vs GRPO update) run at toy
size and report their ratios."""

import json
import os
import subprocess
import sys

import pytest
import torch

from megatron_papo.models.qwen2_5_vl import precision
from megatron_papo.train import ConfigError, build_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_TE = precision.transformer_engine_available()
CUDA = torch.cuda.is_available()


def _refused(model, message):
    with pytest.raises(ConfigError) as err:
        build_config({"model": model}, 1)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.skipif(HAS_TE and CUDA, reason="a GPU with Transformer Engine runs these settings")
@pytest.mark.parametrize("model,message", [
    ({"layer_spec": "te"}, "model.layer_spec=te needs Transformer Engine, which is not installed"),
    ({"fp8": "hybrid", "params_dtype": "bfloat16", "layer_spec": "te"},
     "needs Transformer Engine"),
    ({"fp8": "hybrid"}, "model.fp8=hybrid needs Transformer Engine"),
    ({"gradient_accumulation_fusion": True}, "model.gradient_accumulation_fusion=true needs a"),
    ({"apply_rope_fusion": True}, "model.apply_rope_fusion=true needs a"),
])
def test_gpu_settings_are_refused_where_they_cannot_run(model, message):
    _refused(model, message)


@pytest.mark.parametrize("model,message", [
    ({"fp8": "e5m2"}, "model.fp8='e5m2': choose one of ['hybrid', 'e4m3']"),
    ({"fp8": "hybrid", "fp8_recipe": "mxfp8"}, "model.fp8_recipe='mxfp8': choose one of"),
    ({"recompute_granularity": "full"}, "needs model.recompute_method: one of ['uniform', "),
    ({"recompute_granularity": "selective", "recompute_num_layers": 2},
     "apply to model.recompute_granularity=full only"),
    ({"fp8_vision": True}, "model.fp8_vision=true needs model.fp8"),
    ({"params_dtype": "float8"}, "model.params_dtype='float8': choose float32, bfloat16"),
])
def test_precision_settings_that_cannot_work_anywhere(model, message):
    _refused(model, message)


def test_overlap_param_gather_needs_the_grad_reduce_overlap():
    with pytest.raises(ConfigError, match="overlap_param_gather=true needs "
                                          "parallel.overlap_grad_reduce=true"):
        build_config({"parallel": {"overlap_param_gather": True}}, 1)
    config = build_config({"parallel": {"overlap_grad_reduce": True,
                                        "overlap_param_gather": True},
                           "model": {"recompute_granularity": "full",
                                     "recompute_method": "uniform", "recompute_num_layers": 1}}, 2)
    language, vision = config.model.transformer_overrides()
    assert language["recompute_granularity"] == "full" and "fp8" not in language
    assert "recompute_granularity" not in vision


def test_fp8_checks_name_the_gpu_and_the_fix():
    def check(**kw):
        args = dict(fp8="hybrid", recipe="delayed", layer_spec="te", params_dtype="bfloat16",
                    device=("NVIDIA H100 80GB HBM3", (9, 0)), te=True)
        return precision.fp8_problem(**{**args, **kw})

    assert check() is None and check(recipe="current", bf16_first_layers=1) is None
    assert check(device=None) == "model.fp8=hybrid needs a GPU (none is visible); set " \
                                 "model.fp8=null"
    assert "this is NVIDIA A100-SXM4-80GB (sm_80): set model.fp8=null" in check(
        device=("NVIDIA A100-SXM4-80GB", (8, 0)))
    assert check(device=("NVIDIA L40S", (8, 9))) is None  # Ada has FP8 tensor cores
    assert "needs Transformer Engine" in check(te=False)
    assert "set model.params_dtype=bfloat16 (got float32)" in check(params_dtype="float32")
    assert "set model.layer_spec=te (got 'local')" in check(layer_spec="local")
    assert "need model.fp8_recipe=current" in check(bf16_last_layers=2)
    # the megatron-core fields: current scaling is megatron's "tensorwise"
    assert precision.fp8_fields("hybrid", "current", 1, 2) == dict(
        fp8="hybrid", fp8_recipe="tensorwise", first_last_layers_bf16=True,
        num_layers_at_start_in_bf16=1, num_layers_at_end_in_bf16=2)
    assert precision.fp8_fields("e4m3", "delayed")["fp8_amax_history_len"] == 1024
    assert precision.fp8_fields(None) == {}


@pytest.mark.skipif(HAS_TE, reason="Transformer Engine is installed: the spec is built")
def test_te_layer_spec_without_transformer_engine_is_a_clear_error():
    from megatron_papo.models.qwen2_5_vl.specs import language_layer_spec

    with pytest.raises(ValueError, match="model.layer_spec=te needs Transformer Engine"):
        language_layer_spec("te")


def _tool(name, *args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "tools", name), *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)


def test_bench_train_step_at_toy_size(tmp_path):
    """Our model and the plain GPTModel side by side (text only and with an image), and the
    loss of a few optimizer steps on one fixed batch per precision."""
    out = tmp_path / "step.json"
    done = _tool("bench_train_step.py", "--model", "tiny", "--seq", "96", "--mbs", "2",
                 "--image-side", "56", "--steps", "1", "--warmup", "1", "--precisions", "fp32",
                 "bf16", "--track-steps", "3", "--json", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = {(r["precision"], r["model"]): r for r in result["rows"]}
    assert set(rows) == {(p, m) for p in ("fp32", "bf16") for m in ("gpt", "ours", "ours+img")}
    for (p, m), row in rows.items():
        assert row["ms"] > 0 and row["tflops"] > 0 and row["tokens_per_s"] > 0
        assert row["vs_gpt"] == pytest.approx(row["ms"] / rows[(p, "gpt")]["ms"])
        assert f"local {p:12} {m:9}" in done.stdout
    tracks = {t["precision"]: t for t in result["tracks"]}
    assert tracks["fp32"]["max_relative_gap"] == 0.0
    assert 0 < tracks["bf16"]["max_relative_gap"] < 0.02  # bf16 tracks fp32 on the fixed batch
    losses = tracks["fp32"]["losses"]
    assert len(losses) == 3 and losses[-1] < losses[0]  # the optimizer steps learn the batch
    assert "machine: " in done.stdout and result["machine"]


@pytest.mark.skipif(HAS_TE, reason="Transformer Engine is installed: the TE spec runs")
def test_bench_train_step_refuses_te_and_fp8_in_one_line(capsys):
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import bench_train_step

    assert bench_train_step.main(["--specs", "te"]) == 2  # refused before any work
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --specs=te needs Transformer Engine") and "\n" not in err
    assert bench_train_step.main(["--precisions", "fp8-delayed"]) == 2
    assert capsys.readouterr().err.startswith(
        "error: --precisions fp8-delayed (with --specs local): fp8=hybrid needs Transformer "
        "Engine")


def test_bench_papo_overhead_at_toy_size(tmp_path):
    out = tmp_path / "papo.json"
    done = _tool("bench_papo_overhead.py", "--prompts", "4", "--n", "4", "--repeats", "1",
                 "--optimizer-steps", "2", "--json", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())["results"]
    assert results["grpo"]["ratio"] == 1.0
    for name, goal in (("frozen", 1.15), ("live", 2.0)):
        assert results[name]["ms"] > 0 and results[name]["goal"] == goal
        assert f"{results[name]['ratio']:5.2f}x GRPO  (goal <= {goal:.2f}x" in done.stdout
    done = _tool("bench_papo_overhead.py", "--algorithm", "grpo")
    assert done.returncode == 2 and "has no perception term" in done.stderr


def test_bench_papo_step_at_toy_size(tmp_path):
    """The end-to-end PAPO step benchmark: one main job at toy size with the masked branch
    scored by the engine (its own phase in the table), and one-line refusals of bad input."""
    out = tmp_path / "step.json"
    done = _tool("bench_papo_step.py", "--hidden", "32", "--layers", "1", "--prompts", "4",
                 "--n", "2", "--new-tokens", "4", "--steps", "2", "--rounds", "1",
                 "--variants", "papo_engine", "--out", str(tmp_path / "runs"), "--json", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(out.read_text())["summary"]["papo_engine"]
    assert summary["seconds"] > 0 and summary["masked_scoring"] > 0
    assert summary["logprobs"] < 0.01  # no trainer forward: old log-probs from the engine too
    assert "| papo_engine |" in done.stdout and "1.00x" in done.stdout
    done = _tool("bench_papo_step.py", "--setting", "nameless")
    assert done.returncode == 2 and "write NAME=OVERRIDES" in done.stderr


def test_gpu_check_compares_the_local_spec_with_transformers_anywhere(tmp_path):
    """tools/gpu_check.py (the GPU run adds the te and te-fp8 rows): the language model on text,
    the vision tower's features and the whole model, each against transformers in bf16."""
    out = tmp_path / "check.json"
    done = _tool("gpu_check.py", "--specs", "local", "--json", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())
    assert set(results) == {"local whole model", "local language model", "local vision tower"}
    for row in results.values():
        assert row["vs transformers"] < 0.05  # bf16 rounding of a tiny model


def test_bench_default_step_compares_metrics_and_refuses_bad_input():
    """tools/bench_default_step.py: the same-math check flags any differing reward, accuracy or
    loss term (and says by how much); an unknown reference commit and too few steps are refused
    in one line (the A/B run itself: docs/experiments.md, too long for CI)."""
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    try:
        from bench_default_step import compare_metrics
    finally:
        sys.path.pop(0)
    a = [{"step": 1, "reward": 0.5, "accuracy": 0.25, "loss/pg": 0.1, "seconds": 1.0}]
    assert compare_metrics(a, [dict(a[0], seconds=2.0)]) == (True, 0.0)
    same, worst = compare_metrics(a, [dict(a[0], **{"loss/pg": 0.1001})])
    assert not same and worst == pytest.approx(1e-3)
    done = _tool("bench_default_step.py", "--ref", "no-such-commit")
    assert done.returncode == 2 and "not a commit of this repository" in done.stderr
    done = _tool("bench_default_step.py", "--ref", "HEAD", "--steps", "5")
    assert done.returncode == 2 and "--steps must be >= 11" in done.stderr

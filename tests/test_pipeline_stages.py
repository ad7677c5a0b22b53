"""Uneven pipeline stages (a lighter first or last stage): logits equal the one-stage model's,
the converter round trip is bit-exact at an uneven layout, impossible splits are refused naming
the numbers, and the per-stage cost tool counts the parameters the model really holds."""

import os
import subprocess
import sys

import pytest
import torch
from megatron.core import parallel_state

import qwen_utils as Q
from megatron_papo.conversion import checkpoint as ck
from megatron_papo.conversion.hf_io import HFCheckpointReader
from megatron_papo.models.qwen2_5_vl import ModelConfigError, check_parallel_layout, text_spec_from_hf
from megatron_papo.models.qwen2_5_vl.config import preset_hf_config
from megatron_papo.models.qwen2_5_vl.provider import (
    build_model_chunks,
    forward_logits,
    load_hf_weights,
)
from megatron_papo.models.qwen2_5_vl.rope_index import get_rope_index
from megatron_papo.models.qwen2_5_vl.config import layers_per_stage
from megatron_papo.models.qwen2_5_vl.stages import stage_costs, suggest_stage_layers
from megatron_papo.parallel import initialize_model_parallel
from megatron_papo.testing import run_distributed
from megatron_papo.models.qwen2_5_vl.tiny import tiny_hf_config, write_tiny_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _stage_logits(layers, pp, first, last):
    """This rank's logits (the last stage's; None elsewhere), its stage's layer count and the
    parameters it holds, for an image batch through megatron-core's pipeline schedule."""
    hf_config = tiny_hf_config(layers=layers)
    reference = Q.reference_model(hf_config)
    spec = text_spec_from_hf(hf_config)
    initialize_model_parallel(1, pp)
    chunks = build_model_chunks(spec, 1, pp, ddp=False, first_stage_layers=first,
                                last_stage_layers=last)
    load_hf_weights(chunks, spec, reference.state_dict().__getitem__)
    batch = Q.vl_batch("padded_mixed_batch", pad_left=True)
    positions = get_rope_index(batch["input_ids"], batch["image_grid_thw"], Q.IMAGE_TOKEN,
                               attention_mask=batch["attention_mask"])
    logits = forward_logits(chunks, batch["input_ids"], positions, batch["attention_mask"],
                            batch["pixel_values"], batch["image_grid_thw"])
    model = chunks[0]
    return dict(logits=logits, mask=batch["attention_mask"].bool(),
                layers=len(model.language_model.decoder.layers),
                params=sum(p.numel() for p in model.parameters()),
                stage=parallel_state.get_pipeline_model_parallel_rank(), hf_config=hf_config)


@pytest.mark.parametrize("layers,pp,first,last", [(3, 2, 1, None), (5, 2, 1, None),
                                                  (5, 4, 1, 2), (4, 2, None, 1)])
def test_uneven_stages_give_the_logits_of_one_stage(layers, pp, first, last):
    (one,) = run_distributed(_stage_logits, 1, layers, 1, None, None)
    ranks = run_distributed(_stage_logits, pp, layers, pp, first, last)
    assert [r["layers"] for r in ranks] == layers_per_stage(layers, pp, first, last)
    logits = next(r["logits"] for r in ranks if r["logits"] is not None)
    diff = (logits - one["logits"])[one["mask"]].abs().max().item()
    assert diff <= 1e-5, f"{layers} layers, PP={pp}, first={first}, last={last}: {diff:.2e}"
    # the cost tool counts what each stage really holds
    costs = stage_costs(one["hf_config"], pp, first, last)
    assert [r["params"] for r in ranks] == [c.params for c in costs]
    assert one["params"] == stage_costs(one["hf_config"], 1)[0].params


def _roundtrip_uneven(hf_dir, mc, out):
    ck.hf_to_mcore(hf_dir, mc, pp=2, dtype="bf16", first_stage_layers=1)
    parallel_state.destroy_model_parallel()
    ck.mcore_to_hf(mc, out, pp=2, last_stage_layers=1)


def test_converter_round_trip_at_an_uneven_layout_is_bit_exact(tmp_path):
    """Written with a 1-layer first stage (1 + 3 of 4 layers), read back with a 1-layer last
    stage (3 + 1): the dist checkpoint is layout-free, the tensors come back bit-exact; the CLI
    takes the same split as flags and refuses one that cannot work before writing."""
    hf_dir, mc, out = (str(tmp_path / n) for n in ("hf", "mc", "out"))
    write_tiny_checkpoint(hf_dir)
    run_distributed(_roundtrip_uneven, 2, hf_dir, mc, out)
    before, after = HFCheckpointReader(hf_dir), HFCheckpointReader(out)
    assert after.names() == before.names()
    for name in before.names():
        assert torch.equal(after.get(name), before.get(name)), name
    done = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "convert_checkpoint.py"), "hf-to-mcore",
         "--hf", hf_dir, "--out", str(tmp_path / "bad"), "--pp", "2",
         "--first-stage-layers", "2", "--last-stage-layers", "1"],
        capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert ("num_hidden_layers=4 at pipeline_model_parallel_size=2 with first_stage_layers=2, "
            "last_stage_layers=1 leaves 1 layers for the other 0 stages") in done.stderr
    assert not os.path.exists(tmp_path / "bad")


def test_impossible_splits_are_refused_naming_the_numbers():
    spec = text_spec_from_hf(tiny_hf_config(layers=5))
    with pytest.raises(ModelConfigError, match="num_hidden_layers=5 is not divisible by "
                                               "pipeline_model_parallel_size x virtual stages = 2"):
        check_parallel_layout(spec, pp=2)
    with pytest.raises(ModelConfigError, match="with first_stage_layers=1 leaves 4 layers for "
                                               "the other 3 stages"):
        check_parallel_layout(spec, pp=4, first_stage_layers=1)
    with pytest.raises(ModelConfigError, match="need pipeline_model_parallel_size > 1"):
        check_parallel_layout(spec, pp=1, first_stage_layers=1)
    with pytest.raises(ModelConfigError, match="first_stage_layers=0 must be >= 1"):
        check_parallel_layout(spec, pp=2, first_stage_layers=0)
    check_parallel_layout(spec, pp=4, first_stage_layers=1, last_stage_layers=2)
    assert layers_per_stage(28, 8, 2, 2) == [2, 4, 4, 4, 4, 4, 4, 2]  # the 2 + 6x4 + 2


def test_the_suggestion_lightens_the_vision_stage_and_the_tool_prints_it():
    hf = preset_hf_config("7b")
    first, last = suggest_stage_layers(hf, 8)
    costs = stage_costs(hf, 8, first, last)
    assert costs[0].layers < costs[1].layers  # the vision tower's stage holds fewer layers
    slowest = max(c.flops for c in costs)
    for alternative in [(2, 2), (1, 3), (3, 1), (2, None)]:  # every other working split is
        try:                                                  # no better
            assert slowest <= max(c.flops for c in stage_costs(hf, 8, *alternative))
        except ModelConfigError:
            pass
    done = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "pp_stages.py"),
                           "--model", "qwen2_5_vl_7b_papo", "--pp", "8"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "even split: impossible" in done.stdout
    assert f"use: parallel.first_stage_layers={first}" in done.stdout
    assert "vision tower, embedding" in done.stdout

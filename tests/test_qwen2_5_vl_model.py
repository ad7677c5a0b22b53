"""Qwen2.5-VL language model from megatron-core layers vs transformers, same weights, fp32.

Tolerance: max abs logit difference <= 1e-4 (seen: ~1e-6)."""

import pytest
import torch
from megatron.core import parallel_state

import qwen_utils as Q
from megatron_papo.models.mapping.engine import export_megatron_to_hf, load_hf_into_megatron
from megatron_papo.models.qwen2_5_vl import (
    ModelConfigError,
    build_qwen25vl,
    check_parallel_layout,
    language_transformer_config,
    mapping_table,
    preset_hf_config,
    tensor_dims,
    text_spec_from_hf,
)
from megatron_papo.models.qwen2_5_vl.provider import (
    build_model_chunks,
    forward_logits,
    load_hf_weights,
)
from megatron_papo.models.qwen2_5_vl.rope_index import get_rope_index
from megatron_papo.parallel import initialize_model_parallel
from megatron_papo.testing import run_distributed

LOGIT_TOL = 1e-4


def _text_positions(input_ids):
    b, s = input_ids.shape
    return torch.arange(s).view(1, 1, s).expand(3, b, s)


def _megatron_logits(hf_config, sd, batch, tp, pp, sp=False):
    """Logits of our model on ``batch`` (input_ids, position_ids, optional attention_mask,
    pixel_values, image_grid_thw) through megatron-core's schedule (works at any PP); this TP
    rank's vocabulary shard on the last stage."""
    spec = text_spec_from_hf(hf_config)
    initialize_model_parallel(tp, pp)
    chunks = build_model_chunks(spec, tp, pp, sequence_parallel=sp, ddp=False)
    load_hf_weights(chunks, spec, lambda n: sd[n])
    logits = forward_logits(chunks, batch["input_ids"], batch["position_ids"],
                            batch.get("attention_mask"), batch.get("pixel_values"),
                            batch.get("image_grid_thw"), gather_vocab=False)
    return dict(logits=logits, tp_rank=parallel_state.get_tensor_model_parallel_rank(),
                last=parallel_state.is_pipeline_last_stage())


def _text_parity(tp, pp, tied):
    hf_config = Q.tiny_hf_config(tied=tied)
    reference = Q.reference_model(hf_config)
    input_ids = Q.text_batch()
    with torch.no_grad():
        ref_logits = reference(input_ids=input_ids).logits
    batch = {"input_ids": input_ids, "position_ids": _text_positions(input_ids)}
    out = _megatron_logits(hf_config, reference.state_dict(), batch, tp, pp)
    out["ref"] = ref_logits
    return out


def _gather_vocab(results):
    last = sorted((r for r in results if r["last"]), key=lambda r: r["tp_rank"])
    return torch.cat([r["logits"] for r in last], dim=-1)


@pytest.mark.parametrize("tp,pp,tied", [(1, 1, False), (1, 1, True), (2, 1, False),
                                        (1, 2, True), (2, 2, False)])
def test_text_logits_match_transformers(tp, pp, tied):
    results = run_distributed(_text_parity, tp * pp, tp, pp, tied)
    logits = _gather_vocab(results)
    diff = (logits - results[0]["ref"]).abs().max().item()
    assert diff <= LOGIT_TOL, f"max abs logit diff {diff:.3e} at TP={tp} PP={pp} tied={tied}"


def _roundtrip(tied, convention):
    hf_config = Q.tiny_hf_config(tied=tied)
    reference = Q.reference_model(hf_config)
    table = mapping_table(tied)
    conv = table.convention(convention)
    # the checkpoint as it would be on disk in that convention
    on_disk = {conv.from_canonical(k): v for k, v in reference.state_dict().items()}
    if tied:
        on_disk.pop("lm_head.weight")
    detected = table.detect_convention(on_disk)
    canonical = {detected.to_canonical(k): v for k, v in on_disk.items()}
    spec = text_spec_from_hf(hf_config)
    initialize_model_parallel(2, 2)
    model = build_qwen25vl(spec, language_transformer_config(spec, 2, 2))
    tp_group = parallel_state.get_tensor_model_parallel_group()
    load_hf_into_megatron(model, table, canonical.__getitem__, tensor_dims(spec), tp_group)
    exported = dict(export_megatron_to_hf(model, table, tensor_dims(spec), detected, tp_group))
    return dict(on_disk=on_disk, exported=exported, detected=detected.name)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("convention", ["hf", "hf_v5"])
def test_hf_megatron_hf_roundtrip_is_bit_exact_at_tp2_pp2(tied, convention):
    """Catches: a wrong interleave/concat order, lost or duplicated tensors, dtype changes."""
    results = run_distributed(_roundtrip, 4, tied, convention)
    on_disk = results[0]["on_disk"]
    exported = {}
    for r in results:
        assert r["detected"] == convention
        for name, tensor in r["exported"].items():
            if name in exported:  # TP ranks of one stage yield the same tensors
                assert torch.equal(exported[name], tensor), name
            exported[name] = tensor
    assert sorted(exported) == sorted(on_disk)
    for name, tensor in on_disk.items():
        assert exported[name].dtype == tensor.dtype, name
        assert torch.equal(exported[name], tensor), name


def _vl_parity(tp, pp, case, pad_left=False, sp=False):
    hf_config = Q.tiny_hf_config()
    reference = Q.reference_model(hf_config)
    batch = Q.vl_batch(case, pad_left=pad_left, multiple=tp if sp else 1)
    with torch.no_grad():
        ref_logits = reference(**batch).logits
    ref_positions, _ = reference.model.get_rope_index(
        batch["input_ids"], batch["mm_token_type_ids"], batch.get("image_grid_thw"),
        attention_mask=batch["attention_mask"])
    positions = get_rope_index(batch["input_ids"], batch.get("image_grid_thw"), Q.IMAGE_TOKEN,
                               attention_mask=batch["attention_mask"])
    ours = {k: v for k, v in batch.items() if k != "mm_token_type_ids"}
    ours["position_ids"] = positions
    out = _megatron_logits(hf_config, reference.state_dict(), ours, tp, pp, sp=sp)
    out.update(ref=ref_logits, mask=batch["attention_mask"].bool(), positions=positions,
               ref_positions=ref_positions)
    return out


@pytest.mark.parametrize("case", list(Q.CASES))
def test_image_logits_match_transformers(case):
    """One image; two images of different sizes in a sample; a padded batch mixing text-only,
    one- and two-image samples. The tiny vision config (depth 2, fullatt_block_indexes [1],
    window 56 px = 2x2 merge units) runs both window and full attention."""
    (r,) = run_distributed(_vl_parity, 1, 1, 1, case)
    assert torch.equal(r["positions"], r["ref_positions"]), "3-D rope index differs"
    diff = (r["logits"] - r["ref"])[r["mask"]].abs().max().item()
    assert diff <= LOGIT_TOL, f"{case}: max abs logit diff {diff:.3e}"


@pytest.mark.parametrize("tp,pp,sp", [(2, 1, False), (2, 1, True), (1, 2, False),
                                      (2, 2, False), (2, 2, True)])
def test_padded_image_batch_matches_transformers_in_parallel(tp, pp, sp):
    """TP, PP, TP x PP, and TP + sequence parallel (scattered after the image merge)."""
    results = run_distributed(_vl_parity, tp * pp, tp, pp, "padded_mixed_batch", pad_left=True,
                              sp=sp)
    logits = _gather_vocab(results)
    ref = results[0]
    diff = (logits - ref["ref"])[ref["mask"]].abs().max().item()
    assert diff <= LOGIT_TOL, f"TP={tp} PP={pp}: max abs logit diff {diff:.3e}"


def _vl_grads(tied, case="padded_mixed_batch"):
    hf_config = Q.tiny_hf_config(tied=tied)
    reference = Q.reference_model(hf_config)
    batch = Q.vl_batch(case)
    mask = batch["attention_mask"].bool()
    weights = torch.randn(*batch["input_ids"].shape, Q.VOCAB,
                          generator=torch.Generator().manual_seed(9))
    ref_logits = reference(**batch).logits
    (ref_logits * weights)[mask].sum().backward()
    ref_grads = {n: p.grad for n, p in reference.named_parameters()}

    spec = text_spec_from_hf(hf_config)
    initialize_model_parallel(1, 1)
    model = build_qwen25vl(spec, language_transformer_config(spec))
    table = mapping_table(tied)
    sd = reference.state_dict()
    load_hf_into_megatron(model, table, sd.__getitem__, tensor_dims(spec))
    positions = get_rope_index(batch["input_ids"], batch["image_grid_thw"], Q.IMAGE_TOKEN,
                               attention_mask=batch["attention_mask"])
    logits = model(batch["input_ids"], positions, batch["attention_mask"], batch["pixel_values"],
                   batch["image_grid_thw"])
    (logits * weights)[mask].sum().backward()
    grads = dict(export_megatron_to_hf(model, table, tensor_dims(spec), value=lambda p: p.grad))
    return grads, ref_grads


@pytest.mark.parametrize("tied,case", [(False, "padded_mixed_batch"), (True, "padded_mixed_batch"),
                                       (False, "shared_images")])
def test_gradients_match_transformers_including_vision_tower(tied, case):
    """Also with images repeated across samples (encoded once, their gradients summed)."""
    (grads, ref_grads), = run_distributed(_vl_grads, 1, tied, case)
    expected = {k: v for k, v in ref_grads.items() if not (tied and k == "lm_head.weight")}
    assert sorted(grads) == sorted(expected)
    assert any(k.startswith("model.visual.blocks.") for k in grads)
    for name, grad in grads.items():
        scale = expected[name].abs().max().item()
        torch.testing.assert_close(grad, expected[name], rtol=1e-4, atol=1e-4 * max(scale, 1.0),
                                   msg=name)


def _shared_image_encoding():
    spec = text_spec_from_hf(Q.tiny_hf_config())
    initialize_model_parallel(1, 1)
    vision = build_qwen25vl(spec, language_transformer_config(spec)).vision_model
    batch = Q.vl_batch("shared_images")
    seen = []
    vision.patch_embed.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))
    with torch.no_grad():
        once = vision(batch["pixel_values"], batch["image_grid_thw"])
        each = vision._encode(batch["pixel_values"], batch["image_grid_thw"])
        keyed = vision(batch["pixel_values"], batch["image_grid_thw"],
                       torch.tensor([3, 3, 3, 0, 9, 9]))
    return once, each, keyed, seen, batch["image_grid_thw"]


def test_images_repeated_across_samples_are_encoded_once():
    """The n samples of a prompt carry the same image: the tower encodes each run of equal
    images once (found by comparing pixels, or told by image keys) and hands every sample the
    same features as encoding it separately."""
    (once, each, keyed, seen, grids), = run_distributed(_shared_image_encoding, 1)
    patches = grids.prod(-1).tolist()  # 6 images, runs: [0, 1, 2], [3], [4, 5]
    distinct = patches[0] + patches[3] + patches[4]
    assert seen == [distinct, sum(patches), distinct]  # compared pixels, each, by keys
    torch.testing.assert_close(once, each, rtol=0, atol=1e-6)
    assert torch.equal(keyed, once)


@pytest.mark.parametrize("one_grid", [True, False], ids=["one-grid", "mixed-grids"])
def test_runs_of_equal_images_are_found(one_grid):
    """consecutive_duplicates: the distinct images of each run of equal images, in order, and the
    index handing every original image its run's features (one grid: one vectorised
    comparison; mixed grids: image by image), or from keys. A batch without repeats: None."""
    from megatron_papo.models.qwen2_5_vl.vision import consecutive_duplicates, keyed_duplicates

    g = torch.Generator().manual_seed(0)

    def image(h, w):
        return torch.randn(h * w, 12, generator=g), torch.tensor([[1, h, w]])

    a, b = image(2, 2), image(2, 2)
    c = image(2, 2) if one_grid else image(2, 4)
    order, runs, owners = [a, a, b, b, b, c, a], [a, b, c, a], [0, 0, 1, 1, 1, 2, 3]
    (pixels, grid), index = consecutive_duplicates(
        torch.cat([x[0] for x in order]), torch.cat([x[1] for x in order]), 4)
    assert torch.equal(pixels, torch.cat([x[0] for x in runs]))
    assert torch.equal(grid, torch.cat([x[1] for x in runs]))
    features = [x[0].shape[0] // 4 for x in runs]
    offsets = [sum(features[:r]) for r in range(len(runs))]
    assert index.tolist() == [i for o in owners for i in range(offsets[o], offsets[o] + features[o])]
    assert consecutive_duplicates(torch.cat([a[0], b[0], c[0]]),
                                  torch.cat([a[1], b[1], c[1]]), 4) is None
    # the same runs told by keys (the rollout batch's image_keys): the same result, no comparison
    (keyed_pixels, keyed_grid), keyed_index = keyed_duplicates(
        torch.cat([x[0] for x in order]), torch.cat([x[1] for x in order]),
        torch.tensor([5, 5, 2, 2, 2, 7, 5]), 4)
    assert torch.equal(keyed_pixels, pixels) and torch.equal(keyed_grid, grid)
    assert torch.equal(keyed_index, index)
    assert keyed_duplicates(torch.cat([a[0], b[0]]), torch.cat([a[1], b[1]]),
                            torch.tensor([0, 1]), 4) is None


def test_flat_and_nested_hf_configs_translate_the_same():
    assert text_spec_from_hf(Q.flat_hf_config()) == text_spec_from_hf(Q.tiny_hf_config())


@pytest.mark.parametrize("preset", ["3b", "7b", "32b", "72b"])
def test_presets_translate_with_public_shapes(preset):
    spec = text_spec_from_hf(preset_hf_config(preset))
    t = spec.transformer
    assert spec.mrope_section == [16, 24, 24] and spec.rotary_base == 1e6
    assert t["kv_channels"] == 128 and t["add_qkv_bias"] and not t["add_bias_linear"]
    assert spec.tie_word_embeddings == (preset == "3b")
    check_parallel_layout(spec, tp=2, pp=2)


def test_tp_not_dividing_kv_groups_is_refused():
    spec = text_spec_from_hf(preset_hf_config("3b"))  # 16 heads, 2 KV groups
    with pytest.raises(ModelConfigError, match=r"num_key_value_heads=2 \(KV groups\) is not "
                                               r"divisible by tensor_model_parallel_size=4"):
        check_parallel_layout(spec, tp=4)


def test_missing_mrope_section_is_a_clear_error():
    config = Q.tiny_hf_config()
    del config["text_config"]["rope_parameters"]["mrope_section"]
    with pytest.raises(ModelConfigError, match="mrope_section"):
        text_spec_from_hf(config)

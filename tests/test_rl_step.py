"""The PAPO update on megatron-core: TP/PP parity of a full update (frozen and live masked branch),
and where the gradient of the masked branch goes."""

from dataclasses import fields

import pytest
import torch
from megatron.core import parallel_state
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

import qwen_utils as Q
from megatron_papo.models.qwen2_5_vl import text_spec_from_hf
from megatron_papo.models.qwen2_5_vl.provider import (
    build_model_chunks,
    export_hf_weights,
    load_hf_weights,
    sync_params,
)
from megatron_papo.models.qwen2_5_vl.rope_index import get_rope_index
from megatron_papo.parallel import initialize_model_parallel
from megatron_papo.rl.logprobs import token_entropy, token_logprobs
from megatron_papo.rl.step import (
    PerceptionHackingMonitor,
    PolicyUpdater,
    RolloutBatch,
    UpdateConfig,
)
from megatron_papo.testing import run_distributed
from megatron_papo.train.config import algorithm_preset

TOL = dict(rtol=1e-5, atol=1e-5)


def rollout_batch() -> RolloutBatch:
    raw = Q.vl_batch("rollout", multiple=2)  # even length: sequence parallelism at TP=2
    g = torch.Generator().manual_seed(21)
    mask = raw["attention_mask"]
    response = torch.zeros_like(mask)
    for i, length in enumerate(mask.sum(-1).tolist()):
        response[i, length - 6:length] = 1  # the last 6 tokens of each sample are the response
    return RolloutBatch(
        input_ids=raw["input_ids"], attention_mask=mask,
        position_ids=get_rope_index(raw["input_ids"], raw["image_grid_thw"], Q.IMAGE_TOKEN,
                                    attention_mask=mask),
        response_mask=response, advantages=torch.randn(4, generator=g),
        pixel_values=raw["pixel_values"], image_grid_thw=raw["image_grid_thw"],
        images_per_sample=torch.tensor([1, 0, 1, 1]),
        masked_pixel_values=raw["pixel_values"] * (torch.rand(raw["pixel_values"].shape[0], 1,
                                                              generator=g) > 0.6))


def _policy(tp, pp, mode, algorithm="papo_h", sp=False, micro=2, mini=4, aggregation=None,
            packing=False, max_tokens=0, **build):
    hf_config = Q.tiny_hf_config()
    sd = Q.reference_model(hf_config).state_dict()
    spec = text_spec_from_hf(hf_config)
    initialize_model_parallel(tp, pp)
    chunks = build_model_chunks(spec, tp, pp, sequence_parallel=sp, use_distributed_optimizer=True,
                                **build)
    load_hf_weights(chunks, spec, sd.__getitem__)
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=1e-4, weight_decay=0.0, clip_grad=1.0,
                        use_distributed_optimizer=True, params_dtype=torch.float32), chunks)
    loss = algorithm_preset(algorithm, **({"aggregation": aggregation} if aggregation else {})).loss
    config = UpdateConfig(micro_batch_size=micro, mini_batch_size=mini, masked_branch=mode,
                          loss=loss, packing=packing, pad_multiple=tp if sp else 1,
                          max_tokens_per_micro_batch=max_tokens)
    return spec, chunks, PolicyUpdater(chunks, optimizer, config)


def _count_packed_forwards(chunks) -> list:
    """Record every core-attention call that ran on a packed (THD) row: a test of packing that
    silently ran the padded path would see none."""
    calls = []

    def hook(module, args, kwargs):
        if kwargs.get("packed_seq_params") is not None:
            calls.append(int(kwargs["packed_seq_params"].cu_seqlens_q.numel() - 1))
    for chunk in chunks:
        for module in chunk.modules():
            if type(module).__name__ == "PackedDotProductAttention":
                module.register_forward_pre_hook(hook, with_kwargs=True)
    return calls


def _one_update(tp, pp, mode, sp=False, algorithm="papo_h", packing=False, max_tokens=0):
    spec, chunks, updater = _policy(tp, pp, mode, sp=sp, algorithm=algorithm, packing=packing,
                                    max_tokens=max_tokens)
    packed_calls = _count_packed_forwards(chunks)
    # the frozen reference model: same initial weights, no DDP, never updated
    reference = build_model_chunks(spec, tp, pp, sequence_parallel=sp, ddp=False)
    load_hf_weights(reference, spec, Q.reference_model(Q.tiny_hf_config()).state_dict().__getitem__)
    batch = rollout_batch()
    g = torch.Generator().manual_seed(5)
    current = updater.compute_logprobs(batch)
    ref_before = updater.compute_logprobs(batch, model_chunks=reference)
    batch.old_logp = current + 0.3 * torch.randn(current.shape, generator=g)  # exercise clipping
    batch.ref_logp = ref_before + 0.2 * torch.randn(current.shape, generator=g)
    if mode == "frozen":
        batch.masked_logp = updater.compute_logprobs(batch, masked=True)
    (metrics,) = updater.update(batch)
    weights = dict(export_hf_weights(chunks, spec))
    return dict(metrics=metrics, weights=weights, current=current, ref_before=ref_before,
                ref_after=updater.compute_logprobs(batch, model_chunks=reference),
                policy_after=updater.compute_logprobs(batch),
                last=parallel_state.is_pipeline_last_stage(), packed_calls=len(packed_calls),
                tokens=batch.attention_mask.bool())


@pytest.mark.parametrize("mode", ["frozen", "live"])
def test_update_at_tp_pp_equals_tp1(mode):
    """Two micro-batches, PAPO_H loss (policy + ref KL + perception KL + double entropy): loss,
    grad norm and the updated weights at TP=2, TP=2 + sequence parallel (norm-weight grads must be
    all-reduced across TP), PP=2 and TP=2 x PP=2 equal TP=1 (tol 1e-5)."""
    (ref,) = run_distributed(_one_update, 1, 1, 1, mode)
    assert ref["metrics"]["update_ok"] and ref["metrics"]["clip/high"] + ref["metrics"]["clip/low"] > 0
    # the reference model is frozen; the policy moved
    assert torch.equal(ref["ref_before"], ref["ref_after"])
    assert torch.equal(ref["ref_before"], ref["current"])
    assert not torch.allclose(ref["policy_after"], ref["current"])
    for tp, pp, sp in [(2, 1, False), (2, 1, True), (1, 2, False), (2, 2, False)]:
        results = run_distributed(_one_update, tp * pp, tp, pp, mode, sp=sp)
        weights = {}
        for r in results:
            torch.testing.assert_close(r["current"], ref["current"], **TOL)
            assert r["metrics"]["grad_norm"] == pytest.approx(ref["metrics"]["grad_norm"], rel=1e-5)
            if r["last"]:
                for key in ("loss/total", "loss/kl_prcp", "loss/policy", "clip/high"):
                    assert r["metrics"][key] == pytest.approx(ref["metrics"][key], rel=1e-5,
                                                              abs=1e-7), key
            weights.update(r["weights"])
        assert weights.keys() == ref["weights"].keys()
        for name, value in weights.items():
            torch.testing.assert_close(value, ref["weights"][name], **TOL, msg=f"{name} {tp}x{pp}")


def _update_split(micro, mode, aggregation, packing=False, max_tokens=0, **build):
    """One update of the 4-sample mini-batch, each DP rank holding its contiguous share."""
    dp = torch.distributed.get_world_size()
    spec, chunks, updater = _policy(1, 1, mode, micro=micro, mini=4 // dp,
                                    aggregation=aggregation, packing=packing,
                                    max_tokens=max_tokens, **build)
    packed_calls = _count_packed_forwards(chunks)
    batch = rollout_batch()
    batch.response_mask.zero_()
    for i, (length, n) in enumerate(zip(batch.attention_mask.sum(-1).tolist(), (2, 7, 4, 5))):
        batch.response_mask[i, length - n:length] = 1  # responses of different lengths
    g = torch.Generator().manual_seed(5)
    current = updater.compute_logprobs(batch)
    batch.old_logp = current + 0.3 * torch.randn(current.shape, generator=g)
    batch.ref_logp = current + 0.2 * torch.randn(current.shape, generator=g)
    if mode == "frozen":
        batch.masked_logp = updater.compute_logprobs(batch, masked=True)
    rank, share = parallel_state.get_data_parallel_rank(), 4 // dp
    (metrics,) = updater.update(batch.select(rank * share, (rank + 1) * share))
    sync_params(chunks)  # parameters gathered (overlap_param_gather defers it to the next forward)
    return dict(grad_norm=metrics["grad_norm"], weights=dict(export_hf_weights(chunks, spec)),
                metrics=metrics, packed_calls=len(packed_calls))


@pytest.mark.parametrize("mode,aggregation", [("frozen", "token-mean"), ("live", "token-mean"),
                                              ("frozen", "seq-mean-token-mean")])
def test_update_is_invariant_to_micro_batch_size_and_dp(mode, aggregation):
    """The same 4-sample mini-batch (samples of different response lengths would weigh
    differently if each micro-batch were averaged on its own): micro-batch 1, 2 and 4 at DP=1
    and micro-batch 1 and 2 at DP=2 give the same grad norm and updated weights (tol 1e-5), and
    the same reported loss terms, clip fractions and entropies (token means of the mini-batch)."""
    (ref,) = run_distributed(_update_split, 1, 4, mode, aggregation)
    runs = [run_distributed(_update_split, 1, m, mode, aggregation) for m in (1, 2)]
    runs += [run_distributed(_update_split, 2, m, mode, aggregation) for m in (1, 2)]
    for results in runs:
        for r in results:
            assert r["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-5)
            for name, value in r["weights"].items():
                torch.testing.assert_close(value, ref["weights"][name], **TOL, msg=name)
            for key, value in ref["metrics"].items():
                if key.startswith(("loss/", "clip/", "entropy/")):
                    assert r["metrics"][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


PACK_TOL = dict(rtol=1e-6, atol=1e-6)


def _assert_same_update(got, ref, tol=PACK_TOL):
    assert got["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-6)
    for name, value in got["weights"].items():
        torch.testing.assert_close(value, ref["weights"][name], **tol, msg=name)


@pytest.mark.parametrize("mode,algorithm,layouts", [
    ("frozen", "papo_h", [(1, 1, False), (2, 1, True), (1, 2, False)]),
    ("live", "papo_h", [(1, 1, False), (2, 1, True)]),
    ("frozen", "grpo", [(1, 1, False)])])
def test_packed_update_equals_the_padded_one(mode, algorithm, layouts):
    """Packing (each micro-batch's samples in one THD row, its own MRoPE positions, attention
    bounded by cu_seqlens) against the padded path on the same layout: log-probs within 1e-6 on
    every token, the loss terms, and the weights after one optimizer step within 1e-6 (fp32),
    at TP 1, TP 2 + SP, PP 2, and DP 2 with micro-batch 1 (a pack of one sample; 2e-6, the
    padded path's own floor there). Every packed
    run really ran packed rows (its core attention saw cu_seqlens)."""
    for tp, pp, sp in layouts:
        padded = run_distributed(_one_update, tp * pp, tp, pp, mode, sp=sp, algorithm=algorithm)
        packed = run_distributed(_one_update, tp * pp, tp, pp, mode, sp=sp, algorithm=algorithm,
                                 packing=True)
        weights = ({}, {})
        for r, ref in zip(packed, padded):
            assert r["packed_calls"] > 0 and ref["packed_calls"] == 0
            mask = r["tokens"].clone()
            mask[:, 0] = False  # position 0 has no log-prob
            torch.testing.assert_close(r["current"][mask], ref["current"][mask], **PACK_TOL)
            if r["last"]:
                for key in ("loss/total", "loss/policy", "clip/high", "entropy/original"):
                    assert r["metrics"][key] == pytest.approx(ref["metrics"][key], rel=1e-6,
                                                              abs=1e-7), key
            weights[0].update(r["weights"])
            weights[1].update(ref["weights"])
        _assert_same_update(dict(grad_norm=packed[0]["metrics"]["grad_norm"], weights=weights[0]),
                            dict(grad_norm=padded[0]["metrics"]["grad_norm"], weights=weights[1]))
    if algorithm == "papo_h":
        padded = run_distributed(_update_split, 2, 1, mode, "token-mean")
        packed = run_distributed(_update_split, 2, 1, mode, "token-mean", packing=True)
        for r, ref in zip(packed, padded):
            assert r["packed_calls"] > 0
            # DP 2 reaches Adam's fp32 floor on near-zero gradients: the PADDED path's own DP 2
            # vs DP 1 updates differ by 1.3e-6 on this batch
            _assert_same_update(r, ref, tol=dict(rtol=1e-6, atol=2e-6))


@pytest.mark.parametrize("mode", ["frozen", "live"])
def test_token_budget_micro_batches_keep_the_update(mode):
    """Micro-batches bin-packed under a token budget (samples of 27, 8, 21 and 38 tokens; the
    live branch runs each with its masked copy: twice the tokens): a budget of the longest
    sample (3 micro-batches), one that groups samples out of order ([0, 2] and [1, 3]) and, at
    DP 2, one that makes the ranks bin differently (each then runs 2) give the padded update
    within 2e-6 (the padded path's own floor across micro-batch sizes); a sample above the
    budget is one error naming both numbers and the key."""
    from megatron_papo.rl.packing import plan_micro_batches

    weight = 2 if mode == "live" else 1
    lengths = [27, 8, 21, 38]
    assert plan_micro_batches(lengths, 38 * weight, weight) == [[0, 1], [2], [3]]
    assert plan_micro_batches(lengths, 48 * weight, weight) == [[0, 2], [1, 3]]
    with pytest.raises(ValueError, match=r"sample 3 has 38 tokens, more than "
                                         r"trainer.max_tokens_per_micro_batch=37; raise"):
        plan_micro_batches(lengths, 37)
    # the reference: the padded path, one micro-batch; its own micro-batch 1 and 2 updates differ
    # from it by 1.0-1.2e-6 on this batch (Adam's fp32 floor on near-zero gradients): 2e-6
    floor = dict(rtol=1e-6, atol=2e-6)
    (padded,) = run_distributed(_update_split, 1, 4, mode, "token-mean")
    for budget in (38, 48):
        (r,) = run_distributed(_update_split, 1, 4, mode, "token-mean", packing=True,
                               max_tokens=budget * weight)
        assert r["packed_calls"] > 0
        _assert_same_update(r, padded, tol=floor)
    for r in run_distributed(_update_split, 2, 2, mode, "token-mean", packing=True,
                             max_tokens=40 * weight):
        _assert_same_update(r, padded, tol=floor)


def test_token_budget_under_pipeline_parallelism():
    """PP 2 with a token budget of 40 (the batch's samples of 27-38 tokens in 3 packed
    micro-batches of different lengths; the pipeline's p2p shape fixed per pass): log-probs of
    the padded PP 2 run within 1e-6, the weights after the update within 2e-6 (the padded
    path's own floor across micro-batch sizes)."""
    padded = run_distributed(_one_update, 2, 1, 2, "frozen")
    packed = run_distributed(_one_update, 2, 1, 2, "frozen", packing=True, max_tokens=40)
    weights = ({}, {})
    for r, ref in zip(packed, padded):
        # 3 micro-batches (the budget; micro_batch_size would give 2) x 2 layers per stage x 4
        # passes over the policy (log-probs, masked log-probs, the update, log-probs after)
        assert r["packed_calls"] == 3 * 2 * 4
        mask = r["tokens"].clone()
        mask[:, 0] = False
        torch.testing.assert_close(r["current"][mask], ref["current"][mask], **PACK_TOL)
        weights[0].update(r["weights"])
        weights[1].update(ref["weights"])
    _assert_same_update(dict(grad_norm=packed[0]["metrics"]["grad_norm"], weights=weights[0]),
                        dict(grad_norm=padded[0]["metrics"]["grad_norm"], weights=weights[1]),
                        tol=dict(rtol=1e-6, atol=2e-6))


def _packed_logprobs_with_other_first_sample():
    from megatron_papo.rl.packing import pack

    spec, chunks, updater = _policy(1, 1, "frozen", micro=4, packing=True)
    batch = rollout_batch()
    before = updater.compute_logprobs(batch)
    changed = rollout_batch()
    text = changed.input_ids[0] != Q.IMAGE_TOKEN
    changed.input_ids[0, text] = (changed.input_ids[0, text] * 7 + 3) % 250  # other text, same
    after = updater.compute_logprobs(changed)                                # length and image
    row = pack(batch.input_ids, batch.position_ids, batch.attention_mask)
    return dict(before=before, after=after, cu=row.params.cu_seqlens_q.tolist(),
                positions=row.position_ids, per_sample=batch.position_ids,
                mask=batch.attention_mask.bool())


def test_packed_samples_do_not_see_each_other():
    """One pack of four samples: changing the first sample's text changes its own log-probs but
    leaves the three others' exactly as they were (no attention across a boundary); the packed
    row's MRoPE positions are each sample's own (restarting at 0, image grids included)."""
    (r,) = run_distributed(_packed_logprobs_with_other_first_sample, 1)
    assert r["cu"] == [0, 27, 35, 56, 94]
    assert not torch.allclose(r["before"][0], r["after"][0])
    assert torch.equal(r["before"][1:], r["after"][1:])
    for i, (start, end) in enumerate(zip(r["cu"][:-1], r["cu"][1:])):
        assert torch.equal(r["positions"][:, 0, start:end], r["per_sample"][:, i, r["mask"][i]])
        assert int(r["positions"][0, 0, start]) == 0


def test_recompute_and_communication_overlap_keep_the_update():
    """Activation recompute (full, selective) and DDP's overlap of the gradient reduce and the
    parameter gather (at DP=2; weights read after provider.sync_params) give the same update as
    the plain DP=1 run, live masked branch (tol 1e-5)."""
    (ref,) = run_distributed(_update_split, 1, 2, "live", "token-mean")
    for world, knobs in [
            (1, dict(recompute_granularity="full", recompute_method="uniform",
                     recompute_num_layers=1)),
            (1, dict(recompute_granularity="selective")),
            (2, dict(overlap_grad_reduce=True, overlap_param_gather=True))]:
        for r in run_distributed(_update_split, world, 2 // world, "live", "token-mean",
                                 **knobs):
            assert r["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-5), knobs
            for name, value in r["weights"].items():
                torch.testing.assert_close(value, ref["weights"][name], **TOL, msg=name)


def _on_policy_update(pp, given):
    """One mini-batch of 4 (2 micro-batches, live PAPO_H): old log-probs computed by a forward of
    their own (``given``) or left out (the update's forward gives them)."""
    spec, chunks, updater = _policy(1, pp, "live")
    batch = rollout_batch()
    batch.ref_logp = updater.compute_logprobs(batch)
    if given:
        batch.old_logp = updater.compute_logprobs(batch)
    (metrics,) = updater.update(batch)
    refused = None
    try:  # two mini-batches: the second one's weights are no longer the sampling weights
        updater.config.mini_batch_size = 2
        updater.update(rollout_batch())
    except ValueError as err:
        refused = str(err)
    return dict(metrics=metrics, weights=dict(export_hf_weights(chunks, spec)), refused=refused,
                last=parallel_state.is_pipeline_last_stage())


@pytest.mark.parametrize("pp", [1, 2])
def test_on_policy_update_needs_no_old_logprob_forward(pp):
    """Without old log-probs a one-mini-batch update (the warm start's supervised steps) makes
    the update of the old log-probs computed beforehand (loss, grad norm: 1e-6; weights: the
    file's 1e-5, as Adam's first step divides by the gradient's own size, so a gradient of ~0
    moves its weight by up to lr either way), and several mini-batches without them are refused."""
    ref = run_distributed(_on_policy_update, pp, pp, True)
    got = run_distributed(_on_policy_update, pp, pp, False)
    for r, g in zip(ref, got):
        assert g["refused"] and "old_logp" in g["refused"] and r["refused"]
        assert g["metrics"]["grad_norm"] == pytest.approx(r["metrics"]["grad_norm"], rel=1e-6)
        if g["last"]:
            assert g["metrics"]["loss/total"] == pytest.approx(r["metrics"]["loss/total"],
                                                               rel=1e-6)
        for name, value in g["weights"].items():
            torch.testing.assert_close(value, r["weights"][name], **TOL, msg=name)


def _masked_branch_gradient(mode):
    spec, chunks, updater = _policy(1, 1, mode)
    batch = rollout_batch().select(0, 2)
    batch.masked_logp = torch.zeros(batch.input_ids.shape)  # what a frozen rollout would carry
    model = chunks[0]
    (layout,), _, _ = updater.layouts([batch], paired=mode == "live")
    output, split = updater.branch_logprobs(model, layout)
    _, masked_logp, _, _ = split(output)
    vision = [p for n, p in model.module.named_parameters() if n.startswith("vision_model.")]
    if not masked_logp.requires_grad:
        return False, 0.0
    grads = torch.autograd.grad((masked_logp * batch.response_mask).sum(), vision,
                                allow_unused=True)
    return True, sum(float(g.abs().sum()) for g in grads if g is not None)


def test_frozen_branch_has_no_gradient_and_live_branch_has_one():
    (frozen,) = run_distributed(_masked_branch_gradient, 1, "frozen")
    (live,) = run_distributed(_masked_branch_gradient, 1, "live")
    assert frozen == (False, 0.0)
    assert live[0] and live[1] > 0  # reaches the vision tower through the masked images


def _logprobs_and_entropy(tp):
    initialize_model_parallel(tp, 1)
    g = torch.Generator().manual_seed(1)
    full = torch.randn(2, 5, 16, generator=g, dtype=torch.float32)
    targets = torch.randint(0, 16, (2, 5), generator=g)
    rank = parallel_state.get_tensor_model_parallel_rank()
    shard = full.chunk(tp, dim=-1)[rank].clone().requires_grad_(True)
    logp, entropy = token_logprobs(shard, targets), token_entropy(shard)
    # a packed row (batch 1): its transpose is contiguous, megatron-core's cross-entropy would
    # overwrite the caller's logits in place (the exact entropy after it read exp() values)
    row = shard.detach()[:1].clone()
    kept = row.clone()
    assert torch.equal(token_logprobs(row, targets[:1]), logp.detach()[:1])
    assert torch.equal(row, kept)
    assert torch.equal(token_entropy(row), entropy.detach()[:1])
    (logp.sum() + 0.5 * entropy.sum()).backward()
    return logp.detach(), entropy.detach(), shard.grad, full, targets, rank


def test_vocab_parallel_logprobs_and_entropy_match_full_vocab():
    """TP=2 shards give the full-vocabulary log-probs, exact entropy and their gradients; the
    logits of a packed row (batch 1) are left as they were (the exact entropy computed after
    the log-probs, as the update does, reads them)."""
    results = run_distributed(_logprobs_and_entropy, 2, 2)
    full, targets = results[0][3].clone().requires_grad_(True), results[0][4]
    logsm = torch.log_softmax(full, -1)
    logp = logsm.gather(-1, targets[..., None])[..., 0]
    entropy = -(logsm.exp() * logsm).sum(-1)
    (logp.sum() + 0.5 * entropy.sum()).backward()
    grads = torch.cat([r[2] for r in sorted(results, key=lambda r: r[5])], dim=-1)
    for r in results:
        torch.testing.assert_close(r[0], logp.detach(), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(r[1], entropy.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grads, full.grad, rtol=1e-5, atol=1e-6)


def test_hacking_monitor_needs_all_symptoms(caplog):
    """KL_prcp jumping (the perception loss dropping) with both entropies rising, and the
    high-side clip fraction rising when the run clips at all; any symptom alone is silent."""
    calm = {"loss/kl_prcp": 0.5, "clip/high": 0.01, "entropy/original": 1.0,
            "entropy/masked": 1.2}
    hacked = {"loss/kl_prcp": 4.5, "clip/high": 0.05, "entropy/original": 2.0,
              "entropy/masked": 2.5}

    def after_calm_steps():
        monitor = PerceptionHackingMonitor(window=3)
        assert not any(monitor.check(dict(calm)) for _ in range(3))
        return monitor

    for key in hacked:  # one symptom alone: no warning
        assert not after_calm_steps().check({**calm, key: hacked[key]}), key
    assert not after_calm_steps().check({**hacked, "clip/high": 0.01})  # all but the clipping
    with caplog.at_level("WARNING"):
        assert after_calm_steps().check(hacked)
    assert "KL_prcp hacking suspected" in caplog.text and "prcp_gamma" in caplog.text
    # one optimizer step per rollout: nothing clips, the other three symptoms decide
    unclipped = PerceptionHackingMonitor(window=3)
    assert not any(unclipped.check({**calm, "clip/high": 0.0}) for _ in range(3))
    assert unclipped.check({**hacked, "clip/high": 0.0})
    # a tiny KL doubling (a collapsed policy: 0.003 -> 0.008 nats) is noise, not hacking
    tiny = PerceptionHackingMonitor(window=3)
    assert not any(tiny.check({**calm, "loss/kl_prcp": 0.003}) for _ in range(3))
    assert not tiny.check({**hacked, "loss/kl_prcp": 0.008})


def _record_of_two_mini_batches():
    from types import SimpleNamespace

    from megatron_papo.train.metrics import step_record

    initialize_model_parallel(1, 1)
    scored = [SimpleNamespace(accuracy=a, format=1.0) for a in (1.0, 0.0, 0.0, 1.0)]
    group = SimpleNamespace(scored=scored, rewards=torch.tensor([1.0, 0.0, 0.0, 1.0]),
                            has_signal=True)
    batch = SimpleNamespace(response_mask=torch.ones(4, 3))
    updates = [{"check/logprob_mismatch": 1e-7, "loss/kl_prcp": 0.2, "clip/high": 0.0,
                "entropy/original": 1.0, "grad_norm": 2.0},
               {"check/logprob_mismatch": 5.0, "loss/kl_prcp": 0.6, "clip/high": 0.1,
                "entropy/original": 3.0, "grad_norm": 4.0}]
    return step_record(1, [group], [group], batch, updates, {}, {"rollout": 1.0}, 2.0, 1)


def test_step_metrics_are_the_mean_over_the_steps_mini_batches():
    """A step's loss terms, clip fractions, entropies and gradient norm are the mean over its
    mini-batches (its optimizer steps), what the KL_prcp-hacking monitor reads (issue #26: the
    last mini-batch alone hid or invented jumps); the engine-vs-trainer gap is the first
    mini-batch's (taken before any weight changed)."""
    (record,) = run_distributed(_record_of_two_mini_batches, 1)
    assert record["loss/kl_prcp"] == pytest.approx(0.4)
    assert record["clip/high"] == pytest.approx(0.05)
    assert record["entropy/original"] == pytest.approx(2.0)
    assert record["grad_norm"] == pytest.approx(3.0)
    assert record["logprob_mismatch"] == 1e-7 and record["accuracy"] == 0.5


def test_rollout_batch_select_keeps_images_with_their_samples():
    batch = rollout_batch()
    part = batch.select(1, 3)  # sample 1 (no image), sample 2 (one 4x8 image)
    assert part.image_grid_thw.tolist() == [[1, 4, 8]]
    first = 8 * 8
    assert torch.equal(part.pixel_values, batch.pixel_values[first:first + 32])
    assert batch.select(1, 2).pixel_values is None
    paired = part.paired()
    assert paired.input_ids.shape[0] == 4 and paired.image_grid_thw.shape[0] == 2
    assert torch.equal(paired.pixel_values[32:], part.masked_pixel_values)


def test_rollout_batch_to_moves_every_tensor_and_keeps_the_rest():
    """The main job builds the batch on the host and moves it to the model's device (GPU); on
    this machine the move is to 'cpu' (and 'meta', which has no data: every tensor must go)."""
    batch = rollout_batch()
    batch.old_logp = torch.zeros(batch.input_ids.shape)
    moved = batch.to("meta")
    for f in fields(batch):
        value, got = getattr(batch, f.name), getattr(moved, f.name)
        if value is None:
            assert got is None, f.name
        else:
            assert got.device.type == "meta" and got.shape == value.shape, f.name
            assert got.dtype == value.dtype, f.name
    same = batch.to("cpu")
    assert all(torch.equal(getattr(same, f.name), getattr(batch, f.name)) for f in fields(batch)
               if getattr(batch, f.name) is not None)


def _adam_first_step(lr, mult):
    from megatron_papo.train.config import OptimConfig
    from megatron_papo.train.loop import build_optimizer

    hf_config = Q.tiny_hf_config()
    spec = text_spec_from_hf(hf_config)
    initialize_model_parallel(1, 1)
    chunks = build_model_chunks(spec, use_distributed_optimizer=True)
    load_hf_weights(chunks, spec, Q.reference_model(hf_config).state_dict().__getitem__)
    optimizer = build_optimizer(chunks, OptimConfig(lr=lr, vision_lr_mult=mult, clip_grad=0.0),
                                torch.float32)
    before = {n: p.detach().clone() for n, p in chunks[0].named_parameters()}
    for p in chunks[0].parameters():  # the same gradient everywhere: Adam's first step is lr
        p.main_grad.fill_(1.0)
    optimizer.step()
    moved = {"vision": 0.0, "language": 0.0}
    for n, p in chunks[0].named_parameters():
        part = "vision" if "vision_model." in n else "language"
        moved[part] = max(moved[part], float((p.detach() - before[n]).abs().max()))
    return moved


def test_vision_tower_learning_rate_multiplier():
    """optim.vision_lr_mult: Adam's first step moves every parameter by its group's lr, so the
    vision tower moves 4x as far as the language model with a multiplier of 4 (and as far
    without one)."""
    (moved,) = run_distributed(_adam_first_step, 1, 1e-3, 4.0)
    assert moved["vision"] == pytest.approx(4e-3, rel=1e-3)
    assert moved["language"] == pytest.approx(1e-3, rel=1e-3)
    (moved,) = run_distributed(_adam_first_step, 1, 1e-3, 1.0)
    assert moved["vision"] == pytest.approx(1e-3, rel=1e-3)


def grouped_batch(multiple: int = 2) -> RolloutBatch:
    """Eight samples in three runs of one prompt each, as GRPO's n samples per prompt arrive:
    an image prompt with two responses (6 and 3 tokens), a text-only prompt with two (5 and 1)
    and an image prompt with four (4, 5, 2, 3: its segment, the row's last, is one token shorter
    than the first one's, so the attention pads it within their group); the image samples of
    a run share their image key."""
    base = rollout_batch()
    g = torch.Generator().manual_seed(8)
    prompts, images = [], []
    for i in (0, 1, 2):
        n = int(base.attention_mask[i].sum()) - 6
        prompts.append(base.input_ids[i, :n])
    grids = base.image_grid_thw
    patches = grids.prod(-1).tolist()
    pixels = torch.split(base.pixel_values, patches)
    masked = torch.split(base.masked_pixel_values, patches)
    images = [(pixels[0], masked[0], grids[0]), None, (pixels[1], masked[1], grids[1])]
    plan = [(0, 6), (0, 3), (1, 5), (1, 1), (2, 4), (2, 5), (2, 2), (2, 3)]
    rows = [torch.cat([prompts[p], torch.randint(2, Q.VISION_START, (r,), generator=g)])
            for p, r in plan]
    width = -(-max(len(r) for r in rows) // multiple) * multiple
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask, response = torch.zeros_like(ids), torch.zeros_like(ids)
    for k, ((p, r), row) in enumerate(zip(plan, rows)):
        ids[k, :len(row)] = row
        mask[k, :len(row)] = 1
        response[k, len(prompts[p]):len(row)] = 1
    used = [images[p] for p, _ in plan if images[p] is not None]
    grid = torch.stack([x[2] for x in used])
    return RolloutBatch(
        input_ids=ids, attention_mask=mask, response_mask=response,
        position_ids=get_rope_index(ids, grid, Q.IMAGE_TOKEN, attention_mask=mask),
        advantages=torch.randn(len(rows), generator=g),
        pixel_values=torch.cat([x[0] for x in used]), image_grid_thw=grid,
        images_per_sample=torch.tensor([int(images[p] is not None) for p, _ in plan]),
        masked_pixel_values=torch.cat([x[1] for x in used]),
        image_keys=torch.tensor([p for p, _ in plan if images[p] is not None]))


def _grouped_update(tp, pp, mode, share, sp=False, micro=8):
    spec, chunks, updater = _policy(tp, pp, mode, sp=sp, micro=micro, mini=8, packing=True)
    updater.config.share_prompts = share
    rows = []
    for chunk in chunks:
        for module in chunk.modules():
            if type(module).__name__ == "PackedDotProductAttention":
                module.register_forward_pre_hook(
                    lambda m, a, k: rows.append(int(k["packed_seq_params"].cu_seqlens_q[-1])),
                    with_kwargs=True)
    batch = grouped_batch()
    g = torch.Generator().manual_seed(5)
    current = updater.compute_logprobs(batch)
    batch.old_logp = current + 0.3 * torch.randn(current.shape, generator=g)
    batch.ref_logp = current + 0.2 * torch.randn(current.shape, generator=g)
    masked = updater.compute_logprobs(batch, masked=True)
    if mode == "frozen":
        batch.masked_logp = masked
    grads, step = {}, updater.optimizer.step

    def record_then_step():  # the gradients themselves (Adam's first step is sign(g) * lr)
        for chunk in chunks:
            grads.update({n: p.main_grad.clone() for n, p in chunk.named_parameters()})
        return step()
    updater.optimizer.step = record_then_step
    (metrics,) = updater.update(batch)
    return dict(metrics=metrics, grads=grads, current=current, masked=masked, rows=rows,
                last=parallel_state.is_pipeline_last_stage(), tokens=batch.attention_mask.bool())


@pytest.mark.parametrize("mode,layouts", [
    ("frozen", [(1, 1, False, 8), (1, 1, False, 2), (2, 1, True, 8), (1, 2, False, 2)]),
    ("live", [(1, 1, False, 8)])])
def test_shared_prompts_keep_the_update(mode, layouts):
    """Shared prompts (a micro-batch's samples with the same prompt run it once; responses of
    6, 3 / 5, 1 / 4, 5, 2, 3 tokens after an image, a text-only and another image prompt) against
    unshared packing on the same layout: log-probs of every token with the original and the
    masked images within 1e-6, the loss terms, and every gradient within 2e-6 of the largest
    (the prompt's hidden states sum their n responses' gradients in another order; compared
    before the optimizer: Adam's first step is sign(g) * lr, so near-zero gradients flip it), at
    TP 1 (one micro-batch, and four that cut the last run of prompts in two), TP 2 + SP, PP 2, and
    the live branch (original and masked copies shared apart). The shared rows are shorter."""
    for tp, pp, sp, micro in layouts:
        plain = run_distributed(_grouped_update, tp * pp, tp, pp, mode, False, sp=sp, micro=micro)
        shared = run_distributed(_grouped_update, tp * pp, tp, pp, mode, True, sp=sp, micro=micro)
        for r, ref in zip(shared, plain):
            assert sum(r["rows"]) < sum(ref["rows"]), (r["rows"], ref["rows"])
            mask = r["tokens"].clone()
            mask[:, 0] = False
            for key in ("current", "masked"):
                torch.testing.assert_close(r[key][mask], ref[key][mask], **PACK_TOL)
                assert torch.equal(r[key][~mask], torch.zeros_like(r[key][~mask]))
            if r["last"]:
                for key in ("loss/total", "loss/policy", "loss/kl_prcp", "clip/high",
                            "entropy/original", "entropy/masked"):
                    assert r["metrics"][key] == pytest.approx(ref["metrics"][key], rel=1e-6,
                                                              abs=1e-7), key
            assert r["metrics"]["grad_norm"] == pytest.approx(ref["metrics"]["grad_norm"],
                                                              rel=1e-6)
            scale = max(float(g.abs().max()) for g in ref["grads"].values())
            assert r["grads"].keys() == ref["grads"].keys()
            for name, grad in r["grads"].items():
                torch.testing.assert_close(grad, ref["grads"][name], rtol=0, atol=2e-6 * scale,
                                           msg=name)

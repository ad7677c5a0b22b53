"""The vLLM rollout bridge, proved by equalities: weights pushed from Megatron (any TP/PP) give the
same greedy tokens as a fresh engine loaded from the HF export; engine log-probs equal our
recomputation; vision tokens are never sampled nor scored; engine and trainer see identical
inputs; a push's extra memory is bounded by the bucket; bad inputs fail before generation."""

import pytest
import torch

import rollout_utils as R
from megatron_papo.rollout import iter_hf_weights
from megatron_papo.testing import run_distributed
from megatron_papo.testing.tiny import write_tiny_checkpoint

SMALL_BUCKET = 96 * 1024  # many buckets per push: the packing and the PP broadcast are exercised


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Two tiny fp32 HF folders with different weights (seed 0 and seed 1)."""
    root = tmp_path_factory.mktemp("rollout")
    out = []
    for seed in (0, 1):
        folder = str(root / f"hf{seed}")
        write_tiny_checkpoint(folder, dtype=torch.float32, seed=seed)
        out.append(folder)
    return out


def _fresh_engine_tokens(hf_dir):
    eng = R.engine(hf_dir)
    try:
        return R.greedy(eng)
    finally:
        eng.close()


def _push_and_generate(hf0, hf1, tp, pp):
    spec, chunks = R.policy(hf0, tp, pp)
    eng = R.engine(hf1)  # starts with the OTHER weights: the first push must replace them
    try:
        before = R.greedy(eng)
        stats = eng.load_weights(iter_hf_weights(chunks, spec, torch.float32, SMALL_BUCKET))
        first = R.greedy(eng)
        R.set_weights(chunks, spec, hf1)
        eng.load_weights(iter_hf_weights(chunks, spec, torch.float32, SMALL_BUCKET))
        second = R.greedy(eng)
        R.set_weights(chunks, spec, hf0)
        eng.load_weights(iter_hf_weights(chunks, spec, torch.float32, SMALL_BUCKET))
        restored = R.greedy(eng)
    finally:
        eng.close()
    return dict(before=before, first=first, second=second, restored=restored, stats=stats)


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (1, 2), (2, 2)])
def test_pushed_weights_generate_like_a_fresh_engine(folders, tp, pp):
    """Greedy tokens (text and image prompts) after a push from TP x PP equal a fresh engine's on
    the HF folder of the same weights; a push of other weights changes them (to that folder's
    tokens); pushing the originals back restores them exactly (no stale prefix/encoder cache)."""
    hf0, hf1 = folders
    (want0,) = run_distributed(_fresh_engine_tokens, 1, hf0)
    (want1,) = run_distributed(_fresh_engine_tokens, 1, hf1)
    assert want0[0] != want1[0] and all(len(t) == 10 for t in want0[0])
    for r in run_distributed(_push_and_generate, tp * pp, hf0, hf1, tp, pp, timeout=600):
        assert r["before"][0] == want1[0]
        for got, want in [(r["first"], want0), (r["second"], want1), (r["restored"], want0)]:
            assert got[0] == want[0]  # tokens, exactly
            torch.testing.assert_close(got[1], want[1], rtol=0, atol=1e-4)  # and their log-probs
        assert torch.equal(r["restored"][1], r["first"][1])
        assert r["stats"]["tensors"] > 0


def _logprob_parity(hf0, tp):
    from megatron_papo.rl.step import PolicyUpdater, UpdateConfig
    from megatron_papo.rollout import SamplingConfig, build_rollout_batch

    spec, chunks = R.policy(hf0, tp, 1)
    eng = R.engine(hf0)
    out = {}
    try:
        for temperature in (1.0, 0.7):
            sampling = SamplingConfig(n=3, temperature=temperature, max_new_tokens=12, seed=7)
            batch_prompts = R.prompts()
            rollouts = eng.generate(batch_prompts, sampling)  # this rank's training slice
            batch = build_rollout_batch(batch_prompts, rollouts, eng.encoder, pad_multiple=tp)
            updater = PolicyUpdater(chunks, None, UpdateConfig(
                micro_batch_size=2, mini_batch_size=2, temperature=temperature,
                suppressed_token_ids=eng.suppressed_token_ids))
            ours = updater.compute_logprobs(batch)
            mask = batch.response_mask.bool()
            out[temperature] = dict(
                ours=ours[mask], engine=batch.rollout_logp[mask],
                indices=[r.index for r in rollouts], samples=len(batch),
                images=int(batch.images_per_sample.sum()) if batch.images_per_sample is not None
                else 0)
    finally:
        eng.close()
    return out


@pytest.mark.parametrize("tp", [1, 2])
def test_engine_logprobs_equal_megatron_recomputation(folders, tp):
    """Sampled responses (n=3, text and image prompts) at temperature 1.0 and 0.7: the engine's
    per-token log-probs equal our Megatron model's recomputation of the same tokens through the
    RolloutBatch (fp32, tol 1e-3). TP=1 on 2 ranks = training DP 2: each rank gets half of the
    prompts (the training layout); TP=2: both ranks hold all of them."""
    results = run_distributed(_logprob_parity, 2, folders[0], tp, timeout=600)
    for temperature in (1.0, 0.7):
        for r in results:
            got = r[temperature]
            assert got["ours"].numel() > 20 and got["images"] > 0
            torch.testing.assert_close(got["ours"], got["engine"], rtol=0, atol=1e-3)
        slices = [r[temperature]["indices"] for r in results]
        if tp == 1:
            assert slices == [[0, 1], [2, 3]]
        else:
            assert slices == [[0, 1, 2, 3], [0, 1, 2, 3]]
        assert all(r[temperature]["samples"] == 3 * len(s) for r, s in zip(results, slices))


def _vision_tokens(hf_pad, tp):
    from megatron_papo.models.qwen2_5_vl.provider import forward_logits
    from megatron_papo.rl.logprobs import sampling_logits, token_logprobs
    from megatron_papo.rollout import SamplingConfig, build_rollout_batch

    spec, chunks = R.policy(hf_pad, tp, 1)
    eng = R.engine(hf_pad)
    try:
        batch_prompts = R.prompts()
        rollouts = eng.generate(batch_prompts, SamplingConfig(n=4, max_new_tokens=16, seed=1),
                                dp_rank=0, dp_size=1)
        sampled = [t for r in rollouts for resp in r.responses for t in resp.token_ids]
        batch = build_rollout_batch(batch_prompts, rollouts, eng.encoder, pad_multiple=tp)
        local = forward_logits(chunks, batch.input_ids, batch.position_ids, batch.attention_mask,
                               batch.pixel_values, batch.image_grid_thw, gather_vocab=False)
        full = forward_logits(chunks, batch.input_ids, batch.position_ids, batch.attention_mask,
                              batch.pixel_values, batch.image_grid_thw)
        favoured = full.argmax(-1)[batch.response_mask.bool()]
        scored = {}
        for token in eng.suppressed_token_ids:
            targets = torch.full(batch.input_ids.shape, token)
            logp = token_logprobs(sampling_logits(local, 1.0, eng.suppressed_token_ids), targets)
            scored[token] = float(logp.exp().max())
    finally:
        eng.close()
    return dict(sampled=sampled, favoured=favoured, scored=scored,
                suppressed=eng.suppressed_token_ids)


@pytest.mark.parametrize("tp", [1, 2])
def test_vision_tokens_are_never_sampled_and_score_zero(tmp_path, tp):
    """A model whose output rows make <|image_pad|> / <|video_pad|> the argmax almost everywhere:
    the engine never samples a vision special token (nor a padding row), and the trainer-side
    scoring gives every suppressed id probability exactly 0 (vocab-parallel at TP=2)."""
    from megatron_papo.testing.tiny import IMAGE_TOKEN, VIDEO_TOKEN

    folder = str(tmp_path / "hf_pad")
    model = write_tiny_checkpoint(folder, dtype=torch.float32)
    with torch.no_grad():
        u = torch.randn(model.lm_head.weight.shape[1], generator=torch.Generator().manual_seed(0))
        model.lm_head.weight[IMAGE_TOKEN] = 50.0 * u
        model.lm_head.weight[VIDEO_TOKEN] = -50.0 * u
    model.save_pretrained(folder)
    for r in run_distributed(_vision_tokens, 2, folder, tp, timeout=600):
        assert {IMAGE_TOKEN, VIDEO_TOKEN} <= set(r["suppressed"])
        favoured = r["favoured"]
        share = ((favoured == IMAGE_TOKEN) | (favoured == VIDEO_TOKEN)).float().mean()
        assert share > 0.9, share  # unsuppressed, the model would pick a vision token
        assert len(r["sampled"]) > 100 and not set(r["sampled"]) & set(r["suppressed"])
        assert r["scored"] and all(p == 0.0 for p in r["scored"].values()), r["scored"]


def _capture_vision_inputs(worker):
    """Runs inside the engine: record the image grids its vision tower receives and the
    normalised pixels it computes (vLLM ships raw uint8 pixels and normalises them on the device:
    the normalisation's output is what both sides must agree on)."""
    store = []
    visual = worker.get_model().visual

    def grids(module, args, kwargs):
        grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
        store.append([None, torch.as_tensor(grid).clone()])

    def pixels(module, args, output):
        store[-1][0] = output.detach().float().clone()

    visual.register_forward_pre_hook(grids, with_kwargs=True)
    visual.input_norm.register_forward_hook(pixels)
    return store


def _engine_vs_trainer_inputs(hf0, sizes):
    eng = R.engine(hf0)
    try:
        (store,) = eng.llm.collective_rpc(_capture_vision_inputs)
        out = []
        for k, (h, w) in enumerate(sizes):
            prompt = R.user("how many circles", R.image(h, w, 10 + k))
            (rollout,) = eng.generate([prompt], R.GREEDY, dp_rank=0, dp_size=1)
            (encoded,) = eng.encoder.encode([prompt])
            engine_pixels, engine_grid = store[-1]
            out.append(dict(engine_ids=rollout.prompt_ids, ours_ids=encoded.input_ids.tolist(),
                            engine_pixels=engine_pixels, ours_pixels=encoded.pixel_values,
                            engine_grid=engine_grid.reshape(-1, 3),
                            ours_grid=encoded.image_grid_thw, calls=len(store)))
    finally:
        eng.close()
    return out


def test_engine_and_trainer_see_identical_inputs(folders):
    """Images of several sizes (small, upscaled to min_pixels; large, downscaled to max_pixels;
    odd aspect ratios): the prompt token ids the engine consumed, and the pixel values and image
    grids its vision tower received, equal the trainer-side processor's, exactly."""
    sizes = [(28, 28), (84, 112), (150, 61), (300, 400), (57, 333)]
    (results,) = run_distributed(_engine_vs_trainer_inputs, 1, folders[0], sizes)
    assert [r["calls"] for r in results] == list(range(1, len(sizes) + 1))
    grids = set()
    for r in results:
        assert r["engine_ids"] == r["ours_ids"]
        assert torch.equal(r["engine_grid"].long(), r["ours_grid"].long())
        # same resize; vLLM fuses rescale + normalise into one multiply-add (fp32 rounding)
        torch.testing.assert_close(r["engine_pixels"].reshape(r["ours_pixels"].shape),
                                   r["ours_pixels"], rtol=0, atol=1e-5)
        grids.add(tuple(r["ours_grid"][0].tolist()))
        pixels = r["ours_grid"][0, 1] * r["ours_grid"][0, 2] * 14 * 14
        assert 28 * 28 <= pixels <= 112 * 112  # the run's min/max pixels were applied
    assert len(grids) >= 4

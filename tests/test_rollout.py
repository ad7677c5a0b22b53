"""The vLLM rollout bridge, proved by equalities: weights pushed from Megatron (any TP/PP) give the
same greedy tokens as a fresh engine loaded from the HF export; engine log-probs equal our
recomputation; vision tokens are never sampled nor scored; engine and trainer see identical
inputs; a push's extra memory is bounded by the bucket; bad inputs fail before generation."""

import pytest
import torch

import rollout_utils as R
from megatron_papo.rollout import iter_hf_weights
from megatron_papo.testing import run_distributed
from megatron_papo.models.qwen2_5_vl.tiny import write_tiny_checkpoint

SMALL_BUCKET = 96 * 1024  # many buckets per push: the packing and the PP broadcast are exercised


def _two_folders(root, tied: bool) -> list[str]:
    out = []
    for seed in (0, 1):
        folder = str(root / f"hf{seed}")
        write_tiny_checkpoint(folder, tied=tied, dtype=torch.float32, seed=seed)
        out.append(folder)
    return out


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Two tiny fp32 HF folders with different weights (seed 0 and seed 1), untied heads."""
    return _two_folders(tmp_path_factory.mktemp("rollout"), tied=False)


@pytest.fixture(scope="module")
def tied_folders(tmp_path_factory):
    """The same with TIED embeddings (Qwen2.5-VL-3B's layout): the output head IS the embedding,
    the HF folders hold no lm_head tensor and the engine derives its head from the embedding."""
    return _two_folders(tmp_path_factory.mktemp("rollout_tied"), tied=True)


def _fresh_engine_tokens(hf_dir):
    eng = R.engine(hf_dir)
    try:
        return R.greedy(eng)
    finally:
        eng.close()


@pytest.fixture(scope="module")
def fresh(folders):
    """Greedy (tokens, log-probs) of a fresh engine loaded from each HF folder."""
    return [run_distributed(_fresh_engine_tokens, 1, folder)[0] for folder in folders]


@pytest.fixture(scope="module")
def tied_fresh(tied_folders):
    return [run_distributed(_fresh_engine_tokens, 1, folder)[0] for folder in tied_folders]


def _differ(a, b) -> bool:
    """Two greedy results differ in their tokens or in their log-probs (random TIED models tend
    to echo the last prompt token whatever the weights: their log-probs still tell them apart)."""
    return a[0] != b[0] or not torch.allclose(a[1], b[1], rtol=0, atol=1e-3)


def _pair(request, head: str):
    """(HF folders, fresh engines' greedy results) for an untied or tied head."""
    if head == "tied":
        return request.getfixturevalue("tied_folders"), request.getfixturevalue("tied_fresh")
    return request.getfixturevalue("folders"), request.getfixturevalue("fresh")


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


@pytest.mark.parametrize("head,tp,pp", [("untied", 1, 1), ("untied", 2, 1), ("untied", 1, 2),
                                         ("untied", 2, 2), ("tied", 1, 1), ("tied", 2, 1),
                                         ("tied", 1, 2)])
def test_pushed_weights_generate_like_a_fresh_engine(request, head, tp, pp):
    """Greedy tokens (text and image prompts) after a push from TP x PP equal a fresh engine's on
    the HF folder of the same weights; a push of other weights changes them (to that folder's
    tokens); pushing the originals back restores them exactly (no stale prefix/encoder cache).
    Tied heads too (PP 2: the last stage holds its own copy of the embedding, never exported):
    vLLM's head is derived from the embedding, and a reload that refreshed only the embedding
    served new rows with the OLD head (neither model)."""
    (hf0, hf1), (want0, want1) = _pair(request, head)
    assert _differ(want0, want1) and all(len(t) == 10 for t in want0[0])
    for r in run_distributed(_push_and_generate, tp * pp, hf0, hf1, tp, pp, timeout=600):
        assert r["before"][0] == want1[0]
        torch.testing.assert_close(r["before"][1], want1[1], rtol=0, atol=1e-4)
        for got, want in [(r["first"], want0), (r["second"], want1), (r["restored"], want0)]:
            assert got[0] == want[0]  # tokens, exactly
            torch.testing.assert_close(got[1], want[1], rtol=0, atol=1e-4)  # and their log-probs
        assert torch.equal(r["restored"][1], r["first"][1])
        assert r["stats"]["tensors"] > 0


def _logprob_parity(hf0, tp):
    from megatron_papo.rl.step import PolicyUpdater, UpdateConfig
    from megatron_papo.rollout import SamplingConfig, build_rollout_batch

    spec, chunks = R.policy(hf0, tp, 1)
    eng = R.engine(hf0, max_images_per_prompt=2)
    out = {}
    try:
        for temperature in (1.0, 0.7):
            sampling = SamplingConfig(n=3, temperature=temperature, max_new_tokens=12, seed=7)
            batch_prompts = R.prompts(two_images=True)
            rollouts = eng.generate(batch_prompts, sampling)  # this rank's training slice
            batch = build_rollout_batch(batch_prompts, rollouts, eng.encoder, pad_multiple=tp,
                                        mask_ratio=0.6, mask_seed=11)
            updater = PolicyUpdater(chunks, None, UpdateConfig(
                micro_batch_size=2, mini_batch_size=2, distribution=eng.distribution(sampling)))
            ours = updater.compute_logprobs(batch)
            mask = batch.response_mask.bool()
            masked = dict(ours=updater.compute_logprobs(batch, masked=True)[mask],
                          engine=R.engine_masked_scores(eng, batch_prompts, rollouts,
                                                        temperature, seed=11))
            if tp == 2 and temperature == 0.7:  # the same masked scores, trainer at PP 2
                from megatron.core import parallel_state
                parallel_state.destroy_model_parallel()
                _, pp_chunks = R.policy(hf0, 1, 2)
                pp_updater = PolicyUpdater(pp_chunks, None, updater.config)
                masked["ours_pp2"] = pp_updater.compute_logprobs(batch, masked=True)[mask]
            out[temperature] = dict(
                masked=masked, ours=ours[mask], engine=batch.rollout_logp[mask],
                indices=[r.index for r in rollouts], samples=len(batch),
                images=batch.images_per_sample.tolist() if batch.images_per_sample is not None
                else [])
    finally:
        eng.close()
    return out


@pytest.mark.parametrize("tp", [1, 2])
def test_engine_logprobs_equal_megatron_recomputation(folders, tp):
    """Sampled responses (n=3; prompts with 0, 1 and 2 images) at temperature 1.0 and 0.7: the
    engine's per-token log-probs equal our Megatron model's recomputation of the same tokens
    through the RolloutBatch (fp32, tol 1e-4). TP=1 on 2 ranks = training DP 2: each rank gets
    half of the prompts (the training layout); TP=2: both ranks hold all of them.

    PAPO's masked branch scored by the engine (``RolloutEngine.score`` with rl.masking's masked
    copies) equals the trainer's masked recomputation within 1e-4 at training TP 1 (DP 2), TP 2
    and PP 2, rollout TP 1; another mask seed or a missing temperature would differ by > 1e-2."""
    results = run_distributed(_logprob_parity, 2, folders[0], tp, timeout=600)
    for temperature in (1.0, 0.7):
        for r in results:
            got = r[temperature]
            assert got["ours"].numel() > 20 and sum(got["images"]) > 0
            torch.testing.assert_close(got["ours"], got["engine"], rtol=0, atol=1e-4)
            R.check_masked_scores(got["masked"]["engine"], got["masked"]["ours"])
            if "ours_pp2" in got["masked"]:
                R.check_masked_scores(got["masked"]["engine"], got["masked"]["ours_pp2"])
        slices = [r[temperature]["indices"] for r in results]
        if tp == 1:
            assert slices == [[0, 1], [2, 3]]
            assert results[1][temperature]["images"] == [1] * 3 + [2] * 3  # prompt 3: 2 images
        else:
            assert slices == [[0, 1, 2, 3], [0, 1, 2, 3]]
            assert results[0][temperature]["images"] == [1] * 3 + [0] * 3 + [1] * 3 + [2] * 3
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
    from megatron_papo.models.qwen2_5_vl.tiny import IMAGE_TOKEN, VIDEO_TOKEN

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


def _rollout_tp2(hf0, hf1, tp):
    from megatron_papo.rl.step import PolicyUpdater, UpdateConfig
    from megatron_papo.rollout import SamplingConfig, build_rollout_batch

    spec, chunks = R.policy(hf1, tp, 1)  # the policy holds the OTHER weights at first
    eng = R.engine(hf0, tensor_parallel_size=2)  # ONE engine sharded over both ranks
    try:
        from vllm.distributed import parallel_state as vps
        engine_tp = vps.get_tp_group().world_size
        eng.load_weights(iter_hf_weights(chunks, spec, torch.float32, SMALL_BUCKET))
        pushed_other = R.greedy(eng)
        R.set_weights(chunks, spec, hf0)
        eng.load_weights(iter_hf_weights(chunks, spec, torch.float32, SMALL_BUCKET))
        pushed = R.greedy(eng)
        sampling = SamplingConfig(n=2, temperature=0.7, max_new_tokens=10, seed=3)
        batch_prompts = R.prompts()
        rollouts = eng.generate(batch_prompts, sampling)
        batch = build_rollout_batch(batch_prompts, rollouts, eng.encoder, pad_multiple=tp)
        updater = PolicyUpdater(chunks, None, UpdateConfig(
            micro_batch_size=4, mini_batch_size=4, distribution=eng.distribution(sampling)))
        mask = batch.response_mask.bool()
        ours, engine_logp = updater.compute_logprobs(batch)[mask], batch.rollout_logp[mask]
        masked_batch = build_rollout_batch(batch_prompts, rollouts, eng.encoder,
                                           pad_multiple=tp, mask_ratio=0.6, mask_seed=5)
        masked = dict(ours=updater.compute_logprobs(masked_batch, masked=True)[mask],
                      engine=R.engine_masked_scores(eng, batch_prompts, rollouts, 0.7, seed=5))
    finally:
        eng.close()
    return dict(masked=masked, engine_tp=engine_tp, pushed_other=pushed_other, pushed=pushed,
                ours=ours,
                engine=engine_logp, indices=[r.index for r in rollouts])


@pytest.mark.parametrize("head,tp", [("untied", 1), ("untied", 2), ("tied", 2)])
def test_rollout_tensor_parallel_engine_over_the_world(request, head, tp):
    """Rollout TP 2 through vLLM's external launcher (the GPU cluster path, on CPU): one engine
    sharded over both ranks, fed from training TP=1 (DP 2: each rank pushes the full model) or
    TP=2 (untied and tied heads: each engine rank derives its vocabulary shard of the head from
    the pushed embedding). Greedy tokens and log-probs after pushes equal a fresh engine's on the
    same weights; sampled log-probs equal our recomputation (T 0.7, tol 1e-3); results arrive in
    the training layout. The engine's masked-branch scores equal the trainer's (1e-4) at rollout
    TP 2 too."""
    (hf0, hf1), (want0, want1) = _pair(request, head)
    results = run_distributed(_rollout_tp2, 2, hf0, hf1, tp, timeout=600)
    for r in results:
        assert r["engine_tp"] == 2
        assert r["pushed_other"][0] == want1[0] and r["pushed"][0] == want0[0]
        torch.testing.assert_close(r["pushed_other"][1], want1[1], rtol=0, atol=1e-4)
        torch.testing.assert_close(r["pushed"][1], want0[1], rtol=0, atol=1e-4)
        assert r["ours"].numel() > 10
        torch.testing.assert_close(r["ours"], r["engine"], rtol=0, atol=1e-3)
        R.check_masked_scores(r["masked"]["engine"], r["masked"]["ours"])
    expected = [[0, 1], [2, 3]] if tp == 1 else [[0, 1, 2, 3]] * 2
    assert [r["indices"] for r in results] == expected


def _bad_inputs(hf0):
    from megatron_papo.rollout import RolloutInputError, SamplingConfig

    eng = R.engine(hf0, max_model_len=128)
    calls = []
    real_generate = eng.llm.generate
    eng.llm.generate = lambda *a, **k: calls.append(1) or real_generate(*a, **k)
    good = R.prompts()
    cases = {
        "missing": R.user("x", None),
        "unreadable": R.user("x", b"not an image at all"),
        "no_file": R.user("x", "/nonexistent/image.png"),
        "tiny": R.user("x", R.image(20, 64)),
        "too_long": [{"role": "user", "content": "the area " * 200}],
        "not_messages": "just a string",
    }
    errors = {}
    try:
        for name, bad in cases.items():
            batch = good[:3] + [bad]  # the bad prompt sits in the LAST rank's share
            try:
                eng.generate(batch, R.GREEDY)
                errors[name] = None
            except RolloutInputError as err:
                errors[name] = str(err)
        for key, kwargs in {"n": dict(n=0), "temperature": dict(temperature=-0.5),
                            "top_p": dict(top_p=0.0), "max_new_tokens": dict(max_new_tokens=0)
                            }.items():
            try:
                SamplingConfig(**kwargs)
                errors[key] = None
            except RolloutInputError as err:
                errors[key] = str(err)
        generated_before = len(calls)
        still_works = R.greedy(eng)[0]
    finally:
        eng.close()
    return dict(errors=errors, generated_before=generated_before, still_works=still_works)


def test_bad_inputs_fail_before_generation_naming_the_field(folders):
    """Every rank raises the same one-line error before any generation (the bad prompt is in
    rank 1's share; rank 0 must not hang or generate); the engine stays usable."""
    results = run_distributed(_bad_inputs, 2, folders[0], timeout=600)
    assert results[0]["errors"] == results[1]["errors"]
    errors = results[0]["errors"]
    expect = {
        "missing": "prompt 3, message 0, content 0 ('image'): the image is missing",
        "unreadable": "prompt 3, message 0, content 0 ('image'): the image cannot be decoded",
        "no_file": "image file '/nonexistent/image.png' does not exist",
        "tiny": "image 64x20 px is below the processor's minimum side of 28 px",
        "too_long": "exceed rollout.max_model_len=128",
        "not_messages": "prompt 3: expected a non-empty list of chat messages",
        "n": "n=0 is invalid",
        "temperature": "temperature=-0.5 is invalid",
        "top_p": "top_p=0.0 is invalid",
        "max_new_tokens": "max_new_tokens=0 is invalid",
    }
    for name, fragment in expect.items():
        assert errors[name] is not None and fragment in errors[name], (name, errors[name])
        assert "\n" not in errors[name]
    for r in results:
        assert r["generated_before"] == 0
        assert len(r["still_works"]) == 4


def _push_memory(folder, tp, pp, bucket, dtype):
    from megatron_papo.rollout import PushStats

    spec, chunks = R.policy(folder, tp, pp)
    for _ in iter_hf_weights(chunks, spec, dtype, bucket):  # warm: first-call caches
        pass
    stats = PushStats()
    with R.PeakLive() as streamed:
        for _, tensor in iter_hf_weights(chunks, spec, dtype, bucket, stats=stats):
            streamed.sample()
            del tensor
    with R.PeakLive() as kept:  # the control: materialise the whole model at once
        everything = [(n, t.clone()) for n, t in iter_hf_weights(chunks, spec, dtype, bucket)]
    total = sum(t.numel() * t.element_size() for _, t in everything)
    largest = max(t.numel() * t.element_size() for _, t in everything)
    return dict(streamed=streamed.peak, kept=kept.peak, total=total, stats=stats,
                largest=largest, dtypes={t.dtype for _, t in everything})


@pytest.mark.parametrize("tp,pp,dtype", [(2, 1, "float32"), (1, 2, "float32"),
                                         (2, 1, "bfloat16")])
def test_push_memory_is_bounded_by_the_bucket(tmp_path, tp, pp, dtype):
    """A 35 MB (fp32) model pushed in 1 MiB buckets: the peak of live memory a push adds on any
    rank (TP gathers, bucket packing, the PP broadcast and receive) stays within one bucket plus
    the largest tensor (+2 MiB for the interpreter, gloo and the sampler: 1 MiB was exceeded by
    0.14 MiB once, with another test worker loading the machine); keeping the whole model, the
    control, exceeds that bound (so the measurement can see a leak). Pushed to a bf16 engine
    from fp32 weights (vocabulary 32,768: the embedding and head, 16 MiB each in fp32, are sent
    alone) the bound is the bf16 tensor's: the TP gather builds it in bf16 and the fp32 original
    is never whole (at 3B widths the fp32 gather + bf16 copy of the tied embedding added
    1.7 GiB per rank to the push)."""
    folder = str(tmp_path / "hf_big")
    write_tiny_checkpoint(folder, dtype=torch.float32, layers=8, intermediate_size=2048,
                          vocab_size=8192 if dtype == "float32" else 32768)
    bucket = 2**20
    for r in run_distributed(_push_memory, tp * pp, folder, tp, pp, bucket,
                             getattr(torch, dtype), timeout=600):
        bound = bucket + r["largest"] + 2 * 2**20
        assert r["dtypes"] == {getattr(torch, dtype)}
        assert r["stats"].largest_bucket_bytes <= bucket
        assert r["stats"].bytes == r["total"] > 2 * bound
        assert r["streamed"] <= bound, (r["streamed"], bound)
        assert r["kept"] > bound, (r["kept"], bound)


def _checksums(worker):
    model = worker.get_model()
    sums = {"visual": 0.0, "language": 0.0}
    for name, p in model.named_parameters():
        sums["visual" if name.startswith("visual.") else "language"] += float(
            p.detach().double().sum())
    return sums


def _language_only_push(hf0, hf1):
    from megatron_papo.rollout import PushStats

    spec, chunks = R.policy(hf0, 1, 1)
    eng = R.engine(hf1)
    try:
        (before,) = eng.llm.collective_rpc(_checksums)
        stats = PushStats()
        eng.load_weights(iter_hf_weights(chunks, spec, torch.float32, SMALL_BUCKET,
                                         include_vision=False, stats=stats))
        (after,) = eng.llm.collective_rpc(_checksums)
        tokens = R.greedy(eng)
    finally:
        eng.close()
    return dict(before=before, after=after, tokens=tokens, stats=stats)


def test_language_model_only_push_leaves_the_vision_tower(folders, fresh):
    """include_vision=False (frozen vision tower): no visual.* tensor travels, the engine's vision
    weights stay bit-identical, its language model takes the pushed weights (a text prompt then
    generates exactly like a fresh engine on those weights)."""
    (r,) = run_distributed(_language_only_push, 1, *folders)
    assert r["after"]["visual"] == r["before"]["visual"]
    assert r["after"]["language"] != r["before"]["language"]
    text_prompt = 1
    assert r["tokens"][0][text_prompt] == fresh[0][0][text_prompt]
    torch.testing.assert_close(r["tokens"][1][text_prompt], fresh[0][1][text_prompt], rtol=0,
                               atol=1e-4)
    assert r["stats"].tensors == 4 * 12 + 3  # 4 layers x 12, embeddings, final norm, lm_head


def test_gpu_engine_arguments_are_valid_vllm_arguments():
    """The GPU path cannot run here; its choices are checked against vLLM's real API: every
    argument is an EngineArgs field, rollout TP > 1 uses the external launcher, sleep mode is on
    and the KV cache is sized by memory share (CPU: explicit bytes, no chunked prefill); the sleep
    and wake calls the engine makes exist with those parameters."""
    import dataclasses
    import inspect

    from vllm import LLM, EngineArgs

    from megatron_papo.rollout import EngineConfig
    from megatron_papo.rollout.engine import llm_kwargs

    fields = {f.name for f in dataclasses.fields(EngineArgs)}
    config = EngineConfig("/models/qwen", dtype="bfloat16", tensor_parallel_size=2)
    gpu = llm_kwargs(config, {"size": {}}, [5, 6], on_gpu=True)
    cpu = llm_kwargs(EngineConfig("/models/qwen"), {"size": {}}, [5, 6], on_gpu=False)
    for kwargs in (gpu, cpu):
        assert set(kwargs) <= fields, set(kwargs) - fields
        assert kwargs["logprobs_mode"] == "processed_logprobs"
        assert kwargs["additional_config"]["megatron_papo_suppressed_token_ids"] == [5, 6]
    assert gpu["distributed_executor_backend"] == "external_launcher"
    assert gpu["enable_sleep_mode"] and 0 < gpu["gpu_memory_utilization"] <= 1
    assert "kv_cache_memory_bytes" not in gpu and "enable_chunked_prefill" not in gpu
    assert "distributed_executor_backend" not in cpu and cpu["enable_chunked_prefill"] is False
    assert "level" in inspect.signature(LLM.sleep).parameters
    assert "tags" in inspect.signature(LLM.wake_up).parameters
    # KV-cache blocks: any power of 2 on GPU; vLLM's CPU attention refuses non-multiples of 32
    # deep inside its start-up, so the setting is refused first, by name
    assert llm_kwargs(EngineConfig("/m", block_size=16), {}, [], on_gpu=True)["block_size"] == 16
    assert llm_kwargs(EngineConfig("/m", block_size=32), {}, [], on_gpu=False)["block_size"] == 32
    assert "block_size" not in cpu
    with pytest.raises(ValueError, match=r"block_size=16 is invalid on CPU.*multiple of 32"):
        llm_kwargs(EngineConfig("/m", block_size=16), {}, [], on_gpu=False)


def _big_seeded_batch(hf0):
    from megatron_papo.rollout import SamplingConfig

    eng = R.engine(hf0, max_model_len=256)
    try:
        batch = [R.user(f"the value of the angle {i} " * 6) for i in range(48)]
        sampling = SamplingConfig(n=4, temperature=1.0, max_new_tokens=4, seed=11)
        first = eng.generate(batch, sampling, dp_rank=0, dp_size=1)
        second = eng.generate(batch, sampling, dp_rank=0, dp_size=1)
    finally:
        eng.close()
    prompt_tokens = sum(len(r.prompt_ids) for r in first) * 4
    return ([[x.token_ids for x in r.responses] for r in first],
            [[x.token_ids for x in r.responses] for r in second], prompt_tokens)


def _vllm_own_prompt_logprobs(worker, on):
    from megatron_papo.compat import vllm as compat

    return compat.batched_prompt_logprobs(worker, False)


def _shared_prefill_scores(hf0):
    from unittest import mock

    from megatron_papo.compat import vllm as compat
    from megatron_papo.rollout import ScoreRequest

    # blocks of 32 tokens (the CPU kernels' smallest) and prompts of 60-80 tokens (big images)
    eng = R.engine(hf0, block_size=32, max_pixels=224 * 224)
    try:
        batch = [R.user("what is the area of the triangle", R.image(224, 224, 1)),
                 R.user("the circle radius", R.image(168, 196, 2))]
        words = eng.encoder.tokenizer("the value of the angle is the sum of the area of the "
                                      "circle radius so we get the value of the triangle",
                                      add_special_tokens=False)["input_ids"]
        words = (words * 3)[:30]
        # four 30-token responses per prompt; the first two identical for 26 tokens, so that a
        # cache read not stopped at the prompt would reach into the responses
        responses = [words, words[:26] + words[:4], words[3:] + words[:3], words[::-1]]
        requests = [ScoreRequest(i, eng.encoder.encode_one(p, i).input_ids.tolist(), responses)
                    for i, p in enumerate(batch)]
        prompt_lengths = [len(r.prompt_ids) for r in requests]
        shared = eng.score(batch, requests, 0.7)
        stats = dict(eng.score_stats)
        eng.reset_caches()
        # every response prefills its prompt, and vLLM's own per-request prompt log-probs
        with mock.patch.object(compat, "cap_prefix_cache_hits", lambda llm: False), \
                mock.patch("megatron_papo.rollout.engine.batched_prompt_logprobs",
                           _vllm_own_prompt_logprobs):
            alone = eng.score(batch, requests, 0.7)
        stats_alone = dict(eng.score_stats)
    finally:
        eng.close()
    flat = [torch.tensor([v for per_prompt in out for resp in per_prompt for v in resp])
            for out in (shared, alone)]
    return dict(shared=flat[0], alone=flat[1], stats=stats, stats_alone=stats_alone,
                prompt_lengths=prompt_lengths)


def test_scored_responses_share_their_prompts_prefill(folders):
    """The engine's masked-branch scoring: the n responses of a prompt read the prompt's KV blocks
    from the prefix cache instead of prefilling it n times (vLLM never reads the cache for
    prompt log-probs on its own), and the prompt log-probs of a step's requests are computed
    at once; the log-probs equal those of a prefill of every response alone through vLLM's own
    per-request prompt log-probs (1e-5). The cache read stops at the prompt: two responses that
    share 26 tokens past a block boundary would otherwise take uncomputed log-probs from it."""
    (r,) = run_distributed(_shared_prefill_scores, 1, folders[0])
    assert min(r["prompt_lengths"]) > 32 and r["shared"].numel() == 2 * 4 * 30
    torch.testing.assert_close(r["shared"], r["alone"], rtol=0, atol=1e-5)
    assert r["stats_alone"]["prompt_tokens_cached"] == 0
    # each prompt prefilled once: its 3 other responses read >= one 32-token block of it
    assert r["stats"]["prompt_tokens_cached"] >= 2 * 3 * 32
    assert r["stats"]["prompt_tokens_cached"] <= 4 * sum(n - 1 for n in r["prompt_lengths"])


def test_seeded_batch_larger_than_a_scheduler_step(folders):
    """192 seeded requests whose prompts together exceed a scheduler step's token budget (more
    than twice vLLM's CPU default of 4096: with vLLM's defaults this run dies with "CPU Generator
    does not use offset", a seeded chunked prefill); the same seeds give the same samples."""
    (r,) = run_distributed(_big_seeded_batch, 1, folders[0])
    first, second, prompt_tokens = r
    assert prompt_tokens > 8192
    assert first == second and len(first) == 48 and all(len(s) == 4 for s in first)


def test_encoder_gives_the_processors_inputs(folders):
    """PromptEncoder.encode_one (image processor + placeholder expansion + tokenizer, without
    the processor's per-call overhead) gives exactly what the HF processor's __call__ gives:
    token ids, pixel values and grids of text-only, one-image and two-image prompts. A text that
    writes its own image placeholder is refused in one line."""
    from megatron_papo.rollout import PromptEncoder
    from megatron_papo.rollout.settings import RolloutInputError

    encoder = PromptEncoder(folders[0], min_pixels=28 * 28, max_pixels=112 * 112,
                            max_images_per_prompt=2)
    for index, messages in enumerate(R.prompts(two_images=True)):
        encoded = encoder.encode_one(messages, index)
        images = encoder.images(messages, index)
        reference = encoder.processor(text=[encoded.text], images=images or None,
                                      return_tensors="pt",
                                      **(encoder.processor_kwargs if images else {}))
        assert torch.equal(encoded.input_ids, reference["input_ids"][0])
        if images:
            assert torch.equal(encoded.pixel_values, reference["pixel_values"])
            assert torch.equal(encoded.image_grid_thw, reference["image_grid_thw"])
        else:
            assert encoded.pixel_values is None
    with pytest.raises(RolloutInputError, match="2 image placeholders for 1 images"):
        encoder.encode_one(R.user("a <|image_pad|> here", R.image(56, 56, 3)), 7)


def test_rollout_batch_layout_and_masked_images(folders):
    """build_rollout_batch on a hand-made rollout (no engine needed): every response is a sample
    with its prompt's images (in order), the length is padded to the TP multiple, the response
    mask and engine log-probs sit on the response tokens, positions are the 3-D MRoPE index, and
    the masked images are rl.masking's black patches on the RAW image run through the same
    processor (same grid, different pixels). Selecting samples keeps images with them."""
    from megatron_papo.models.qwen2_5_vl.rope_index import get_rope_index
    from megatron_papo.rl.masking import IMAGE_SEED_STRIDE, mask_image
    from megatron_papo.rollout import PromptEncoder, PromptRollout, Response, build_rollout_batch

    encoder = PromptEncoder(folders[0], min_pixels=28 * 28, max_pixels=112 * 112,
                            max_images_per_prompt=2)
    prompts = R.prompts(two_images=True)
    rollouts = []
    for index in (0, 1, 2, 3):
        (encoded,) = encoder.encode([prompts[index]])
        responses = [Response([40 + k, 41, 42][:k + 1], [-0.5 - k, -1.0, -1.5][:k + 1], "stop")
                     for k in range(3)]
        rollouts.append(PromptRollout(index, encoded.input_ids.tolist(), responses))
    batch = build_rollout_batch(prompts, rollouts, encoder, pad_multiple=4, mask_ratio=0.6,
                                mask_seed=9)
    assert len(batch) == 12 and batch.input_ids.shape[1] % 4 == 0
    assert batch.images_per_sample.tolist() == [1, 1, 1, 0, 0, 0, 1, 1, 1, 2, 2, 2]
    lengths = batch.attention_mask.sum(-1).tolist()
    for i, (r, k) in enumerate((r, k) for r in rollouts for k in range(3)):
        n_prompt = len(r.prompt_ids)
        assert lengths[i] == n_prompt + k + 1
        assert batch.input_ids[i, :n_prompt].tolist() == r.prompt_ids
        assert batch.response_mask[i].nonzero().flatten().tolist() == list(
            range(n_prompt, n_prompt + k + 1))
        assert batch.rollout_logp[i, n_prompt:n_prompt + k + 1].tolist() == r.responses[k].logprobs
    assert torch.equal(batch.position_ids, get_rope_index(
        batch.input_ids, batch.image_grid_thw, encoder.image_token_id, 2, batch.attention_mask))
    first, _, third, fourth = encoder.encode(prompts)
    masked = [torch.cat([encoder.pixel_values([mask_image(im, 0.6, 14, seed=9 + i *
                                                          IMAGE_SEED_STRIDE + k)])
                         for k, im in enumerate(e.images)])
              for i, e in ((0, first), (2, third), (3, fourth))]
    p0, p2, p3 = (e.pixel_values.shape[0] for e in (first, third, fourth))
    assert batch.pixel_values.shape[0] == 3 * (p0 + p2 + p3)
    assert torch.equal(batch.pixel_values[:p0], first.pixel_values)
    assert torch.equal(batch.masked_pixel_values[:p0], masked[0])
    assert torch.equal(batch.masked_pixel_values[3 * p0 + 2 * p2:3 * (p0 + p2)], masked[1])
    assert torch.equal(batch.masked_pixel_values[-p3:], masked[2])
    assert not torch.equal(batch.masked_pixel_values, batch.pixel_values)
    # image keys: one per image, shared by a prompt's samples, distinct between images
    assert batch.image_keys.tolist() == [0, 0, 0, 1, 1, 1, 2, 3, 2, 3, 2, 3]
    pair = batch.paired()  # the masked copies are other images: other keys
    assert pair.image_keys.tolist() == batch.image_keys.tolist() + [
        k + 4 for k in batch.image_keys.tolist()]
    part = batch.select(5, 8)  # text sample, then two samples of the third prompt
    assert part.image_keys.tolist() == [1, 1]
    assert part.images_per_sample.tolist() == [0, 1, 1]
    assert torch.equal(part.pixel_values, torch.cat([third.pixel_values] * 2))
    assert torch.equal(part.masked_pixel_values, torch.cat([masked[1]] * 2))


def test_data_parallel_shares_keep_every_mini_batch_the_same_prompts():
    """Four mini-batches of 16 prompts: at DP 2 rank r's k-th quarter is the r-th half of the
    DP 1 k-th quarter (the same prompts in every optimizer step at any DP size); the shares
    cover the batch once; blocks that do not divide evenly fall back to contiguous shares."""
    from megatron_papo.rollout.engine import data_parallel_share

    whole = data_parallel_share(64, 1, 0, 4)
    assert whole == list(range(64))
    shares = [data_parallel_share(64, 2, r, 4) for r in (0, 1)]
    assert sorted(shares[0] + shares[1]) == whole
    for k in range(4):
        assert shares[0][8 * k:8 * k + 8] + shares[1][8 * k:8 * k + 8] == whole[16 * k:16 * k + 16]
    assert data_parallel_share(6, 2, 1, 4) == [3, 4, 5]

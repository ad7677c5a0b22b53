"""Shared pieces of the rollout tests: prompts with images of several sizes, a policy built from
an HF folder at any TP/PP, an engine, greedy generation."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from megatron_papo.conversion import checkpoint as ck
from megatron_papo.models.qwen2_5_vl import load_hf_config, text_spec_from_hf
from megatron_papo.models.qwen2_5_vl.provider import build_model_chunks
from megatron_papo.parallel import initialize_model_parallel
from megatron_papo.rollout import EngineConfig, RolloutEngine, SamplingConfig
from megatron_papo.testing.memory import PeakLive  # noqa: F401  (used by the tests)

KV_MB = 16


def image(height: int, width: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))


def user(text: str, *images) -> list:
    content = [{"type": "image", "image": img} for img in images]
    content.append({"type": "text", "text": text})
    return [{"role": "user", "content": content}]


def prompts(two_images: bool = False) -> list:
    """Text-only and image prompts; images of several sizes and aspect ratios. ``two_images``:
    the last prompt shows two images of different sizes (0, 1 and 2 images in one batch)."""
    last = (user("so we get the value", image(56, 56, 3), image(42, 70, 4)) if two_images
            else user("so we get the value", image(56, 56, 3)))
    return [
        user("what is the area of the triangle", image(84, 112, 1)),
        [{"role": "user", "content": "the sum of the angle is"}],
        user("the circle radius", image(150, 61, 2)),
        last,
    ]


def policy(hf_dir: str, tp: int = 1, pp: int = 1):
    """(spec, model chunks without DDP) of the HF folder at TP x PP."""
    spec = text_spec_from_hf(load_hf_config(hf_dir))
    initialize_model_parallel(tp, pp)
    chunks = build_model_chunks(spec, tp, pp, ddp=False)
    ck.load_hf_folder(chunks, spec, hf_dir)
    return spec, chunks


def engine(hf_dir: str, **overrides) -> RolloutEngine:
    config = dict(model_path=hf_dir, max_model_len=512,
                  kv_cache_mb=KV_MB, min_pixels=28 * 28, max_pixels=112 * 112)
    config.update(overrides)
    return RolloutEngine(EngineConfig(**config))


GREEDY = SamplingConfig(n=1, temperature=0.0, max_new_tokens=10)


def greedy(eng: RolloutEngine, batch: list | None = None):
    """(greedy tokens, their log-probs) of every prompt (the whole batch on every rank)."""
    out = eng.generate(batch or prompts(), GREEDY, dp_rank=0, dp_size=1)
    return ([r.responses[0].token_ids for r in out],
            torch.tensor([r.responses[0].logprobs for r in out]))


def set_weights(chunks, spec, hf_dir: str) -> None:
    with torch.no_grad():
        ck.load_hf_folder(chunks, spec, hf_dir)


def engine_masked_scores(eng: RolloutEngine, prompts: list, rollouts: list, temperature: float,
                         seed: int, ratio: float = 0.6) -> dict:
    """The engine's masked-image log-probs of every sampled token (flat, in batch order) with
    the masks of ``seed`` (also through the plain path, for a vLLM without the render-once entry
    points); and two controls: the masks of another seed, and another temperature (1.0, i.e.
    none, or 0.5 when it is 1.0)."""
    from megatron_papo.rl.masking import masked_copies
    from megatron_papo.rollout import ScoreRequest

    requests = [ScoreRequest(r.index, r.prompt_ids, [x.token_ids for x in r.responses])
                for r in rollouts]

    def scores(t, s):
        out = eng.score(prompts, requests, t,
                        images=lambda i, images: masked_copies(images, i, ratio, 14, s))
        return torch.tensor([v for per_prompt in out for resp in per_prompt for v in resp])

    from unittest import mock

    from megatron_papo.compat import vllm as compat

    # vLLM without the render-once entry points: the plain path (one generate request each)
    with mock.patch("megatron_papo.rollout.engine.generate_continuations",
                    compat._generate_continuations_plainly):
        plain = scores(temperature, seed)
    return dict(masked=scores(temperature, seed), plain=plain,
                other_seed=scores(temperature, seed + 1),
                other_temperature=scores(1.0 if temperature != 1.0 else 0.5, seed))


def check_masked_scores(engine: dict, ours: torch.Tensor) -> None:
    """Engine = our recomputation (1e-4), and the controls differ (the test would see a wrong
    mask or a missing temperature)."""
    assert ours.numel() > 10
    torch.testing.assert_close(engine["masked"], ours, rtol=0, atol=1e-4)
    torch.testing.assert_close(engine["plain"], engine["masked"], rtol=0, atol=1e-5)
    assert (engine["other_seed"] - ours).abs().max() > 1e-2
    assert (engine["other_temperature"] - ours).abs().max() > 1e-2

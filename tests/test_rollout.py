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

"""PAPO/GRPO loss terms vs independent float64 computations written here from the formulas
(PAPO_ALGORITHM.md, arXiv 2507.06448), on random inputs with padding; the image masking."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from megatron_papo.rl import algorithms as A
from megatron_papo.rl.masking import mask_image, patch_keep_mask
from megatron_papo.settings import SettingError
from megatron_papo.train.config import ConfigError, algorithm_names, algorithm_preset


def _loss(name: str, **overrides) -> A.LossConfig:
    """The loss of the main job's algorithm option ``name`` (configs/algorithm/<name>.yaml)."""
    return algorithm_preset(name, **overrides).loss

B, T = 5, 7


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    old = logp + 0.4 * torch.randn(B, T, generator=g, dtype=torch.float64)
    ref = logp + 0.5 * torch.randn(B, T, generator=g, dtype=torch.float64)
    masked = logp + 2.0 * torch.randn(B, T, generator=g, dtype=torch.float64)
    masked[0, 0] = logp[0, 0] + 30.0   # exercise the [-20, 20] log-ratio clamp
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    adv[1] = -2.0
    adv[0] = 1.0
    old[1, 0] = logp[1, 0] - 1.5  # ratio 4.5 with A < 0: the dual clip binds
    old[0, 1] = logp[0, 1] - 0.5  # ratio 1.65 with A > 0: the high clip binds
    mask = torch.ones(B, T, dtype=torch.float64)
    mask[2, 4:] = 0   # padding
    mask[3, 1:] = 0
    mask[4] = 0       # an empty response
    return dict(logp=logp, old=old, ref=ref, masked=masked, adv=adv, mask=mask)


def _tokens(mask):
    return [(b, t) for b in range(B) for t in range(T) if mask[b, t] > 0]


def ref_policy_token(lp, old, a, eps_low=0.2, eps_high=0.3, c=3.0):
    ratio = math.exp(lp - old)
    loss = max(-a * ratio, -a * min(max(ratio, 1 - eps_low), 1 + eps_high))
    if a < 0 and c is not None:
        loss = min(loss, -a * c)
    return loss


def ref_k3(lp, other, inner=None, outer=10.0):
    d = other - lp
    if inner is not None:
        d = min(max(d, -inner), inner)
    return min(max(math.exp(d) - d - 1, -outer), outer)


def token_mean(values, mask):
    toks = _tokens(mask)
    return sum(values[b][t] for b, t in toks) / len(toks)


def test_group_advantages_match_formula():
    rewards = torch.tensor([1.0, 0.0, 0.5, 1.0, 1.0, 0.2], dtype=torch.float64)
    groups = torch.tensor([0, 0, 0, 1, 1, 2])
    adv = A.group_advantages(rewards, groups)
    for gid in (0, 1):
        members = [i for i in range(6) if groups[i] == gid]
        vals = [rewards[i].item() for i in members]
        mean = sum(vals) / len(vals)
        std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1))
        for i in members:
            assert adv[i].item() == pytest.approx((rewards[i].item() - mean) / (std + 1e-6),
                                                  rel=1e-6, abs=1e-6)
    assert adv[5].item() == 0.0  # a group of one


def test_clipped_policy_loss_and_clip_fractions(batch):
    out = A.clipped_policy_loss(batch["logp"], batch["old"], batch["adv"])
    for b in range(B):
        for t in range(T):
            lp, old, a = batch["logp"][b, t].item(), batch["old"][b, t].item(), batch["adv"][b].item()
            assert out.loss[b, t].item() == pytest.approx(ref_policy_token(lp, old, a), abs=1e-12)
            ratio = math.exp(lp - old)
            assert bool(out.clipped_high[b, t]) == (a > 0 and ratio > 1.3)
            assert bool(out.clipped_dual[b, t]) == (a < 0 and -a * max(ratio, 0.8) > -a * 3.0)
            assert bool(out.clipped_low[b, t]) == (a < 0 and ratio < 0.8
                                                   and not bool(out.clipped_dual[b, t]))
    assert out.clipped_dual.any() and out.clipped_high.any()


def test_reference_kl_k3(batch):
    kl = A.k3_kl(batch["logp"], batch["ref"])
    for b, t in _tokens(batch["mask"]):
        assert kl[b, t].item() == pytest.approx(
            ref_k3(batch["logp"][b, t].item(), batch["ref"][b, t].item()), abs=1e-12)


@pytest.mark.parametrize("clip", [None, (0.0, 0.2)])
def test_perception_kl_with_clamps(batch, clip):
    kl = A.perception_kl(batch["logp"], batch["masked"], clip=clip)
    for b, t in _tokens(batch["mask"]):
        want = ref_k3(batch["logp"][b, t].item(), batch["masked"][b, t].item(), inner=20.0)
        if clip:
            want = min(max(want, 0.0), 0.2)
        assert kl[b, t].item() == pytest.approx(want, abs=1e-12)
    assert kl[0, 0].item() == 10.0 if clip is None else 0.2  # clamped


def test_entropies(batch):
    assert torch.equal(A.sampled_token_entropy(batch["logp"]), -batch["logp"])
    logits = torch.randn(2, 3, 11, dtype=torch.float64)
    h = A.exact_entropy(logits)
    for i in range(2):
        for j in range(3):
            z = [math.exp(v) for v in logits[i, j].tolist()]
            p = [v / sum(z) for v in z]
            assert h[i, j].item() == pytest.approx(-sum(q * math.log(q) for q in p), abs=1e-9)


def test_aggregation_modes_ignore_padding_and_empty_sequences(batch):
    v = torch.randn(B, T, dtype=torch.float64)
    v[batch["mask"] == 0] = 1e6  # padding values must not leak
    m = batch["mask"]
    assert A.aggregate(v, m, "token-mean").item() == pytest.approx(token_mean(v.tolist(), m))
    seqs = [b for b in range(B) if m[b].sum() > 0]
    sums = [sum(v[b, t].item() for t in range(T) if m[b, t] > 0) for b in seqs]
    counts = [m[b].sum().item() for b in seqs]
    assert A.aggregate(v, m, "seq-mean-token-sum").item() == pytest.approx(sum(sums) / len(seqs))
    assert A.aggregate(v, m, "seq-mean-token-mean").item() == pytest.approx(
        sum(s / c for s, c in zip(sums, counts)) / len(seqs))
    with pytest.raises(ValueError, match="token-mean"):
        A.aggregate(v, m, "mean")


@pytest.mark.parametrize("name", algorithm_names())
def test_combined_loss_equals_weighted_formula_sum(batch, name):
    config = _loss(name)
    inputs = A.LossInputs(logp=batch["logp"], mask=batch["mask"], advantages=batch["adv"],
                          old_logp=batch["old"], ref_logp=batch["ref"],
                          masked_logp=batch["masked"])
    loss, parts = A.combined_loss(inputs, config)
    lp, m = batch["logp"].tolist(), batch["mask"]
    pol = [[ref_policy_token(lp[b][t], batch["old"][b, t].item(), batch["adv"][b].item(),
                             config.eps_low, config.eps_high, config.dual_clip)
            for t in range(T)] for b in range(B)]
    kl = [[ref_k3(lp[b][t], batch["ref"][b, t].item()) for t in range(T)] for b in range(B)]
    prcp = [[ref_k3(lp[b][t], batch["masked"][b, t].item(), inner=20.0) for t in range(T)]
            for b in range(B)]
    ent = [[-lp[b][t] for t in range(T)] for b in range(B)]
    ent_m = [[-batch["masked"][b, t].item() for t in range(T)] for b in range(B)]
    want = (token_mean(pol, m) + config.kl_beta * token_mean(kl, m)
            - config.prcp_gamma * token_mean(prcp, m)
            + config.entropy_eta_original * token_mean(ent, m)
            + config.entropy_eta_masked * token_mean(ent_m, m))
    assert loss.item() == pytest.approx(want, abs=1e-12)
    assert ("kl_prcp" in parts) == (config.prcp_gamma > 0)
    assert ("kl_ref" in parts) == (config.kl_beta > 0)


def test_presets_follow_the_paper():
    assert _loss("grpo").prcp_gamma == 0 and _loss("grpo").kl_beta == 0.01
    assert _loss("papo").prcp_gamma == 0.01 and _loss("papo").kl_beta == 0.01
    assert _loss("papo_h").prcp_gamma == 0.02 and _loss("papo_h").entropy_eta_masked == 0.03
    assert _loss("papo_no_kl_ref").kl_beta == 0.0
    # the dataclass's defaults are the main job's default algorithm, not a third set of numbers
    assert A.LossConfig() == _loss("papo_no_kl_ref")
    with pytest.raises(ConfigError, match=r"^algorithm\.loss\.aggregation='mean': choose"):
        _loss("papo", aggregation="mean")
    with pytest.raises(ConfigError, match=r"^algorithm\.loss\.gama is not a setting"):
        _loss("papo", gama=0.1)
    # the config names its own field; the caller adds where it sits
    with pytest.raises(SettingError) as err:
        A.LossConfig(prcp_gamma=-1.0)
    assert (err.value.field, err.value.under("algorithm.loss")) == (
        "prcp_gamma", "algorithm.loss.prcp_gamma must be >= 0, got -1.0")


def test_missing_branch_is_a_clear_error(batch):
    inputs = A.LossInputs(logp=batch["logp"], mask=batch["mask"], advantages=batch["adv"],
                          old_logp=batch["old"], ref_logp=batch["ref"])
    with pytest.raises(ValueError, match=r"kl_prcp.*masked_logp"):
        A.combined_loss(inputs, _loss("papo"))


# --------------------------------------------------------------------------- masking


def _random_image(h, w, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(1, 256, size=(h, w, 3), dtype=np.uint8)  # no black pixel to start with


@pytest.mark.parametrize("h,w", [(140, 210), (150, 97)])
def test_masking_blackens_whole_patches_only(h, w):
    image = _random_image(h, w)
    out = mask_image(image, ratio=0.6, patch=14, seed=3)
    assert out.shape == image.shape and out.dtype == image.dtype
    decisions = patch_keep_mask(h, w, 0.6, 14, 3)
    for i in range(decisions.shape[0]):
        for j in range(decisions.shape[1]):
            block = out[i * 14:(i + 1) * 14, j * 14:(j + 1) * 14]
            original = image[i * 14:(i + 1) * 14, j * 14:(j + 1) * 14]
            if decisions[i, j]:
                assert (block == 0).all()
            else:
                assert (block == original).all()


def test_masking_rate_and_reproducibility():
    decisions = patch_keep_mask(1400, 1400, ratio=0.6, patch=14, seed=11)  # 10,000 patches
    assert abs(decisions.float().mean().item() - 0.6) < 0.02  # 4 standard deviations
    assert torch.equal(decisions, patch_keep_mask(1400, 1400, 0.6, 14, 11))
    assert not torch.equal(decisions, patch_keep_mask(1400, 1400, 0.6, 14, 12))


def test_masking_pil_keeps_size_and_mode():
    image = Image.fromarray(_random_image(56, 84))
    out = mask_image(image, seed=1)
    assert out.size == image.size and out.mode == image.mode
    assert (np.array(out) == 0).all(-1).any()


# --------------------------------------------------------------------------- DAPO


def test_dapo_presets_are_configuration():
    for name in ("dapo", "papo_d"):
        c = _loss(name)
        assert (c.eps_low, c.eps_high, c.dual_clip, c.kl_beta, c.aggregation) == \
            (0.2, 0.28, None, 0.0, "token-mean"), name
    assert _loss("dapo").prcp_gamma == 0 and not _loss("dapo").needs_masked_branch
    d = _loss("papo_d")
    assert (d.prcp_gamma, d.entropy_eta_original, d.entropy_eta_masked) == (0.01, 0.03, 0.03)


def test_overlong_penalty_matches_its_formula():
    """R = 0 for |y| <= L_max - L_cache, ((L_max - L_cache) - |y|) / L_cache up to L_max, -1
    beyond (DAPO eq. 13), times the factor."""
    l_max, l_cache = 20, 8
    lengths = torch.arange(0, 26)
    expected = []
    for n in lengths.tolist():
        if n <= l_max - l_cache:
            expected.append(0.0)
        elif n <= l_max:
            expected.append(((l_max - l_cache) - n) / l_cache)
        else:
            expected.append(-1.0)
    got = A.overlong_penalty(lengths, l_max, l_cache, factor=0.5)
    assert torch.allclose(got.double(), 0.5 * torch.tensor(expected, dtype=torch.float64),
                          atol=1e-7)
    assert got[20] == -0.5 and got[12] == 0 and got[16] == pytest.approx(-0.25)
    assert torch.equal(A.overlong_penalty(lengths, l_max, 0), torch.zeros(26))


def test_dynamic_sampling_fills_the_batch_with_groups_whose_rewards_differ():
    """Real rewards (the math grader) of responses where most groups are uniform (all right or
    all wrong): the batch is filled only with mixed groups, drawing as many rounds as needed; a
    cap short of that fills the rest with uniform groups and says how many."""
    from megatron_papo.reward import score_all

    def group(answer, responses):
        scored = score_all([f"<think> </think> \\boxed{{{r}}}" for r in responses],
                           [answer] * len(responses))
        return {"answer": answer, "rewards": torch.tensor([s.reward for s in scored])}

    requests = []

    def draw(round_index, short, share):  # 4 prompts per draw; one mixed group every second draw
        requests.append((short, share))
        out = [group(3, [3, 3, 3, 3]), group(5, [1, 2, 2, 1]), group(7, [7, 7, 7, 7])]
        out.append(group(4, [4, 1, 4, 2]) if round_index % 2 == 0 else group(2, [2, 2, 2, 2]))
        return out

    def has_signal(g):
        return bool((g["rewards"] != g["rewards"][0]).any())

    first = draw(0, 4, 0.0)
    requests.clear()
    assert sum(map(has_signal, first)) == 1
    kept, drawn, rounds, filled = A.fill_with_signal(first, draw, has_signal, max_rounds=10)
    assert (rounds, filled, len(kept), len(drawn)) == (7, 0, 4, 28)  # draws 0, 2, 4, 6
    assert all(map(has_signal, kept))
    # each draw is told the shortfall and the share with signal so far (it sizes itself on them)
    assert requests == [(3, 1 / 4), (3, 1 / 8), (2, 2 / 12), (2, 2 / 16), (1, 3 / 20), (1, 3 / 24)]
    kept, drawn, rounds, filled = A.fill_with_signal(first, draw, has_signal, max_rounds=3)
    assert (rounds, filled, len(kept)) == (3, 2, 4)
    assert sum(map(has_signal, kept)) == 2 and all(map(has_signal, kept[:2]))


def test_a_later_draw_of_dynamic_sampling_asks_for_what_is_missing():
    """A later draw holds enough prompts to expect the shortfall (with 25% to spare) at the
    share with signal seen so far: at least one prompt, never more than a full draw, a full
    draw when nothing had signal yet."""
    assert A.redraw_prompts(short=8, share=0.5, most=64) == 20   # ceil(8 * 1.25 / 0.5)
    assert A.redraw_prompts(short=1, share=1.0, most=64) == 2    # ceil(1.25)
    assert A.redraw_prompts(short=30, share=0.1, most=64) == 64
    assert A.redraw_prompts(short=3, share=0.0, most=64) == 64


def test_measure_perception_reports_the_masked_terms_without_changing_the_loss(batch):
    """A gamma = 0 control the hacking monitor can read: KL_prcp and the masked entropy are
    reported (= the formulas) while the loss and its gradient stay those of the same config
    without the measurement. Catches: the measured terms leaking into the loss, or not
    reported at weight 0."""
    logp = batch["logp"].clone().requires_grad_(True)

    def run(**overrides):
        logp.grad = None
        config = _loss("papo_no_kl_ref", prcp_gamma=0.0, entropy_eta_original=0.0,
                       entropy_eta_masked=0.0, **overrides)
        inputs = A.LossInputs(logp=logp, mask=batch["mask"], advantages=batch["adv"],
                              old_logp=batch["old"], masked_logp=batch["masked"])
        loss, parts = A.combined_loss(inputs, config)
        loss.backward()
        return config, loss.detach(), logp.grad.clone(), parts

    config, loss, grad, parts = run()
    assert set(parts) == {"policy"} and not config.needs_masked_branch
    measured, loss_m, grad_m, parts_m = run(measure_perception=True)
    assert measured.needs_masked_branch
    assert torch.equal(loss, loss_m) and torch.equal(grad, grad_m)
    lp, m = batch["logp"].tolist(), batch["mask"]
    prcp = [[ref_k3(lp[b][t], batch["masked"][b, t].item(), inner=20.0) for t in range(T)]
            for b in range(B)]
    ent_m = [[-batch["masked"][b, t].item() for t in range(T)] for b in range(B)]
    assert parts_m["kl_prcp"].item() == pytest.approx(token_mean(prcp, m), abs=1e-12)
    assert parts_m["entropy_masked"].item() == pytest.approx(token_mean(ent_m, m), abs=1e-12)
    assert not parts_m["kl_prcp"].requires_grad

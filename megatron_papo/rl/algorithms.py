"""GRPO and PAPO loss terms: small pure functions of tensors (no megatron imports).

PAPO (Wang et al., "Perception-Aware Policy Optimization for Multimodal Reasoning",
arXiv 2507.06448) is GRPO plus two registered terms: the implicit perception loss (maximise the KL
between the policy on the original and on a masked image) and the double entropy loss. Terms are
registered by name in :data:`LOSS_TERMS` and combined from a :class:`LossConfig`; the variants of
the paper are configurations (``configs/algorithm/*.yaml``), not code forks.

Shapes: B = sequences (responses) in the micro-batch, T = response tokens (padded). Every per-token
tensor is [B, T]; ``mask`` [B, T] is 1 on response tokens and 0 on padding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

# the loss's settings live in a torch-free module (the launcher reads them before any torch import)
from .loss_config import AGGREGATIONS, LossConfig  # noqa: F401  (re-exported)

# Constants from the authors' code (EasyR1 fork), named with their reason.
ADV_EPS = 1e-6          # group std floor in the advantage denominator
KL_CLAMP = 10.0         # k3 estimates are clamped to [-10, 10] (reference and perception KL)
PRCP_LOGRATIO_CLAMP = 20.0  # the perception log-ratio is clamped to [-20, 20] before exp
PRCP_CLIP = (0.0, 0.2)  # optional clip of the perception KL (off by default)



# --------------------------------------------------------------------------- advantages


def group_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, eps: float = ADV_EPS
                     ) -> torch.Tensor:
    """GRPO outcome advantages: (r - mean of its group) / (std of its group + eps).

    rewards [N], group_ids [N] (responses to the same prompt share an id) -> advantages [N].
    std is the unbiased sample std (as torch.std and verl/EasyR1); a group of one response gets
    mean r and std 1 (advantage 0).
    """
    rewards = rewards.to(torch.float32)
    adv = torch.empty_like(rewards)
    for gid in torch.unique(group_ids):
        idx = group_ids == gid
        r = rewards[idx]
        if r.numel() > 1:
            mean, std = r.mean(), r.std()
        else:
            mean, std = r.mean(), torch.ones((), dtype=r.dtype)
        adv[idx] = (r - mean) / (std + eps)
    return adv


def fill_with_signal(first: list, draw: Callable[[int, int, float], list], has_signal: Callable,
                     max_rounds: int) -> tuple[list, list, int, int]:
    """DAPO's dynamic sampling (Yu et al., arXiv 2503.14476, sec. 3.2): keep only the groups
    whose rewards differ (``has_signal``; the others have a zero GRPO advantage) and ``draw``
    more until as many as the first draw are kept, at most ``max_rounds`` draws in all. Short
    of that, groups without signal fill the remaining places, in draw order.
    ``draw(round, short, share)`` -> groups: the caller sizes each draw from the shortfall and
    the share of the groups drawn so far that had signal (:func:`redraw_prompts`). Returns (the
    groups to train on, every group drawn, draws made, places filled without signal)."""
    quota = len(first)
    drawn, kept, rounds = list(first), [g for g in first if has_signal(g)], 1
    while rounds < max_rounds and len(kept) < quota:
        more = draw(rounds, quota - len(kept), len(kept) / len(drawn))
        drawn += more
        kept += [g for g in more if has_signal(g)]
        rounds += 1
    filled = max(quota - len(kept), 0)
    kept += [g for g in drawn if not has_signal(g)][:filled]
    return kept[:quota], drawn, rounds, filled


REDRAW_MARGIN = 1.25  # a later draw asks for 25% more groups with signal than are missing


def redraw_prompts(short: int, share: float, most: int) -> int:
    """Prompts for a later draw of dynamic sampling: enough to expect ``short`` more groups
    with signal at the ``share`` seen so far, with :data:`REDRAW_MARGIN`; between 1 and
    ``most`` (a full draw, also when nothing had signal yet). DAPO draws full batches; a smaller
    draw costs less and, where it falls short, the next draw makes up the rest."""
    if share <= 0:
        return most
    return max(1, min(most, math.ceil(short * REDRAW_MARGIN / share)))


def overlong_penalty(lengths: torch.Tensor, max_length: int, buffer: int,
                     factor: float = 1.0) -> torch.Tensor:
    """DAPO's soft overlong punishment (Yu et al., arXiv 2503.14476, eq. 13), added to the
    reward: 0 up to ``max_length - buffer`` tokens, then falling linearly to -1 at
    ``max_length`` (-1 beyond), times ``factor``. lengths [N] -> [N]."""
    if buffer <= 0:
        return torch.zeros(lengths.shape, dtype=torch.float32)
    lengths = lengths.to(torch.float32)
    start = max_length - buffer
    penalty = torch.clamp((start - lengths) / buffer, min=-1.0, max=0.0)
    return factor * penalty


# --------------------------------------------------------------------------- per-token terms


@dataclass
class PolicyLossOutput:
    loss: torch.Tensor           # [B, T] per-token loss
    clipped_high: torch.Tensor   # [B, T] bool: A > 0 and ratio > 1 + eps_high (update stopped)
    clipped_low: torch.Tensor    # [B, T] bool: A < 0 and ratio < 1 - eps_low
    clipped_dual: torch.Tensor   # [B, T] bool: A < 0 and the dual clip (-c * A) bounds the loss
    ratio: torch.Tensor          # [B, T]


def clipped_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                        eps_low: float = 0.2, eps_high: float = 0.3,
                        dual_clip: float | None = 3.0) -> PolicyLossOutput:
    """PPO/GRPO clipped surrogate with asymmetric clip and dual clip, per token.

    loss = -min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A),  ratio = exp(logp - old);
    for A < 0 the loss is further bounded by -c * A (dual clip, Ye et al. 2020), c = ``dual_clip``.
    logp, old_logp [B, T]; advantages [B] or [B, T].
    """
    if advantages.dim() == 1:
        advantages = advantages[:, None].expand_as(logp)
    ratio = torch.exp(logp - old_logp)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
    loss = torch.maximum(unclipped, clipped)
    clip_active = clipped > unclipped
    dual = torch.zeros_like(clip_active)
    if dual_clip is not None:
        bound = -advantages * dual_clip
        dual = (advantages < 0) & (loss > bound)
        loss = torch.where(advantages < 0, torch.minimum(loss, bound), loss)
    return PolicyLossOutput(
        loss=loss, ratio=ratio, clipped_dual=dual,
        clipped_high=clip_active & (advantages > 0),
        clipped_low=clip_active & (advantages < 0) & ~dual)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor, clamp: float = KL_CLAMP) -> torch.Tensor:
    """Reference KL per token, k3 ("low_var_kl") estimator (Schulman 2020):
    d = ref - logp; kl = exp(d) - d - 1, clamped to [-clamp, clamp]. [B, T] -> [B, T]."""
    d = ref_logp - logp
    return torch.clamp(torch.exp(d) - d - 1.0, -clamp, clamp)


def perception_kl(logp: torch.Tensor, masked_logp: torch.Tensor,
                  logratio_clamp: float = PRCP_LOGRATIO_CLAMP, clamp: float = KL_CLAMP,
                  clip: tuple[float, float] | None = None) -> torch.Tensor:
    """PAPO's implicit perception KL per token, k3 form of KL(policy(original) || policy(masked)):
    d = clamp(masked - logp, +-20); kl = clamp(exp(d) - d - 1, +-10); optionally clipped to
    ``clip`` (the authors' [0, 0.2]). The loss MAXIMISES it (sign handled by the registry)."""
    d = torch.clamp(masked_logp - logp, -logratio_clamp, logratio_clamp)
    kl = torch.clamp(torch.exp(d) - d - 1.0, -clamp, clamp)
    if clip is not None:
        kl = torch.clamp(kl, clip[0], clip[1])
    return kl


def sampled_token_entropy(logp: torch.Tensor) -> torch.Tensor:
    """The authors' entropy estimate per token: -log p(sampled token). [B, T] -> [B, T]."""
    return -logp


def exact_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Exact entropy of the full distribution per token: -sum_v p log p. [B, T, V] -> [B, T].
    (Under TP, ``rl.logprobs`` computes it from vocab-parallel logits without gathering.)"""
    logp = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    return -(logp.exp() * logp).sum(-1)


# --------------------------------------------------------------------------- aggregation


def aggregate(values: torch.Tensor, mask: torch.Tensor, mode: str = "token-mean",
              denominator: float | torch.Tensor | None = None) -> torch.Tensor:
    """Reduce per-token values [B, T] over the response tokens (``mask`` [B, T]) to a scalar.

    token-mean: sum / number of tokens (the authors'); seq-mean-token-mean: mean over sequences of
    each sequence's token mean; seq-mean-token-sum: mean over sequences of each sequence's sum.
    Sequences without tokens are left out; an all-empty batch gives 0.

    ``denominator`` replaces this batch's own count (tokens, or sequences with tokens): pass the
    count of the WHOLE mini-batch (all micro-batches, all data-parallel ranks, see
    :func:`aggregation_count`) and the sum of the micro-batches' values is the mini-batch's
    aggregate, whatever the micro-batch size and DP.
    """
    mask = mask.to(values.dtype)
    if mode == "token-mean":
        count = mask.sum().clamp_min(1.0) if denominator is None else denominator
        return (values * mask).sum() / count
    per_seq = (values * mask).sum(-1)
    counts = mask.sum(-1)
    has = counts > 0
    if mode == "seq-mean-token-mean":
        per_seq = per_seq / counts.clamp_min(1.0)
    elif mode != "seq-mean-token-sum":
        raise ValueError(f"loss aggregation {mode!r} is not one of {AGGREGATIONS}")
    count = has.sum().clamp_min(1) if denominator is None else denominator
    return per_seq[has].sum() / count


def aggregation_count(mask: torch.Tensor, mode: str = "token-mean") -> torch.Tensor:
    """What ``mode`` divides by, for ``mask`` [B, T]: response tokens (token-mean) or sequences
    with at least one response token (the seq-mean modes). Sum it over micro-batches and ranks
    to get the ``denominator`` of :func:`aggregate`."""
    if mode == "token-mean":
        return mask.float().sum()
    return (mask.sum(-1) > 0).float().sum()


# --------------------------------------------------------------------------- the registry


@dataclass
class LossInputs:
    """Everything a loss term may read. All [B, T] except ``advantages`` ([B] or [B, T])."""

    logp: torch.Tensor
    mask: torch.Tensor
    advantages: torch.Tensor | None = None
    old_logp: torch.Tensor | None = None
    ref_logp: torch.Tensor | None = None
    masked_logp: torch.Tensor | None = None
    entropy: torch.Tensor | None = None         # per-token entropy, original image (exact option)
    masked_entropy: torch.Tensor | None = None  # per-token entropy, masked image


@dataclass
class Term:
    """A registered loss term: per-token values, and its signed weight in the total loss."""

    name: str
    per_token: Callable[[LossInputs, LossConfig], torch.Tensor]
    weight: Callable[[LossConfig], float]
    needs: tuple[str, ...] = field(default_factory=tuple)


def _policy(x: LossInputs, c: LossConfig) -> torch.Tensor:
    return clipped_policy_loss(x.logp, x.old_logp, x.advantages, c.eps_low, c.eps_high,
                               c.dual_clip).loss


def _entropy(logp, exact, c: LossConfig):
    if c.entropy_estimator == "exact":
        if exact is None:
            raise ValueError("entropy_estimator=exact needs per-token entropies")
        return exact
    return sampled_token_entropy(logp)


LOSS_TERMS: dict[str, Term] = {
    "policy": Term("policy", _policy, lambda c: 1.0, ("old_logp", "advantages")),
    "kl_ref": Term("kl_ref", lambda x, c: k3_kl(x.logp, x.ref_logp), lambda c: c.kl_beta,
                   ("ref_logp",)),
    # PAPO: maximise the perception KL -> negative weight
    "kl_prcp": Term("kl_prcp", lambda x, c: perception_kl(
        x.logp, x.masked_logp, clip=PRCP_CLIP if c.prcp_clip else None),
        lambda c: -c.prcp_gamma, ("masked_logp",)),
    # PAPO_H double entropy loss: both entropies pushed down
    "entropy_original": Term("entropy_original", lambda x, c: _entropy(x.logp, x.entropy, c),
                             lambda c: c.entropy_eta_original),
    "entropy_masked": Term("entropy_masked",
                           lambda x, c: _entropy(x.masked_logp, x.masked_entropy, c),
                           lambda c: c.entropy_eta_masked, ("masked_logp",)),
}


# the terms ``LossConfig.measure_perception`` reports at weight 0
MEASURED_ONLY = ("kl_prcp", "entropy_masked")


def combined_loss(inputs: LossInputs, config: LossConfig,
                  denominator: float | torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """Sum of every registered term with a non-zero weight, each aggregated over response
    tokens (``denominator``: see :func:`aggregate`). Returns (loss, {term name: aggregated value
    (detached)}); with ``measure_perception`` the masked-branch terms of weight 0 are in the
    dict too, and not in the loss."""
    total = inputs.logp.new_zeros(())
    parts = {}
    for term in LOSS_TERMS.values():
        weight = term.weight(config)
        if weight == 0 and term.name != "policy":
            if (config.measure_perception and term.name in MEASURED_ONLY
                    and inputs.masked_logp is not None):
                with torch.no_grad():
                    parts[term.name] = aggregate(term.per_token(inputs, config), inputs.mask,
                                                 config.aggregation, denominator)
            continue
        missing = [n for n in term.needs if getattr(inputs, n) is None]
        if missing:
            raise ValueError(f"loss term '{term.name}' needs {missing} in the batch")
        value = aggregate(term.per_token(inputs, config), inputs.mask, config.aggregation,
                          denominator)
        total = total + weight * value
        parts[term.name] = value.detach()
    return total, parts

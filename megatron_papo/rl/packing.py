"""Packed (THD) micro-batches: the samples of a micro-batch concatenated into one row, no compute
spent on padding.

A :class:`~megatron_papo.rl.step.RolloutBatch` keeps its padded ``[N, L]`` layout everywhere
(old / reference / masked log-probs, masks, advantages): only the model's forward sees the packed
row. :func:`pack` takes each sample's tokens (its first ``attention_mask.sum()`` positions) and
its OWN 3-D MRoPE positions (already computed per sample, from its own image grid and text
offsets, by ``get_rope_index``) and concatenates them; ``cu_seqlens`` bounds the samples, so
attention never crosses a boundary; the images keep their order (sample order = pack order), so
the vision features land in their own sample's placeholder tokens. Per-position values computed on
the packed row (log-probs of the next token, entropies) come back in the padded, token-aligned
layout through :meth:`PackedRow.per_token`: exactly what the padded path produces.

Trailing padding of the row (to a multiple of TP for sequence parallelism, or to a fixed length
for the pipeline's fixed p2p shape) is a segment of its own: ``cu_seqlens[-1]`` is the row length,
which megatron-core's THD RoPE needs to take each token's own frequencies.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core.packed_seq_params import PackedSeqParams

from megatron_papo.models.qwen2_5_vl.specs import BRANCHES  # the attention reads each token's branch


@dataclass
class PackedRow:
    input_ids: torch.Tensor          # [1, T]
    position_ids: torch.Tensor       # [3, 1, T]
    targets: torch.Tensor            # [1, T]: the next token of the same sample (0 at its end)
    lengths: list[int]               # tokens per sample
    width: int                       # L of the padded layout
    params: PackedSeqParams
    _unpack: torch.Tensor | None = None  # [N, L] gather index of per_token (built once)

    def per_token(self, per_position: torch.Tensor) -> torch.Tensor:
        """[1, T] values computed at position t for token t+1 -> [N, L] aligned with the tokens
        (position 0 and padding hold 0), as ``shift_to_tokens`` gives on the padded layout.
        Differentiable."""
        if self._unpack is None:
            # token j >= 1 of sample i takes the value at packed position start_i + j - 1; the
            # rest read the zero appended at index T
            total = self.input_ids.shape[1]
            lengths = torch.tensor(self.lengths)
            starts = torch.cumsum(lengths, 0) - lengths
            j = torch.arange(self.width)[None]
            inside = (j >= 1) & (j < lengths[:, None])
            self._unpack = torch.where(inside, starts[:, None] + j - 1,
                                       torch.full_like(inside, total, dtype=torch.long)
                                       ).to(per_position.device)
        flat = torch.cat([per_position.reshape(-1), per_position.new_zeros(1)])
        return flat[self._unpack]


def sample_lengths(attention_mask: torch.Tensor) -> list[int]:
    """Tokens per sample of a right-padded batch (tokens first, then padding)."""
    lengths = attention_mask.sum(-1).tolist()
    width = attention_mask.shape[1]
    positions = torch.arange(width)
    if not torch.equal(attention_mask.bool(),
                       positions[None] < torch.tensor(lengths)[:, None]):
        raise ValueError("packing needs right-padded samples (tokens first, then padding)")
    return [int(n) for n in lengths]


def packed_length(lengths: list[int], multiple: int = 1) -> int:
    """The row length of a pack: its tokens rounded up to ``multiple``."""
    return -(-sum(lengths) // multiple) * multiple


def pack(input_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor,
         length: int | None = None) -> PackedRow:
    """The samples of ``input_ids`` [N, L] / ``position_ids`` [3, N, L] (right-padded,
    ``attention_mask`` [N, L]) as one row of ``length`` tokens (default: exactly their tokens)."""
    lengths = sample_lengths(attention_mask)
    if min(lengths) < 1:
        raise ValueError("packing needs at least one token per sample")
    total = sum(lengths)
    length = total if length is None else length
    if length < total:
        raise ValueError(f"a pack of {total} tokens does not fit in {length}")
    valid = attention_mask.bool()
    ids = input_ids[valid]
    pos = position_ids[:, valid]
    bounds = [0]
    for n in lengths:
        bounds.append(bounds[-1] + n)
    nxt = torch.cat([ids[1:], ids.new_zeros(1)])
    nxt[torch.tensor(bounds[1:]) - 1] = 0  # a sample's last token has no next token in it
    extra = length - total
    if extra:
        ids = torch.cat([ids, ids.new_zeros(extra)])
        nxt = torch.cat([nxt, nxt.new_zeros(extra)])
        pos = torch.cat([pos, pos.new_zeros(3, extra)], dim=1)
        bounds.append(length)
    cu = torch.tensor(bounds, dtype=torch.int32, device=input_ids.device)
    longest = int((cu[1:] - cu[:-1]).max())
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                             max_seqlen_q=longest, max_seqlen_kv=longest)
    return PackedRow(input_ids=ids[None], position_ids=pos[:, None], targets=nxt[None],
                     lengths=lengths, width=input_ids.shape[1], params=params)


def plan_micro_batches(lengths: list[int], max_tokens: int, weight: int = 1,
                       key: str = "trainer.max_tokens_per_micro_batch") -> list[list[int]]:
    """Sample indices grouped into micro-batches whose tokens (x ``weight``: 2 when the model
    runs each sample with its masked copy) fit in ``max_tokens``: first-fit decreasing (longest
    samples first, each into the first micro-batch with room), indices sorted within a
    micro-batch, micro-batches ordered by their first index. Deterministic."""
    sizes = [n * weight for n in lengths]
    for i, size in enumerate(sizes):
        if size > max_tokens:
            copies = f" ({lengths[i]} x {weight}: with its masked copy)" if weight > 1 else ""
            raise ValueError(f"sample {i} has {size} tokens{copies}, more than {key}="
                             f"{max_tokens}; raise {key} to at least {size}")
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(sizes)), key=lambda k: (-sizes[k], k)):
        for b, free in enumerate(room):
            if sizes[i] <= free:
                bins[b].append(i)
                room[b] -= sizes[i]
                break
        else:
            bins.append([i])
            room.append(max_tokens - sizes[i])
    return sorted((sorted(b) for b in bins), key=lambda b: b[0])


def split_to_count(plan: list[list[int]], count: int) -> list[list[int]]:
    """``plan`` with its micro-batches of most samples split in two until it has ``count`` of
    them: every data-parallel rank runs the same number (each rank holds as many samples as the
    others, so another rank's count never exceeds this rank's samples)."""
    plan = [list(b) for b in plan]
    while len(plan) < count:
        widest = max(range(len(plan)), key=lambda b: (len(plan[b]), -b))
        if len(plan[widest]) < 2:
            raise ValueError(f"{sum(map(len, plan))} samples cannot fill {count} micro-batches: "
                             "every data-parallel rank must hold as many samples")
        half = len(plan[widest]) // 2
        plan[widest:widest + 1] = [plan[widest][:half], plan[widest][half:]]
    return plan


# ---------------------------------------------------------------------------- shared prompts
#
# GRPO samples n responses per prompt: in a packed row each sample carries its own copy of the
# prompt (chat template, image tokens, question), so the model runs every prompt n times. With
# shared prompts a micro-batch's samples that have the SAME prompt (the same tokens before the
# first response token, the same images) form one segment: the prompt once, then each sample's
# response. Attention inside the segment is causal and a response sees the prompt and itself,
# never another response (:class:`~megatron_papo.models.qwen2_5_vl.specs` reads the branch of
# every token); every token keeps its own MRoPE positions (a response's continue its prompt's,
# as in its own sample). So each response token sees exactly the keys and values it saw in its
# own sample: the same log-probs and the same gradients (the prompt's hidden states receive the
# sum of what its n copies would receive), up to the order of floating-point sums.


def prompt_lengths(attention_mask: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """[N] per sample: the tokens before its first response token (all of them if it has none)."""
    lengths = torch.tensor(sample_lengths(attention_mask))
    has = response_mask.bool().any(-1)
    return torch.where(has, response_mask.float().argmax(-1), lengths)


def prompt_groups(input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  response_mask: torch.Tensor, image_ids: list[tuple]) -> list[list[int]]:
    """Runs of consecutive samples with the same prompt: the same tokens before their first
    response token and the same images (``image_ids``: per sample, the keys of its images in
    order; ``None`` for a sample whose images have no keys: it is never shared)."""
    prompts = prompt_lengths(attention_mask, response_mask)
    columns = torch.arange(input_ids.shape[1])
    # sample i continues sample i - 1's run when their first prompts[i] tokens are equal
    equal = ((input_ids[1:] == input_ids[:-1]) | (columns[None] >= prompts[1:, None])).all(-1)
    equal &= (prompts[1:] == prompts[:-1]) & (prompts[1:] > 0)
    groups: list[list[int]] = [[0]] if len(image_ids) else []
    for i, same in enumerate(equal.tolist(), 1):
        if same and image_ids[i] is not None and image_ids[i] == image_ids[i - 1]:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def shared_length(attention_mask: torch.Tensor, response_mask: torch.Tensor,
                  groups: list[list[int]], multiple: int = 1) -> int:
    """The row length of :func:`pack_shared` (rounded up to ``multiple``)."""
    lengths = sample_lengths(attention_mask)
    prompts = prompt_lengths(attention_mask, response_mask).tolist()
    total = sum(prompts[g[0]] + sum(lengths[i] - prompts[i] for i in g) for g in groups)
    return packed_length([total], multiple)


@dataclass
class SharedRow:
    """A micro-batch with shared prompts as one row (:func:`pack_shared`)."""

    input_ids: torch.Tensor          # [1, T]
    position_ids: torch.Tensor       # [3, 1, T]
    targets: torch.Tensor            # [1, T]: the next token of the same branch (0: none/shared)
    params: PackedSeqParams          # segments = groups; params._megatron_papo_branches [T]
    leaders: list[int]               # the first sample of each group: its images are the group's
    extra_positions: torch.Tensor    # [E] the last prompt position, once per sample with a response
    extra_targets: torch.Tensor      # [E] that sample's first response token
    logp_index: torch.Tensor         # [N, L] into cat(row values [T], extra values [E], 0)
    value_index: torch.Tensor        # [N, L] into cat(row values [T], 0)

    def token_logprobs(self, logprobs_at) -> torch.Tensor:
        """[N, L] token-aligned log-probs; ``logprobs_at(positions or None, targets)`` gives the
        log-prob of ``targets`` [1, k] at row positions (None: the whole row) as [1, k]."""
        row = logprobs_at(None, self.targets).reshape(-1)
        extra = logprobs_at(self.extra_positions.to(row.device),
                            self.extra_targets.to(row.device)[None]).reshape(-1)
        flat = torch.cat([row, extra, row.new_zeros(1)])
        return flat[self.logp_index.to(row.device)]

    def per_token(self, per_position: torch.Tensor) -> torch.Tensor:
        """[1, T] values that depend on the position only (entropies) -> [N, L] token-aligned."""
        flat = torch.cat([per_position.reshape(-1), per_position.new_zeros(1)])
        return flat[self.value_index.to(per_position.device)]


def pack_shared(input_ids: torch.Tensor, position_ids: torch.Tensor,
                attention_mask: torch.Tensor, response_mask: torch.Tensor,
                groups: list[list[int]], length: int | None = None) -> SharedRow:
    """The samples of ``input_ids`` [N, L] (right-padded) as one row, each group of
    :func:`prompt_groups` one segment: its prompt once, then each sample's tokens after it.

    Read row-major, the kept tokens are already in that order: a group's first sample gives its
    prompt and its own response, each further sample its tokens after the prompt."""
    n, width = input_ids.shape
    lengths = torch.tensor(sample_lengths(attention_mask))
    prompts = prompt_lengths(attention_mask, response_mask)
    if int(prompts.min()) < 1:
        raise ValueError("shared prompts need at least one prompt token per sample")
    leader = torch.empty(n, dtype=torch.long)
    rank = torch.empty(n, dtype=torch.long)       # 1-based place of a sample in its group
    for group in groups:
        leader[group] = group[0]
        rank[group] = torch.arange(1, len(group) + 1)
    j = torch.arange(width)[None]
    inside = j < lengths[:, None]
    in_prompt = j < prompts[:, None]
    keep = inside & (~in_prompt | (rank == 1)[:, None])
    ids = input_ids[keep]
    pos = position_ids[:, keep]
    branch = torch.where(in_prompt, 0, rank[:, None].expand(n, width))[keep]
    # the next token of the same branch: none after its end or after a prompt's last token
    after = torch.cat([input_ids[:, 1:], input_ids.new_zeros(n, 1)], dim=1)
    nxt = torch.where((j + 1 < lengths[:, None]) & (j != prompts[:, None] - 1), after, 0)[keep]
    total = ids.numel()
    place = torch.cumsum(keep.reshape(-1), 0).reshape(n, width) - 1   # row position if kept
    # token j >= 1 follows column j - 1: the group's prompt (its first sample's) or its own
    before = torch.cat([place.new_full((n, 1), -1), place[:, :-1]], dim=1)
    pred = torch.where(j - 1 < prompts[:, None], before[leader], before)
    pred = torch.where(inside & (j >= 1), pred, -1)
    answered = (lengths > prompts).nonzero().reshape(-1)
    extra_positions = place[leader[answered], prompts[answered] - 1]
    extra_targets = input_ids[answered, prompts[answered]]
    counts = keep.sum(-1).tolist()
    bounds = [0]
    for group in groups:
        bounds.append(bounds[-1] + sum(counts[i] for i in group))
    length = total if length is None else length
    if length < total:
        raise ValueError(f"a pack of {total} tokens does not fit in {length}")
    if length > total:
        extra = length - total
        ids = torch.cat([ids, ids.new_zeros(extra)])
        nxt = torch.cat([nxt, nxt.new_zeros(extra)])
        pos = torch.cat([pos, pos.new_zeros(3, extra)], dim=1)
        branch = torch.cat([branch, branch.new_zeros(extra)])
        bounds.append(length)
    cu = torch.tensor(bounds, dtype=torch.int32, device=input_ids.device)
    longest = int((cu[1:] - cu[:-1]).max())
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                             max_seqlen_q=longest, max_seqlen_kv=longest)
    setattr(params, BRANCHES, branch.to(input_ids.device))
    value_index = torch.where(pred >= 0, pred, length)
    logp_index = torch.where(pred >= 0, pred, length + answered.numel())
    logp_index[answered, prompts[answered]] = length + torch.arange(answered.numel())
    return SharedRow(input_ids=ids[None], position_ids=pos[:, None], targets=nxt[None],
                     params=params, leaders=[g[0] for g in groups],
                     extra_positions=extra_positions, extra_targets=extra_targets,
                     logp_index=logp_index, value_index=value_index)

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

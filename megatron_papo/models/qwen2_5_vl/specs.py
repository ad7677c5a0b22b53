"""Layer specs: ``local`` (megatron-core's own modules; runs anywhere, CI uses it) and
``te`` (Transformer Engine modules; GPU, the base for FP8). Selected by name from config."""

from __future__ import annotations

import copy

import torch
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)

from .precision import LAYER_SPECS, layer_spec_problem


class RMSNorm(torch.nn.Module):
    """RMSNorm computed as the reference does (fp32 statistics, weight applied in the input dtype)
    and usable with sequence parallelism: megatron-core's torch-norm wrapper refuses
    ``sequence_parallel``; here the weight is marked so that megatron-core all-reduces its
    gradient across the TP group (``finalize_model_grads``)."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        setattr(self.weight, "sequence_parallel", bool(config.sequence_parallel))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


# a PackedSeqParams attribute: the branch of every token of a row with shared prompts
# (rl.packing.pack_shared): 0 = a prompt, k = the k-th response after it
BRANCHES = "_megatron_papo_branches"

GROUP_LENGTH_RATIO = 0.75  # a segment joins a group if at least this share of its longest


def segment_groups(lengths: list[int], ratio: float = GROUP_LENGTH_RATIO) -> list[list[int]]:
    """Segments (indices) grouped by length, longest first: a group's segments are padded to
    its longest, so each is at least ``ratio`` of it (at most 1 / ratio - 1 padding per token)."""
    order = sorted((i for i, n in enumerate(lengths) if n > 0), key=lambda i: (-lengths[i], i))
    groups: list[list[int]] = []
    for i in order:
        if groups and lengths[i] >= ratio * lengths[groups[-1][0]]:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


class _GroupPlan:
    """Index tensors of one packed row's attention groups, computed once per micro-batch (every
    layer reuses them): per group, the token of each [L, g] slot (flattened) and the mask
    (True = not attended: the future and the padding slots); ``output``: for each token of the
    row, its row in the groups' concatenated outputs."""

    def __init__(self, cu_seqlens: torch.Tensor, device, branches: torch.Tensor | None = None):
        bounds = cu_seqlens.tolist()
        starts, lengths = bounds[:-1], [b - a for a, b in zip(bounds[:-1], bounds[1:])]
        self.groups = []
        output = torch.empty(bounds[-1], dtype=torch.long)
        offset = 0
        for group in segment_groups(lengths):
            longest, size = lengths[group[0]], len(group)
            steps = torch.arange(longest)
            valid = steps[:, None] < torch.tensor([lengths[i] for i in group])[None]   # [L, g]
            tokens = torch.tensor([starts[i] for i in group])[None] + steps[:, None]   # [L, g]
            output[tokens[valid]] = offset + torch.nonzero(valid.reshape(-1)).reshape(-1)
            offset += longest * size
            causal = torch.ones(longest, longest, dtype=torch.bool).tril()
            seen = causal[None] & valid.t()[:, None, :]                                # [g, L, L]
            if branches is not None:
                # shared prompts (rl.packing.pack_shared): a token sees the prompt (branch 0)
                # and its own branch only, never another response of the segment
                slots = torch.where(valid, tokens, torch.zeros_like(tokens))
                branch = torch.where(valid, branches.cpu()[slots], -1).t()            # [g, L]
                seen = seen & ((branch[:, None, :] == 0) | (branch[:, None, :] == branch[:, :, None]))
            masked = ~seen[:, None]                                                   # [g, 1, L, L]
            index = torch.where(valid, tokens, torch.zeros_like(tokens)).reshape(-1)
            self.groups.append((index.to(device), longest, size, masked.to(device)))
        self.output = output.to(device)


def _group_plan(params, device) -> _GroupPlan:
    plan = getattr(params, "_megatron_papo_groups", None)
    if plan is None:
        plan = _GroupPlan(params.cu_seqlens_q, device, getattr(params, BRANCHES, None))
        params._megatron_papo_groups = plan
    return plan


def _packed_attention_class():
    class PackedDotProductAttention(DotProductAttention):
        """megatron-core's local core attention, also for packed (THD) micro-batches, which it
        refuses. With ``packed_seq_params`` (qkv_format "thd", q [t, heads, d], k/v [t, groups,
        d]) the segments of ``cu_seqlens_q`` are attended each on its own, causally, through
        the very same computation as unpacked samples (scaled scores, masked softmax, dropout):
        segments of similar length (:func:`segment_groups`) are gathered into one batch, padded
        to the group's longest with the padding keys masked, so no token sees another sample
        and the result equals the padded path's. Everything outside attention (projections,
        MLP, norms) runs on the packed tokens only; attention costs sum over groups of
        size x longest^2, within (1 / 0.75)^2 of sum_i s_i^2 instead of the padded path's
        batch x longest-of-the-batch^2."""

        def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                    attention_bias=None, packed_seq_params=None):
            if packed_seq_params is None:
                return super().forward(query, key, value, attention_mask, attn_mask_type,
                                       attention_bias)
            if packed_seq_params.qkv_format != "thd":
                raise ValueError(f"packed_seq_params.qkv_format="
                                 f"{packed_seq_params.qkv_format!r}: the local spec packs THD only")
            plan = _group_plan(packed_seq_params, query.device)
            contexts = []
            for index, longest, size, masked in plan.groups:
                # [L * g] token ids -> [L, g, heads, d] (padding slots read token 0, masked)
                q, k, v = (x.index_select(0, index).view(longest, size, *x.shape[1:])
                           for x in (query, key, value))
                context = super().forward(q, k, v, masked, attn_mask_type, attention_bias)
                contexts.append(context.reshape(longest * size, -1))
            return torch.cat(contexts).index_select(0, plan.output)[:, None]  # [t, 1, h * d]

    return PackedDotProductAttention


def language_layer_spec(name: str) -> ModuleSpec:
    if name == "local":
        spec = copy.deepcopy(get_gpt_layer_local_spec(normalization="RMSNorm"))
        spec.submodules.input_layernorm = RMSNorm
        spec.submodules.pre_mlp_layernorm = RMSNorm
        spec.submodules.self_attention.submodules.core_attention = _packed_attention_class()
        return spec
    if name == "te":
        problem = layer_spec_problem(name)  # megatron-core's builder fails obscurely without TE
        if problem:
            raise ValueError(problem)
        return get_gpt_layer_with_transformer_engine_spec()
    raise ValueError(f"model.layer_spec={name!r} is not one of {LAYER_SPECS}")


def language_block_spec(name: str, config, vp_stage: int | None = None
                        ) -> TransformerBlockSubmodules:
    """The decoder block of this (virtual) pipeline stage: its layers and the final norm."""
    layer = language_layer_spec(name)
    final_norm = RMSNorm
    if name == "te":
        from megatron.core.extensions.transformer_engine import TENorm  # GPU-only (TE)

        final_norm = TENorm
    return TransformerBlockSubmodules(
        layer_specs=[layer] * get_num_layers_to_build(config, vp_stage=vp_stage),
        layer_norm=final_norm)

"""Layer specs: ``local`` (megatron-core's own modules; runs anywhere, CI uses it) and
``te`` (Transformer Engine modules; GPU, the base for FP8). Selected by name from config."""

from __future__ import annotations

import copy

import torch
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)

LAYER_SPECS = ("local", "te")


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


def _packed_attention_class():
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    class PackedDotProductAttention(DotProductAttention):
        """megatron-core's local core attention, also for packed (THD) micro-batches, which it
        refuses: with ``packed_seq_params`` (qkv_format "thd", q [t, heads, d], k/v [t, groups,
        d]) each segment of ``cu_seqlens_q`` is attended causally on its own, through the very
        same computation as an unpacked sample (scaled scores, masked softmax, dropout), so no
        token sees another sample and the packed result equals the padded one. A segment loop
        rather than one block-diagonal [t, t] mask: memory and work sum_i s_i^2 instead of t^2
        (a pack of 16 samples of 1k tokens: 16x less)."""

        def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                    attention_bias=None, packed_seq_params=None):
            if packed_seq_params is None:
                return super().forward(query, key, value, attention_mask, attn_mask_type,
                                       attention_bias)
            if packed_seq_params.qkv_format != "thd":
                raise ValueError(f"packed_seq_params.qkv_format="
                                 f"{packed_seq_params.qkv_format!r}: the local spec packs THD only")
            bounds = packed_seq_params.cu_seqlens_q.tolist()
            outputs = []
            for start, end in zip(bounds[:-1], bounds[1:]):
                if end == start:
                    continue
                causal = torch.ones(end - start, end - start, dtype=torch.bool,
                                    device=query.device).triu(1)[None, None]
                outputs.append(super().forward(
                    query[start:end, None], key[start:end, None], value[start:end, None],
                    causal, attn_mask_type, attention_bias))
            return torch.cat(outputs, dim=0)  # [t, 1, heads * d]

    return PackedDotProductAttention


def language_layer_spec(name: str) -> ModuleSpec:
    if name == "local":
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

        spec = copy.deepcopy(get_gpt_layer_local_spec(normalization="RMSNorm"))
        spec.submodules.input_layernorm = RMSNorm
        spec.submodules.pre_mlp_layernorm = RMSNorm
        spec.submodules.self_attention.submodules.core_attention = _packed_attention_class()
        return spec
    if name == "te":
        from .precision import layer_spec_problem

        problem = layer_spec_problem(name)  # megatron-core's builder fails obscurely without TE
        if problem:
            raise ValueError(problem)
        from megatron.core.models.gpt.gpt_layer_specs import (
            get_gpt_layer_with_transformer_engine_spec,
        )

        return get_gpt_layer_with_transformer_engine_spec()
    raise ValueError(f"model.layer_spec={name!r} is not one of {LAYER_SPECS}")


def language_block_spec(name: str, config, vp_stage: int | None = None
                        ) -> TransformerBlockSubmodules:
    """The decoder block of this (virtual) pipeline stage: its layers and the final norm."""
    layer = language_layer_spec(name)
    final_norm = RMSNorm
    if name == "te":
        from megatron.core.extensions.transformer_engine import TENorm

        final_norm = TENorm
    return TransformerBlockSubmodules(
        layer_specs=[layer] * get_num_layers_to_build(config, vp_stage=vp_stage),
        layer_norm=final_norm)

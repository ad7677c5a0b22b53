"""Qwen2.5-VL HF <-> Megatron name mapping: the ONLY place that knows HF tensor names.

Canonical HF names are transformers 5's (``model.language_model.*``, ``model.visual.*``,
``lm_head``); the released checkpoints' older names (``model.*``, ``visual.*``) are the
``hf_legacy`` convention and are accepted on load and selectable on export.
"""

from __future__ import annotations

from megatron_papo.conversion import Direct, GateUp, HFConvention, MappingTable, QKVInterleaved

from .config import Qwen25VLTextSpec

LM = "language_model"
HF_LM = "model.language_model"
ATTN = f"{LM}.decoder.layers.*.self_attention"
HF_ATTN = f"{HF_LM}.layers.*.self_attn"
MLP = f"{LM}.decoder.layers.*.mlp"
HF_MLP = f"{HF_LM}.layers.*.mlp"

TEXT_ROWS = (
    Direct(f"{LM}.embedding.word_embeddings.weight", f"{HF_LM}.embed_tokens.weight", tp_dim=0),
    QKVInterleaved(f"{ATTN}.linear_qkv.weight", f"{HF_ATTN}.q_proj.weight",
                   f"{HF_ATTN}.k_proj.weight", f"{HF_ATTN}.v_proj.weight"),
    QKVInterleaved(f"{ATTN}.linear_qkv.bias", f"{HF_ATTN}.q_proj.bias",
                   f"{HF_ATTN}.k_proj.bias", f"{HF_ATTN}.v_proj.bias"),
    Direct(f"{ATTN}.linear_proj.weight", f"{HF_ATTN}.o_proj.weight", tp_dim=1),
    Direct(f"{LM}.decoder.layers.*.input_layernorm.weight",
           f"{HF_LM}.layers.*.input_layernorm.weight"),
    Direct(f"{LM}.decoder.layers.*.pre_mlp_layernorm.weight",
           f"{HF_LM}.layers.*.post_attention_layernorm.weight"),
    GateUp(f"{MLP}.linear_fc1.weight", f"{HF_MLP}.gate_proj.weight", f"{HF_MLP}.up_proj.weight"),
    Direct(f"{MLP}.linear_fc2.weight", f"{HF_MLP}.down_proj.weight", tp_dim=1),
    Direct(f"{LM}.decoder.final_layernorm.weight", f"{HF_LM}.norm.weight"),
)

UNTIED_OUTPUT = Direct(f"{LM}.output_layer.weight", "lm_head.weight", tp_dim=0)
# With tied embeddings the last pipeline stage holds a copy of the embedding as output_layer:
# it loads from the embedding and is not exported (the first stage exports the original).
TIED_OUTPUT = Direct(f"{LM}.output_layer.weight", f"{HF_LM}.embed_tokens.weight", tp_dim=0,
                     export=False)

# TE's layer spec fuses the pre-attention / pre-MLP norms into the following linear layer.
TE_ALIASES = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}

CANONICAL = HFConvention("hf")
LEGACY = HFConvention("hf_legacy", (("model.visual.", "visual."),
                                    ("model.language_model.", "model.")))


def _detect(names: list[str]) -> str:
    legacy = any(n.startswith("visual.") or (n.startswith("model.") and not n.startswith(
        ("model.language_model.", "model.visual."))) for n in names)
    return "hf_legacy" if legacy else "hf"


def mapping_table(tied: bool) -> MappingTable:
    rows = TEXT_ROWS + ((TIED_OUTPUT,) if tied else (UNTIED_OUTPUT,))
    return MappingTable(rows, conventions=(CANONICAL, LEGACY), detect_convention=_detect,
                        megatron_aliases=TE_ALIASES)


def tensor_dims(spec: Qwen25VLTextSpec) -> dict:
    """Head layout the typed rows need (QKV interleave)."""
    t = spec.transformer
    dims = {"text": {"heads": t["num_attention_heads"], "groups": t["num_query_groups"],
                     "head_dim": t["kv_channels"]}}
    if spec.vision:
        v = spec.vision
        dims["vision"] = {"heads": v["num_heads"], "groups": v["num_heads"],
                          "head_dim": v["hidden_size"] // v["num_heads"]}
    return dims

"""Qwen2.5-VL HF <-> Megatron name mapping: the ONLY place that knows HF tensor names.

The table's canonical HF names are transformers 5's module names (``model.language_model.*``,
``model.visual.*``, ``lm_head``: the ``hf_v5`` convention); the released checkpoints and
transformers' ``save_pretrained`` use ``model.*``/``visual.*`` (the ``hf`` convention). Both are
read on load and selectable on export.
"""

from __future__ import annotations

from megatron_papo.models.mapping import (
    Direct,
    GateUp,
    HFConvention,
    MappingTable,
    QKVInterleaved,
    Reshaped,
    VisionQKV,
)

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

VIS = "vision_model"
HF_VIS = "model.visual"
VBLOCK = f"{VIS}.decoder.layers.*"
HF_VBLOCK = f"{HF_VIS}.blocks.*"

VISION_ROWS = (
    Reshaped(f"{VIS}.patch_embed.weight", f"{HF_VIS}.patch_embed.proj.weight"),
    VisionQKV(f"{VBLOCK}.self_attention.linear_qkv.weight", f"{HF_VBLOCK}.attn.qkv.weight"),
    VisionQKV(f"{VBLOCK}.self_attention.linear_qkv.bias", f"{HF_VBLOCK}.attn.qkv.bias"),
    Direct(f"{VBLOCK}.self_attention.linear_proj.weight", f"{HF_VBLOCK}.attn.proj.weight",
           tp_dim=1),
    Direct(f"{VBLOCK}.self_attention.linear_proj.bias", f"{HF_VBLOCK}.attn.proj.bias"),
    Direct(f"{VBLOCK}.input_layernorm.weight", f"{HF_VBLOCK}.norm1.weight"),
    Direct(f"{VBLOCK}.pre_mlp_layernorm.weight", f"{HF_VBLOCK}.norm2.weight"),
    GateUp(f"{VBLOCK}.mlp.linear_fc1.weight", f"{HF_VBLOCK}.mlp.gate_proj.weight",
           f"{HF_VBLOCK}.mlp.up_proj.weight"),
    GateUp(f"{VBLOCK}.mlp.linear_fc1.bias", f"{HF_VBLOCK}.mlp.gate_proj.bias",
           f"{HF_VBLOCK}.mlp.up_proj.bias"),
    Direct(f"{VBLOCK}.mlp.linear_fc2.weight", f"{HF_VBLOCK}.mlp.down_proj.weight", tp_dim=1),
    Direct(f"{VBLOCK}.mlp.linear_fc2.bias", f"{HF_VBLOCK}.mlp.down_proj.bias"),
    Direct(f"{VIS}.merger.ln_q.weight", f"{HF_VIS}.merger.ln_q.weight"),
    Direct(f"{VIS}.merger.linear_fc1.weight", f"{HF_VIS}.merger.mlp.0.weight", tp_dim=0),
    Direct(f"{VIS}.merger.linear_fc1.bias", f"{HF_VIS}.merger.mlp.0.bias", tp_dim=0),
    Direct(f"{VIS}.merger.linear_fc2.weight", f"{HF_VIS}.merger.mlp.2.weight", tp_dim=1),
    Direct(f"{VIS}.merger.linear_fc2.bias", f"{HF_VIS}.merger.mlp.2.bias"),
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

CANONICAL = HFConvention("hf_v5")
LEGACY = HFConvention("hf", (("model.visual.", "visual."),
                                    ("model.language_model.", "model.")))


def _detect(names: list[str]) -> str:
    legacy = any(n.startswith("visual.") or (n.startswith("model.") and not n.startswith(
        ("model.language_model.", "model.visual."))) for n in names)
    return "hf" if legacy else "hf_v5"


def mapping_table(tied: bool) -> MappingTable:
    rows = TEXT_ROWS + VISION_ROWS + ((TIED_OUTPUT,) if tied else (UNTIED_OUTPUT,))
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
        patch = v.get("patch_size", 14)
        dims["patch_embed_shape"] = (v["hidden_size"], v.get("in_channels", 3),
                                     v.get("temporal_patch_size", 2), patch, patch)
    return dims


def expected_hf_names(spec: Qwen25VLTextSpec) -> list[str]:
    """Every canonical HF tensor name a full checkpoint of this config has (lm_head only when
    untied), derived from the table rows and the layer counts."""
    layers = {"language_model": spec.transformer["num_layers"],
              "vision_model": int(spec.vision.get("depth", 0)) if spec.vision else 0}
    names = []
    for row in mapping_table(spec.tie_word_embeddings).rows:
        if not row.export:
            continue
        owner = row.megatron.split(".", 1)[0]
        if owner == "vision_model" and not spec.vision:
            continue
        if "*" in row.megatron:
            for i in range(layers[owner]):
                names += row.hf_names((str(i),))
        else:
            names += row.hf_names(())
    return names

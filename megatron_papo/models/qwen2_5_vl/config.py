"""Qwen2.5-VL configuration: HF ``config.json`` -> megatron-core ``TransformerConfig``.

The translation is a table (:data:`TEXT_CONFIG_TABLE`): one row per HF key, naming the
``TransformerConfig`` field it sets. HF configs come in two layouts and both are accepted: the
released checkpoints' flat one (``hidden_size`` ... at the top, ``rope_scaling.mrope_section``)
and transformers 5's nested one (``text_config`` with ``rope_parameters``).
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from megatron_papo.files import read_json


class ModelConfigError(ValueError):
    """An HF config or a parallel layout the model cannot use; names the key and the fix."""


@dataclass(frozen=True)
class ConfigRow:
    hf_key: str
    mcore_field: str
    convert: Callable[[Any], Any] = lambda v: v
    required: bool = True
    default: Any = None  # used when an optional key is absent (never megatron-core's default)


# HF text-config key -> TransformerConfig field.
TEXT_CONFIG_TABLE: tuple[ConfigRow, ...] = (
    ConfigRow("num_hidden_layers", "num_layers"),
    ConfigRow("hidden_size", "hidden_size"),
    ConfigRow("intermediate_size", "ffn_hidden_size"),
    ConfigRow("num_attention_heads", "num_attention_heads"),
    ConfigRow("num_key_value_heads", "num_query_groups"),
    ConfigRow("rms_norm_eps", "layernorm_epsilon"),
    # absent in the released config.json files; Qwen2.5-VL trains without dropout (megatron-core's
    # own default would be 0.1)
    ConfigRow("attention_dropout", "attention_dropout", required=False, default=0.0),
)

# Architecture facts of Qwen2.5-VL's language model that config.json does not carry.
TEXT_FIXED_FIELDS: dict[str, Any] = dict(
    normalization="RMSNorm",
    gated_linear_unit=True,           # SwiGLU
    add_bias_linear=False,            # no bias on o_proj / MLP
    add_qkv_bias=True,                # q, k, v carry biases
    hidden_dropout=0.0,
    position_embedding_type="mrope",  # (not a TransformerConfig field: popped by the builder)
    bias_activation_fusion=False,
    masked_softmax_fusion=False,
    persist_layer_norm=False,
    apply_rope_fusion=False,
    gradient_accumulation_fusion=False,
)

ACTIVATIONS = {"silu": torch.nn.functional.silu, "swish": torch.nn.functional.silu}


@dataclass
class Qwen25VLTextSpec:
    """Everything needed to build the language model (besides the parallel layout)."""

    transformer: dict[str, Any]
    vocab_size: int
    rotary_base: float
    mrope_section: list[int]
    tie_word_embeddings: bool
    max_position_embeddings: int
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    vision: dict[str, Any] = field(default_factory=dict)


def _text_section(hf: dict) -> dict:
    return hf.get("text_config") or hf


def _rope(text: dict, hf: dict) -> tuple[float, list[int]]:
    rope = text.get("rope_parameters") or text.get("rope_scaling") or hf.get("rope_scaling") or {}
    theta = rope.get("rope_theta", text.get("rope_theta", hf.get("rope_theta")))
    section = rope.get("mrope_section")
    if theta is None:
        raise ModelConfigError("config.json has no rope_theta (text_config.rope_parameters."
                               "rope_theta or rope_theta): add it (Qwen2.5-VL uses 1000000.0)")
    if not section or len(section) != 3:
        raise ModelConfigError(
            "config.json has no 3-part mrope_section (rope_parameters.mrope_section or "
            f"rope_scaling.mrope_section), got {section!r}: Qwen2.5-VL uses [16, 24, 24]")
    return float(theta), [int(s) for s in section]


MODEL_TYPES = ("qwen2_5_vl",)


def check_hf_config(hf: dict) -> None:
    """Refuse, before any weight is read, a config.json of another architecture or with sizes
    that cannot work (heads that do not divide the hidden size, KV heads that do not divide the
    heads)."""
    kind = hf.get("model_type")
    if kind is not None and kind not in MODEL_TYPES:
        raise ModelConfigError(
            f"config.json has model_type={kind!r}, not Qwen2.5-VL ({MODEL_TYPES[0]!r}): this "
            "project converts and trains Qwen2.5-VL checkpoints only")
    text = _text_section(hf)
    problems = []

    def divides(section: dict, where: str, part: str, whole: str) -> None:
        a, b = section.get(part), section.get(whole)
        if isinstance(a, int) and isinstance(b, int) and (a <= 0 or b % a):
            problems.append(f"{where}{whole}={b} is not divisible by {where}{part}={a}")

    if not text.get("head_dim"):
        divides(text, "", "num_attention_heads", "hidden_size")
    divides(text, "", "num_key_value_heads", "num_attention_heads")
    if hf.get("vision_config"):
        divides(hf["vision_config"], "vision_config.", "num_heads", "hidden_size")
    if problems:
        raise ModelConfigError("config.json: " + "; ".join(problems) + ": fix the config (it "
                               "must describe the weights beside it)")


def text_spec_from_hf(hf: dict) -> Qwen25VLTextSpec:
    """Translate an HF Qwen2.5-VL config dict (either layout) through the table."""
    check_hf_config(hf)
    text = _text_section(hf)
    fields: dict[str, Any] = {}
    for row in TEXT_CONFIG_TABLE:
        if row.hf_key in text:
            fields[row.mcore_field] = row.convert(text[row.hf_key])
        elif row.required:
            raise ModelConfigError(f"config.json lacks text key '{row.hf_key}' (needed for "
                                   f"TransformerConfig.{row.mcore_field})")
        else:
            fields[row.mcore_field] = row.default
    act = text.get("hidden_act", "silu")
    if act not in ACTIVATIONS:
        raise ModelConfigError(f"hidden_act={act!r} is not supported; use one of {sorted(ACTIVATIONS)}")
    fields.update({k: v for k, v in TEXT_FIXED_FIELDS.items() if k != "position_embedding_type"})
    fields["activation_func"] = ACTIVATIONS[act]
    heads = fields["num_attention_heads"]
    fields["kv_channels"] = text.get("head_dim") or fields["hidden_size"] // heads
    theta, section = _rope(text, hf)
    if 2 * sum(section) != fields["kv_channels"]:
        raise ModelConfigError(f"mrope_section {section} sums to {sum(section)}, but must be "
                               f"head_dim/2 = {fields['kv_channels'] // 2}")
    tie = hf.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
    return Qwen25VLTextSpec(
        transformer=fields, vocab_size=int(text["vocab_size"]), rotary_base=theta,
        mrope_section=section, tie_word_embeddings=bool(tie),
        max_position_embeddings=int(text.get("max_position_embeddings", 128000)),
        image_token_id=int(hf.get("image_token_id", 151655)),
        video_token_id=int(hf.get("video_token_id", 151656)),
        vision_start_token_id=int(hf.get("vision_start_token_id", 151652)),
        vision_end_token_id=int(hf.get("vision_end_token_id", 151653)),
        vision=dict(hf.get("vision_config") or {}),
    )


def load_hf_config(path: str) -> dict:
    """Read ``config.json`` from a checkpoint folder (or the file itself)."""
    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.exists(file):
        raise ModelConfigError(f"no config.json at {file}: pass the HF checkpoint folder")
    config = read_json(file, ModelConfigError)
    if not isinstance(config, dict):
        raise ModelConfigError(f"{file} holds a JSON {type(config).__name__}, not an object: "
                               "pass the HF checkpoint folder's config.json")
    return config


def layers_per_stage(num_layers: int, pp: int, first: int | None = None,
                     last: int | None = None) -> list[int]:
    """Decoder layers of each of the ``pp`` stages; refuses a split that cannot work, naming
    the numbers."""
    if pp < 1:
        raise ModelConfigError(f"pipeline_model_parallel_size={pp} must be >= 1")
    if pp == 1:
        if first is not None or last is not None:
            raise ModelConfigError("first/last_stage_layers need pipeline_model_parallel_size > "
                                   "1: unset them or use pipeline parallelism")
        return [num_layers]
    for name, value in (("first_stage_layers", first), ("last_stage_layers", last)):
        if value is not None and value < 1:
            raise ModelConfigError(f"{name}={value} must be >= 1 (or unset)")
    middle_stages = pp - (first is not None) - (last is not None)
    middle_layers = num_layers - (first or 0) - (last or 0)
    given = ", ".join(f"{n}={v}" for n, v in (("first_stage_layers", first),
                                                  ("last_stage_layers", last)) if v is not None)
    if middle_layers < 0 or (middle_stages == 0) != (middle_layers == 0) or (
            middle_stages and middle_layers % middle_stages):
        hint = (f"(tools/pp_stages.py --model <hf folder or size> --pp {pp} suggests a split)")
        if not given:
            raise ModelConfigError(
                f"num_hidden_layers={num_layers} is not divisible by pipeline_model_parallel_size"
                f"={pp}: choose another PP size or give the first/last stage fewer layers "
                f"(first_stage_layers, last_stage_layers) {hint}")
        raise ModelConfigError(
            f"num_hidden_layers={num_layers} at pipeline_model_parallel_size={pp} with {given} "
            f"leaves {middle_layers} layers for the other {middle_stages} stages, which cannot "
            f"be split evenly: choose sizes whose remaining layers divide by the remaining "
            f"stages {hint}")
    per = middle_layers // middle_stages if middle_stages else 0
    stages = [per] * pp
    if first is not None:
        stages[0] = first
    if last is not None:
        stages[-1] = last
    return stages


def check_parallel_layout(spec: Qwen25VLTextSpec, tp: int = 1, pp: int = 1, vpp: int | None = None,
                          vision_heads: int | None = None, first_stage_layers: int | None = None,
                          last_stage_layers: int | None = None) -> None:
    """Refuse TP/PP layouts the model cannot be split into, naming the numbers and the fix.
    ``first_stage_layers`` / ``last_stage_layers``: uneven pipeline stages (stages.py)."""
    t = spec.transformer
    problems = []
    if t["num_attention_heads"] % tp:
        problems.append(f"num_attention_heads={t['num_attention_heads']} is not divisible by "
                        f"tensor_model_parallel_size={tp}")
    if t["num_query_groups"] % tp:
        problems.append(f"num_key_value_heads={t['num_query_groups']} (KV groups) is not divisible"
                        f" by tensor_model_parallel_size={tp}")
    if t["ffn_hidden_size"] % tp:
        problems.append(f"intermediate_size={t['ffn_hidden_size']} is not divisible by "
                        f"tensor_model_parallel_size={tp}")
    if spec.vocab_size % tp:
        problems.append(f"vocab_size={spec.vocab_size} is not divisible by "
                        f"tensor_model_parallel_size={tp}")
    if vision_heads is not None and vision_heads % tp:
        problems.append(f"vision_config.num_heads={vision_heads} is not divisible by "
                        f"tensor_model_parallel_size={tp}")
    if first_stage_layers is None and last_stage_layers is None:
        stages = pp * (vpp or 1)
        if t["num_layers"] % stages:
            problems.append(f"num_hidden_layers={t['num_layers']} is not divisible by "
                            f"pipeline_model_parallel_size x virtual stages = {stages} (or give "
                            "the first/last stage fewer layers: first_stage_layers, "
                            "last_stage_layers)")
    else:
        try:
            counts = layers_per_stage(t["num_layers"], pp, first_stage_layers, last_stage_layers)
        except ModelConfigError as err:
            problems.append(str(err))
            counts = []
        if vpp and any(n % vpp for n in counts):
            problems.append(f"stage layer counts {counts} are not all divisible by the "
                            f"{vpp} virtual stages")
    if problems:
        raise ModelConfigError("unsupported parallel layout for this model: " + "; ".join(problems)
                               + ". Choose sizes that divide these numbers.")


# Public shapes of the released models (QWEN25VL_SHAPES.md); the vision tower is the same for all.
_VISION_PRESET = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                      patch_size=14, temporal_patch_size=2, spatial_merge_size=2, in_channels=3,
                      window_size=112, fullatt_block_indexes=[7, 15, 23, 31], hidden_act="silu",
                      tokens_per_second=2)
_TEXT_PRESETS = {
    "3b": dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
               num_attention_heads=16, num_key_value_heads=2, vocab_size=151936,
               tie_word_embeddings=True),
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
               num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
               tie_word_embeddings=False),
    "32b": dict(hidden_size=5120, intermediate_size=27648, num_hidden_layers=64,
                num_attention_heads=40, num_key_value_heads=8, vocab_size=152064,
                tie_word_embeddings=False),
    "72b": dict(hidden_size=8192, intermediate_size=29568, num_hidden_layers=80,
                num_attention_heads=64, num_key_value_heads=8, vocab_size=152064,
                tie_word_embeddings=False),
}
PRESETS = tuple(_TEXT_PRESETS)


def preset_hf_config(name: str) -> dict:
    """An HF-layout (flat, like the released config.json files) config of a public model size."""
    key = name.lower().replace("qwen2.5-vl-", "").replace("-instruct", "")
    if key not in _TEXT_PRESETS:
        raise ModelConfigError(f"unknown preset {name!r}: choose one of {list(_TEXT_PRESETS)}")
    text = dict(_TEXT_PRESETS[key])
    tie = text.pop("tie_word_embeddings")
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
        **text, "hidden_act": "silu", "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "max_position_embeddings": 128000, "tie_word_embeddings": tie,
        "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
        "image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652,
        "vision_end_token_id": 151653,
        "vision_config": {**copy.deepcopy(_VISION_PRESET), "out_hidden_size": text["hidden_size"]},
    }

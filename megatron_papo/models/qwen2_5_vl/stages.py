"""Pipeline stages of Qwen2.5-VL: how many decoder layers each stage holds (even or with a
lighter first/last stage) and what each stage costs in parameters and forward FLOPs.

Stage 0 carries the vision tower and the token embedding besides its layers, the last stage the
final norm and the output layer, so equal layer counts give unequal stages; megatron-core's
``num_layers_in_first_pipeline_stage`` / ``num_layers_in_last_pipeline_stage`` move layers off
them. :func:`suggest_stage_layers` finds the split with the smallest slowest stage.

FLOPs are matmul FLOPs (2 per multiply-add) of one forward pass of one sample: ``seq_len``
tokens of which the image's merged patches are part, causal attention counted as half of full.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import ModelConfigError, _text_section, layers_per_stage


@dataclass
class StageCost:
    layers: int
    params: int
    flops: float
    parts: str  # what besides decoder layers the stage holds


def _shapes(hf: dict) -> dict:
    text = _text_section(hf)
    h, heads = text["hidden_size"], text["num_attention_heads"]
    head_dim = text.get("head_dim") or h // heads
    return dict(h=h, f=text["intermediate_size"], heads=heads, kv=text["num_key_value_heads"],
                d=head_dim, vocab=text["vocab_size"], layers=text["num_hidden_layers"],
                tied=bool(hf.get("tie_word_embeddings", text.get("tie_word_embeddings", False))))


def decoder_layer_params(hf: dict) -> int:
    s = _shapes(hf)
    qkv_out = (s["heads"] + 2 * s["kv"]) * s["d"]
    return (s["h"] * qkv_out + qkv_out          # QKV with bias
            + s["heads"] * s["d"] * s["h"]      # output projection
            + 3 * s["h"] * s["f"]               # SwiGLU MLP
            + 2 * s["h"])                       # two RMSNorms


def decoder_layer_flops(hf: dict, seq_len: int) -> float:
    s = _shapes(hf)
    qkv_out = (s["heads"] + 2 * s["kv"]) * s["d"]
    dense = 2 * seq_len * (s["h"] * qkv_out + s["heads"] * s["d"] * s["h"] + 3 * s["h"] * s["f"])
    attention = 2 * seq_len * seq_len * s["heads"] * s["d"]  # QK^T and AV, causal (half of 4)
    return float(dense + attention)


def vision_params(hf: dict) -> int:
    v = hf.get("vision_config") or {}
    if not v:
        return 0
    hv, fv = v["hidden_size"], v["intermediate_size"]
    merge = v.get("spatial_merge_size", 2) ** 2
    patch_in = v.get("in_channels", 3) * v.get("temporal_patch_size", 2) * v["patch_size"] ** 2
    # two RMSNorms, QKV and output projection with bias, SwiGLU MLP with bias
    layer = 4 * hv * hv + 3 * hv * fv + 7 * hv + 2 * fv
    out = v.get("out_hidden_size", _shapes(hf)["h"])
    merger = hv + (merge * hv) ** 2 + merge * hv + merge * hv * out + out
    return patch_in * hv + v["depth"] * layer + merger


def vision_flops(hf: dict, image_pixels: int) -> float:
    """Forward FLOPs of the vision tower on one image of ``image_pixels`` pixels (window
    attention in all but the full-attention blocks)."""
    v = hf.get("vision_config") or {}
    if not v or image_pixels <= 0:
        return 0.0
    hv, fv, p = v["hidden_size"], v["intermediate_size"], v["patch_size"]
    patches = image_pixels // (p * p)
    merge = v.get("spatial_merge_size", 2) ** 2
    window = (v.get("window_size", 112) // p) ** 2
    full = set(v.get("fullatt_block_indexes", []))
    patch_in = v.get("in_channels", 3) * v.get("temporal_patch_size", 2) * p * p
    total = 2 * patches * patch_in * hv
    for i in range(v["depth"]):
        span = patches if i in full else min(window, patches)
        total += 2 * patches * (4 * hv * hv + 3 * hv * fv) + 4 * patches * span * hv
    out = v.get("out_hidden_size", _shapes(hf)["h"])
    total += 2 * (patches // merge) * ((merge * hv) ** 2 + merge * hv * out)
    return float(total)


def image_tokens(hf: dict, image_pixels: int) -> int:
    v = hf.get("vision_config") or {}
    if not v:
        return 0
    return image_pixels // (v["patch_size"] ** 2) // v.get("spatial_merge_size", 2) ** 2


def stage_costs(hf: dict, pp: int, first: int | None = None, last: int | None = None,
                seq_len: int = 4096, image_pixels: int = 1003520,
                images: int = 1) -> list[StageCost]:
    """Parameters and forward FLOPs (one sample of ``seq_len`` tokens with ``images`` images of
    ``image_pixels``) of each pipeline stage."""
    s = _shapes(hf)
    counts = layers_per_stage(s["layers"], pp, first, last)
    layer_p, layer_f = decoder_layer_params(hf), decoder_layer_flops(hf, seq_len)
    costs = []
    for i, n in enumerate(counts):
        params, flops, parts = n * layer_p, n * layer_f, []
        if i == 0:
            params += s["vocab"] * s["h"] + vision_params(hf)
            flops += images * vision_flops(hf, image_pixels)
            parts += ["vision tower", "embedding"]
        if i == pp - 1:
            # the output layer (when tied, a copy of the embedding on a last stage of its own)
            params += s["h"] + (0 if s["tied"] and pp == 1 else s["vocab"] * s["h"])
            flops += 2.0 * seq_len * s["h"] * s["vocab"]
            parts += ["final norm", "output layer"]
        costs.append(StageCost(n, params, flops, ", ".join(parts)))
    return costs


def suggest_stage_layers(hf: dict, pp: int, seq_len: int = 4096, image_pixels: int = 1003520
                         ) -> tuple[int | None, int | None]:
    """(first_stage_layers, last_stage_layers) - None for an even stage - whose slowest stage
    has the fewest forward FLOPs; the even split (both None) when it is as good."""
    layers = _shapes(hf)["layers"]
    best, best_key = (None, None), None
    options = [None] + list(range(1, layers + 1))
    for first in options:
        for last in options:
            try:
                costs = stage_costs(hf, pp, first, last, seq_len, image_pixels)
            except ModelConfigError:
                continue
            key = (max(c.flops for c in costs), (first is not None) + (last is not None))
            if best_key is None or key < best_key:
                best, best_key = (first, last), key
    if best_key is None:
        raise ModelConfigError(f"no split of {layers} layers over {pp} pipeline stages works: "
                               "choose another pipeline_model_parallel_size")
    return best

"""Tiny random Qwen2.5-VL configs and reference (transformers) models for the parity tests."""

from __future__ import annotations

import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

VOCAB = 256
IMAGE_TOKEN, VIDEO_TOKEN, VISION_START, VISION_END = 250, 251, 248, 249


def tiny_hf_config(tied: bool = False, layers: int = 4) -> dict:
    """transformers-5 (nested) layout of a tiny Qwen2.5-VL config."""
    return {
        "model_type": "qwen2_5_vl", "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "text_config": {
            "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": layers,
            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": VOCAB,
            "rms_norm_eps": 1e-6, "hidden_act": "silu", "max_position_embeddings": 512,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0,
                                "mrope_section": [2, 3, 3]},
            "bos_token_id": 0, "eos_token_id": 1,
        },
        "vision_config": {
            "depth": 2, "hidden_size": 32, "intermediate_size": 48, "num_heads": 2,
            "out_hidden_size": 64, "patch_size": 14, "temporal_patch_size": 2,
            "spatial_merge_size": 2, "window_size": 56, "fullatt_block_indexes": [1],
            "in_channels": 3,
        },
        "image_token_id": IMAGE_TOKEN, "video_token_id": VIDEO_TOKEN,
        "vision_start_token_id": VISION_START, "vision_end_token_id": VISION_END,
        "tie_word_embeddings": tied,
    }


def flat_hf_config(tied: bool = False) -> dict:
    """The released checkpoints' flat layout of the same config."""
    nested = tiny_hf_config(tied)
    text = dict(nested["text_config"])
    rope = text.pop("rope_parameters")
    return {**{k: v for k, v in nested.items() if k != "text_config"}, **text,
            "rope_theta": rope["rope_theta"],
            "rope_scaling": {"type": "mrope", "mrope_section": rope["mrope_section"]}}


def reference_model(hf_config: dict, seed: int = 0) -> Qwen2_5_VLForConditionalGeneration:
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**hf_config)).eval()
    # random (not constant) norm weights and biases, so a mapping mistake cannot hide
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name or name.endswith("ln_q.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.05 * torch.randn_like(p))
    return model


def text_batch(batch: int = 2, seq: int = 12, seed: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, VISION_START, (batch, seq), generator=g)


PATCH_DIM = 3 * 2 * 14 * 14
CASES = {
    "text_only": [[]],
    "one_image": [[(1, 8, 12)]],
    "two_images_one_sample": [[(1, 8, 12), (1, 4, 8)]],
    "padded_mixed_batch": [[], [(1, 12, 8)], [(1, 4, 8), (1, 8, 8)]],
    "rollout": [[(1, 8, 8)], [], [(1, 4, 8)], [(1, 8, 12)]],
}


def vl_batch(case: str, seed: int = 5, pad_left: bool = False, multiple: int = 1) -> dict:
    """A batch of samples given as lists of image grids (t, h, w): text, then for each image
    <vision_start> image-pad x (t*h*w/4) <vision_end> and more text. Padded to the longest."""
    g = torch.Generator().manual_seed(seed)

    def text(n):
        return torch.randint(2, VISION_START, (n,), generator=g).tolist()

    rows, grids, pixels, types = [], [], [], []
    for i, images in enumerate(CASES[case]):
        ids, kind = text(3 + i), [0] * (3 + i)
        for t, h, w in images:
            n = t * h * w // 4
            ids += [VISION_START] + [IMAGE_TOKEN] * n + [VISION_END] + text(2)
            kind += [0] + [1] * n + [0, 0, 0]
            grids.append((t, h, w))
            pixels.append(torch.randn(t * h * w, PATCH_DIM, generator=g))
        ids += text(4)
        kind += [0] * 4
        rows.append(ids)
        types.append(kind)
    width = -(-max(len(r) for r in rows) // multiple) * multiple
    input_ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    mm_types = torch.zeros(len(rows), width, dtype=torch.int32)
    for i, (ids, kind) in enumerate(zip(rows, types)):
        sl = slice(width - len(ids), width) if pad_left else slice(0, len(ids))
        input_ids[i, sl] = torch.tensor(ids)
        mask[i, sl] = 1
        mm_types[i, sl] = torch.tensor(kind, dtype=torch.int32)
    batch = {"input_ids": input_ids, "attention_mask": mask, "mm_token_type_ids": mm_types}
    if grids:
        batch["pixel_values"] = torch.cat(pixels)
        batch["image_grid_thw"] = torch.tensor(grids)
    return batch

"""Test inputs for the Qwen2.5-VL parity tests; the tiny configs and reference models live in
megatron_papo.models.qwen2_5_vl.tiny (the default training config uses them too)."""

from __future__ import annotations

import torch

from megatron_papo.models.qwen2_5_vl.tiny import (  # noqa: F401  (re-exported for the tests)
    IMAGE_TOKEN,
    VIDEO_TOKEN,
    VISION_END,
    VISION_START,
    VOCAB,
    reference_model,
    tiny_hf_config,
)


def flat_hf_config(tied: bool = False) -> dict:
    """The released checkpoints' flat layout of the same config."""
    nested = tiny_hf_config(tied)
    text = dict(nested["text_config"])
    rope = text.pop("rope_parameters")
    return {**{k: v for k, v in nested.items() if k != "text_config"}, **text,
            "rope_theta": rope["rope_theta"],
            "rope_scaling": {"type": "mrope", "mrope_section": rope["mrope_section"]}}


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
    # the n samples of a prompt share its image ("same": the previous image's pixels again); the
    # tower encodes each run of equal images once
    "shared_images": [[(1, 8, 8)], [(1, 8, 8, "same")], [(1, 8, 8, "same")], [(1, 8, 8)],
                      [(1, 4, 8), (1, 4, 8, "same")]],
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
        for t, h, w, *same in images:
            n = t * h * w // 4
            ids += [VISION_START] + [IMAGE_TOKEN] * n + [VISION_END] + text(2)
            kind += [0] + [1] * n + [0, 0, 0]
            grids.append((t, h, w))
            pixels.append(pixels[-1].clone() if same else
                          torch.randn(t * h * w, PATCH_DIM, generator=g))
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

"""3-D (temporal, height, width) MRoPE position ids of a Qwen2.5-VL token sequence.

Text tokens advance all three axes together; the image-pad tokens of one image get
(t0, t0 + row, t0 + column) over the image's merged grid, and the text after it continues from
``t0 + max(rows, columns)``. Padding (attention_mask == 0) is skipped and gets position 0.
Same rule as the reference implementation's ``get_rope_index`` (images; videos are not used by
this project's data).
"""

from __future__ import annotations

import torch


def get_rope_index(input_ids: torch.Tensor, image_grid_thw: torch.Tensor | None,
                   image_token_id: int, spatial_merge_size: int = 2,
                   attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """input_ids [b, s], image_grid_thw [n_images, 3] (all images of the batch, in order),
    attention_mask [b, s] (1 = token) -> position_ids [3, b, s] (long)."""
    b, s = input_ids.shape
    positions = torch.zeros(3, b, s, dtype=torch.long)
    grids = iter(image_grid_thw.tolist() if image_grid_thw is not None else [])
    for row in range(b):
        valid = (torch.ones(s, dtype=torch.bool) if attention_mask is None
                 else attention_mask[row].bool().cpu())
        ids = input_ids[row].cpu()[valid].tolist()
        out = torch.empty(3, len(ids), dtype=torch.long)
        i, nxt = 0, 0
        while i < len(ids):
            if ids[i] != image_token_id:  # a run of text tokens: all axes advance together
                j = i + 1
                while j < len(ids) and ids[j] != image_token_id:
                    j += 1
                out[:, i:j] = torch.arange(nxt, nxt + j - i)
                nxt += j - i
                i = j
                continue
            try:
                t, h, w = next(grids)
            except StopIteration:
                raise ValueError("more images in input_ids than rows in image_grid_thw") from None
            gh, gw = h // spatial_merge_size, w // spatial_merge_size
            n = t * gh * gw
            if i + n > len(ids) or any(x != image_token_id for x in ids[i:i + n]):
                raise ValueError(f"image {t}x{h}x{w} needs {n} consecutive image-pad tokens "
                                 f"(id {image_token_id}) at position {i}; input_ids do not match "
                                 "image_grid_thw")
            tt = torch.arange(t).view(t, 1, 1).expand(t, gh, gw).flatten()
            hh = torch.arange(gh).view(1, gh, 1).expand(t, gh, gw).flatten()
            ww = torch.arange(gw).view(1, 1, gw).expand(t, gh, gw).flatten()
            out[:, i:i + n] = torch.stack([tt, hh, ww]) + nxt
            nxt += max(gh, gw)
            i += n
        positions[:, row, valid] = out
    return positions.to(input_ids.device)

"""Image corruption for PAPO's implicit perception loss.

Random patch blackening on the RAW image, before resizing and the image processor (as the authors
do): walk a grid of ``patch`` x ``patch`` pixel squares (edge squares may be smaller) and set each
to black with probability ``ratio``. The image keeps its size, so the processor produces the same
grid and the same number of image tokens for the masked copy. Deterministic from ``seed``.

(The TRL port masks normalised ``pixel_values`` element-wise, where 0 is the mean colour, not
black, and its patch modes do nothing on Qwen2.5-VL's flattened pixel_values; not repeated here.)
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

DEFAULT_RATIO = 0.6   # authors' default; ablation 0.4/0.6/0.8/1.0 -> 0.6 best on 3B
DEFAULT_PATCH = 14    # pixels, the vision tower's patch size
IMAGE_SEED_STRIDE = 64  # masking seed of image k of prompt i: seed + i * stride + k


def patch_keep_mask(height: int, width: int, ratio: float = DEFAULT_RATIO,
                    patch: int = DEFAULT_PATCH, seed: int = 0) -> torch.Tensor:
    """Per-patch decision [ceil(H/patch), ceil(W/patch)] bool: True = blacken."""
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"rl.mask.ratio must be in [0, 1], got {ratio}")
    if patch < 1:
        raise ValueError(f"rl.mask.patch_size must be >= 1, got {patch}")
    rows, cols = -(-height // patch), -(-width // patch)
    g = torch.Generator().manual_seed(int(seed))
    return torch.rand(rows, cols, generator=g) < ratio


def mask_image(image, ratio: float = DEFAULT_RATIO, patch: int = DEFAULT_PATCH, seed: int = 0):
    """Blacken random patches of a PIL image, a HxWxC uint8 numpy array or a HxWxC tensor.
    Returns a new object of the same kind, size and mode."""
    if isinstance(image, Image.Image):
        array = np.array(image)
        out = mask_image(array, ratio, patch, seed)
        return Image.fromarray(out, mode=image.mode)
    is_tensor = isinstance(image, torch.Tensor)
    array = image.clone() if is_tensor else np.array(image, copy=True)
    height, width = array.shape[:2]
    decisions = patch_keep_mask(height, width, ratio, patch, seed)
    pixels = decisions.repeat_interleave(patch, 0).repeat_interleave(patch, 1)[:height, :width]
    pixels = pixels if is_tensor else pixels.numpy()
    array[pixels] = 0
    return array


def masked_copies(images: list, prompt_index: int, ratio: float = DEFAULT_RATIO,
                  patch: int = DEFAULT_PATCH, seed: int = 0) -> list:
    """PAPO's masked copies of one prompt's images: THE masks of a step, whichever side uses them
    (the trainer's masked pixel values, the rollout engine's masked scoring). ``prompt_index``:
    the prompt's position in the step's global batch (the same at any data-parallel layout)."""
    return [mask_image(img, ratio, patch, seed=seed + prompt_index * IMAGE_SEED_STRIDE + k)
            for k, img in enumerate(images)]

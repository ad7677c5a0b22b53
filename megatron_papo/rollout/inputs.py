"""Prompts -> the exact inputs both sides see: the chat-templated text the engine gets, and the
token ids, pixel values and image grids the trainer scores with, from ONE processor (the model
folder's, with the run's min/max pixels). Bad prompts are refused here, before any generation,
with an error that names the prompt, the field and the fix.

A prompt is a list of chat messages in the HF format; images are content items
``{"type": "image", "image": <PIL.Image | path | bytes>}``::

    [{"role": "user", "content": [{"type": "image", "image": img},
                                  {"type": "text", "text": "How many circles?"}]}]
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from PIL import Image

from megatron_papo.data.images import ImageLoadError, load_image

from .settings import RolloutInputError

# The vision special tokens of Qwen2-VL / Qwen2.5-VL. A sampled one breaks the next forward (an
# image-pad token without an image), so rollouts never sample them and scoring gives them p = 0.
VISION_SPECIAL_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
                         "<|image_pad|>", "<|video_pad|>")
MAX_ASPECT_RATIO = 200  # the processor's smart_resize refuses more


@dataclass
class EncodedPrompt:
    """One prompt as the engine and the trainer see it."""

    text: str                                   # chat-templated, generation prompt appended
    images: list = field(default_factory=list)  # PIL RGB images, in prompt order
    input_ids: torch.Tensor | None = None       # [S] long: image pads expanded
    pixel_values: torch.Tensor | None = None    # [patches, C*T*P*P] or None
    image_grid_thw: torch.Tensor | None = None  # [images, 3] or None


def _load_image(value, where: str) -> Image.Image:
    try:
        return load_image(value)
    except ImageLoadError as err:
        reason = str(err)
        if value is None:
            reason += "; give a PIL image, a path or bytes, or drop the image item"
        elif "cannot be decoded" in reason:
            reason += "; fix or drop this row"
        raise RolloutInputError(f"{where}: {reason}") from None


class PromptEncoder:
    """Applies the chat template and the processor of ``model_path`` (min/max pixels of the run).

    ``min_side`` is the processor's smallest usable side: patch size x merge size (28 px for
    Qwen2.5-VL); smaller images are refused instead of being silently blown up."""

    def __init__(self, model_path: str, min_pixels: int | None = None,
                 max_pixels: int | None = None, max_images_per_prompt: int = 1):
        from transformers import AutoProcessor  # seconds to import: only an encoder needs it

        self.processor = AutoProcessor.from_pretrained(model_path)
        image_processor = self.processor.image_processor
        self.min_pixels = min_pixels or image_processor.size["shortest_edge"]
        self.max_pixels = max_pixels or image_processor.size["longest_edge"]
        if self.min_pixels > self.max_pixels:
            raise RolloutInputError(f"rollout.min_pixels={self.min_pixels} is larger than "
                                    f"rollout.max_pixels={self.max_pixels}")
        self.min_side = image_processor.patch_size * image_processor.merge_size
        self.max_images_per_prompt = max_images_per_prompt
        self.tokenizer = self.processor.tokenizer
        self.image_token_id = self.tokenizer.convert_tokens_to_ids("<|image_pad|>")
        self.merge_units = image_processor.merge_size ** 2  # patches per image token

    # the kwargs both the engine's and our processor calls get
    @property
    def processor_kwargs(self) -> dict:
        return {"size": {"shortest_edge": self.min_pixels, "longest_edge": self.max_pixels}}

    def suppressed_token_ids(self, vocab_size: int) -> list[int]:
        """Ids that are never sampled and get probability 0 when scoring: the vision special
        tokens, and the padding rows of the output layer beyond the tokenizer's vocabulary."""
        vocab = self.tokenizer.get_vocab()
        ids = {vocab[t] for t in VISION_SPECIAL_TOKENS if t in vocab}
        ids.update(range(len(self.tokenizer), vocab_size))
        return sorted(i for i in ids if i < vocab_size)

    def encode(self, prompts: list) -> list[EncodedPrompt]:
        """Validate and encode every prompt (raises :class:`RolloutInputError` on the first bad
        one, before anything is generated)."""
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise RolloutInputError("prompts must be a non-empty list of chat-message lists")
        return [self.encode_one(p, i) for i, p in enumerate(prompts)]

    def images(self, messages, index: int) -> list[Image.Image]:
        """The validated images of prompt ``index``, in prompt order (raises
        :class:`RolloutInputError` naming the prompt and the item)."""
        if not isinstance(messages, (list, tuple)) or not messages:
            raise RolloutInputError(f"prompt {index}: expected a non-empty list of chat messages "
                                    f"({{'role': ..., 'content': ...}}), got {type(messages).__name__}")
        images = []
        for m, message in enumerate(messages):
            if not isinstance(message, dict) or "content" not in message:
                raise RolloutInputError(f"prompt {index}, message {m}: a chat message needs "
                                        "'role' and 'content'")
            content = message["content"]
            if isinstance(content, str):
                continue
            for c, item in enumerate(content):
                if isinstance(item, dict) and (item.get("type") == "image" or "image" in item):
                    where = f"prompt {index}, message {m}, content {c} ('image')"
                    image = _load_image(item.get("image"), where)
                    w, h = image.size
                    if min(w, h) < self.min_side:
                        raise RolloutInputError(
                            f"{where}: image {w}x{h} px is below the processor's minimum side "
                            f"of {self.min_side} px (patch x merge size); upscale or pad it, or "
                            "drop this row")
                    if max(w, h) / min(w, h) > MAX_ASPECT_RATIO:
                        raise RolloutInputError(
                            f"{where}: image {w}x{h} px has an aspect ratio above "
                            f"{MAX_ASPECT_RATIO}, which the processor refuses; crop it or drop "
                            "this row")
                    images.append(image)
        if len(images) > self.max_images_per_prompt:
            raise RolloutInputError(
                f"prompt {index}: {len(images)} images, more than "
                f"rollout.max_images_per_prompt={self.max_images_per_prompt}; raise it")
        return images

    def encode_one(self, messages, index: int) -> EncodedPrompt:
        images = self.images(messages, index)
        text = self.processor.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=True)
        if not images:
            return EncodedPrompt(text=text, images=[], input_ids=self._token_ids(text))
        # what the processor's __call__ does, without its per-call overhead (~1.5 ms of its ~2 ms
        # on a small image): the image processor, then each image placeholder expanded to the
        # image's token count and the text tokenized (tests: equal to the processor's output)
        encoded = self._processed(images)
        grid = encoded["image_grid_thw"]
        return EncodedPrompt(text=text, images=images,
                             input_ids=self._token_ids(self._expanded(text, grid, index)),
                             pixel_values=encoded["pixel_values"], image_grid_thw=grid)

    def _expanded(self, text: str, grid: torch.Tensor, index: int) -> str:
        """``text`` with its i-th image placeholder repeated once per token of image i."""
        placeholder = self.processor.image_token
        parts = text.split(placeholder)
        if len(parts) - 1 != len(grid):
            raise RolloutInputError(
                f"prompt {index}: the chat template wrote {len(parts) - 1} image placeholders "
                f"for {len(grid)} images; each image item needs its place in the template")
        counts = (grid.prod(-1) // self.merge_units).tolist()
        return parts[0] + "".join(placeholder * n + rest for n, rest in zip(counts, parts[1:]))

    def _token_ids(self, text: str) -> torch.Tensor:
        return torch.tensor(self.tokenizer(text)["input_ids"], dtype=torch.long)

    def pixel_values(self, images: list) -> torch.Tensor:
        """Pixel values of already validated images (e.g. their masked copies)."""
        return self._processed(images)["pixel_values"]

    def _processed(self, images: list):
        """The image processor's output (pixel values, grids) at the run's min/max pixels."""
        return self.processor.image_processor(images=images, return_tensors="pt",
                                              **self.processor_kwargs)

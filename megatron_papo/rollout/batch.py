"""Rollouts -> :class:`~megatron_papo.rl.step.RolloutBatch`: prompt + response ids, masks, 3-D
MRoPE positions, the images of every sample (pixel values from the trainer-side processor, the
same one the engine used), the masked images for PAPO (``rl.masking`` on the RAW image, then the
processor) and the engine's log-probs aligned with the tokens."""

from __future__ import annotations

import torch

from megatron_papo.models.qwen2_5_vl.rope_index import get_rope_index
from megatron_papo.rl.masking import DEFAULT_PATCH, masked_copies
from megatron_papo.rl.step import RolloutBatch

from .engine import PromptRollout
from .inputs import PromptEncoder


def build_rollout_batch(prompts: list, rollouts: list[PromptRollout], encoder: PromptEncoder,
                        pad_multiple: int = 1, mask_ratio: float | None = None,
                        mask_patch: int = DEFAULT_PATCH, mask_seed: int = 0,
                        advantages: torch.Tensor | None = None) -> RolloutBatch:
    """One sample per response, in rollout order (prompt by prompt, its n responses together).

    ``prompts`` is the global prompt list the rollouts index into. ``pad_multiple``: sequence
    length rounded up to it (the TP size when sequence parallelism is on). ``mask_ratio``: PAPO's
    masked copies of the images (None: no masked branch). ``advantages`` [N] default zeros (the
    trainer fills them after the reward)."""
    if pad_multiple < 1:
        raise ValueError(f"pad_multiple={pad_multiple} must be >= 1")
    tokenizer = encoder.tokenizer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    merge = encoder.processor.image_processor.merge_size
    rows, prompt_lens, logps = [], [], []
    pixels, masked, grids, per_sample, prompt_positions, keys = [], [], [], [], [], []
    masked_images, masked_at = [], []  # every prompt's masked copies: one processor call
    distinct = 0  # the key of the prompt's first image (its samples share its images' keys)
    for rollout in rollouts:
        encoded = rollout.encoded or encoder.encode_one(prompts[rollout.index], rollout.index)
        if encoded.input_ids.tolist() != rollout.prompt_ids:
            raise RuntimeError(
                f"prompt {rollout.index}: the trainer's processor gives other prompt ids than the "
                "engine consumed; both must use the same processor, chat template and min/max "
                "pixels")
        # the prompt's MRoPE positions, once for its n responses (text after it continues them)
        prompt_positions.append(get_rope_index(encoded.input_ids[None], encoded.image_grid_thw,
                                               encoder.image_token_id, merge)[:, 0])
        if encoded.images and mask_ratio is not None:
            masked_at.append((encoded.image_grid_thw, len(rollout.responses)))
            masked_images += masked_copies(encoded.images, rollout.index, mask_ratio, mask_patch,
                                           mask_seed)
        for response in rollout.responses:
            if encoder.image_token_id in response.token_ids:
                raise ValueError(f"prompt {rollout.index}: a response holds the image-pad token "
                                 f"(id {encoder.image_token_id}), which only an image may use")
            rows.append(rollout.prompt_ids + response.token_ids)
            prompt_lens.append(len(rollout.prompt_ids))
            logps.append(response.logprobs)
            per_sample.append(len(encoded.images))
            if encoded.images:
                pixels.append(encoded.pixel_values)
                grids.append(encoded.image_grid_thw)
                keys.append(torch.arange(len(encoded.images)) + distinct)
        distinct += len(encoded.images)
    if not rows:
        raise ValueError("no rollouts to build a batch from")
    if masked_images:  # each sample's masked pixel values, in sample order
        values = encoder.pixel_values(masked_images)
        at = 0
        for grid, n in masked_at:
            count = int(grid.prod(-1).sum())
            masked += [values[at:at + count]] * n
            at += count
    width = max(len(r) for r in rows)
    width = -(-width // pad_multiple) * pad_multiple
    n = len(rows)
    input_ids = torch.tensor([r + [pad_id] * (width - len(r)) for r in rows], dtype=torch.long)
    columns = torch.arange(width)
    lengths = torch.tensor([len(r) for r in rows])[:, None]
    starts = torch.tensor(prompt_lens)[:, None]
    attention = (columns < lengths).long()
    response_mask = ((columns >= starts) & (columns < lengths)).long()
    rollout_logp = torch.tensor([[0.0] * start + lp + [0.0] * (width - start - len(lp))
                                 for start, lp in zip(prompt_lens, logps)], dtype=torch.float32)
    position_ids = torch.zeros(3, n, width, dtype=torch.long)
    first = 0
    for rollout, before in zip(rollouts, prompt_positions):
        start, last = before.shape[1], first + len(rollout.responses)
        after = int(before.max()) + 1 if start else 0
        position_ids[:, first:last, :start] = before[:, None]
        position_ids[:, first:last, start:] = torch.arange(after, after + width - start)
        first = last
    position_ids *= attention  # padding: position 0
    image_grid_thw = torch.cat(grids) if grids else None
    return RolloutBatch(
        input_ids=input_ids, attention_mask=attention, position_ids=position_ids,
        response_mask=response_mask,
        advantages=advantages if advantages is not None else torch.zeros(n),
        pixel_values=torch.cat(pixels) if pixels else None, image_grid_thw=image_grid_thw,
        images_per_sample=torch.tensor(per_sample) if grids else None,
        masked_pixel_values=torch.cat(masked) if masked else None,
        image_keys=torch.cat(keys) if keys else None,
        rollout_logp=rollout_logp)

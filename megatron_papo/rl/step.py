"""The RL update on megatron-core: micro-batches from a rollout batch, forward-only passes for the
old / reference / masked log-probs, and the PAPO policy update through megatron-core's
``forward_backward_func`` (any PP), DDP, the (distributed) optimizer and grad clipping.

Token alignment: every per-token tensor is [N, L] aligned with ``input_ids``; position t holds
log p(input_ids[t] | input_ids[:t]) (position 0 holds 0). ``response_mask`` marks the response
tokens, the only ones that enter the loss.

Masked branch (PAPO's implicit perception loss):
* ``frozen`` (the authors'): ``masked_logp`` computed once per rollout batch, with the rollout-time
  weights and no gradient (:meth:`PolicyUpdater.compute_logprobs` with ``masked=True``);
* ``live``: each micro-batch carries the original and the masked samples together (batch 2b; the
  masked ones use ``masked_pixel_values``) so one pipelined forward/backward serves both and the
  gradient flows through both branches; the pipeline schedule is unchanged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, fields, replace
from typing import Iterable

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_papo.parallel import model_device

from .algorithms import (
    LossConfig,
    LossInputs,
    aggregation_count,
    clipped_policy_loss,
    combined_loss,
)
from .logprobs import SampledDistribution, token_entropy, token_logprobs
from .packing import (
    pack,
    pack_shared,
    packed_length,
    plan_micro_batches,
    prompt_groups,
    sample_lengths,
    shared_length,
    split_to_count,
)

log = logging.getLogger(__name__)

MASKED_BRANCH_MODES = ("frozen", "live")


@dataclass
class RolloutBatch:
    """N sequences (prompt + response), padded to length L. Images of all samples are
    concatenated in sample order; ``images_per_sample`` [N] says how many each sample has."""

    input_ids: torch.Tensor                 # [N, L]
    attention_mask: torch.Tensor            # [N, L] 1 = token
    position_ids: torch.Tensor              # [3, N, L]
    response_mask: torch.Tensor             # [N, L] 1 = response token
    advantages: torch.Tensor                # [N]
    pixel_values: torch.Tensor | None = None          # [patches, C*T*P*P]
    image_grid_thw: torch.Tensor | None = None        # [images, 3]
    images_per_sample: torch.Tensor | None = None     # [N]
    masked_pixel_values: torch.Tensor | None = None   # like pixel_values, masked images
    # [images] one key per image: equal keys in a row = equal pixels (a prompt's image in its n
    # samples), so the vision tower encodes such a run once without comparing pixels (None:
    # it compares them); the masked copies share their originals' keys
    image_keys: torch.Tensor | None = None
    old_logp: torch.Tensor | None = None    # [N, L]; None: the current weights' (on-policy)
    ref_logp: torch.Tensor | None = None    # [N, L]
    masked_logp: torch.Tensor | None = None  # [N, L] (frozen branch)
    rollout_logp: torch.Tensor | None = None  # [N, L] the engine's log-probs (diagnostics)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device) -> "RolloutBatch":
        """The same batch with every tensor on ``device`` (the model's: the batch is built on
        the host, the trainer's passes read it on the GPU)."""
        return replace(self, **{
            f.name: getattr(self, f.name).to(device) for f in fields(self)
            if getattr(self, f.name) is not None})

    def select(self, start: int, end: int) -> "RolloutBatch":
        """Samples [start, end) with their images."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                out[f.name] = None
            elif f.name == "position_ids":
                out[f.name] = value[:, start:end]
            elif f.name in ("pixel_values", "masked_pixel_values", "image_grid_thw", "image_keys"):
                continue
            else:
                out[f.name] = value[start:end]
        if self.image_grid_thw is not None:
            counts = self.images_per_sample.tolist()
            first, last = sum(counts[:start]), sum(counts[:end])
            patches = self.image_grid_thw.prod(-1).tolist()
            p0, p1 = sum(patches[:first]), sum(patches[:last])
            out["image_grid_thw"] = self.image_grid_thw[first:last]
            if self.image_keys is not None:
                out["image_keys"] = self.image_keys[first:last]
            out["pixel_values"] = self.pixel_values[p0:p1]
            if self.masked_pixel_values is not None:
                out["masked_pixel_values"] = self.masked_pixel_values[p0:p1]
            if last == first:  # no image in this slice
                out["image_grid_thw"] = out["pixel_values"] = out["masked_pixel_values"] = None
                out["image_keys"] = None
        return RolloutBatch(**out)

    def take(self, indices: list[int]) -> "RolloutBatch":
        """The samples at ``indices`` (in that order) with their images."""
        if list(indices) == list(range(indices[0], indices[0] + len(indices))):
            return self.select(indices[0], indices[0] + len(indices))
        return RolloutBatch.concat([self.select(i, i + 1) for i in indices])

    @staticmethod
    def concat(parts: list["RolloutBatch"]) -> "RolloutBatch":
        """Parts of ONE rollout batch (its image keys), of one width, one after the other."""
        out = {}
        for f in fields(RolloutBatch):
            values = [getattr(p, f.name) for p in parts]
            present = [v for v in values if v is not None]
            if not present:
                out[f.name] = None
            elif f.name == "images_per_sample":
                out[f.name] = torch.cat([v if v is not None else torch.zeros(len(p), dtype=torch.long)
                                         for v, p in zip(values, parts)])
            elif f.name in ("pixel_values", "masked_pixel_values", "image_grid_thw", "image_keys"):
                out[f.name] = torch.cat(present)
            else:
                out[f.name] = torch.cat(present, dim=1 if f.name == "position_ids" else 0)
        if any(p.image_grid_thw is not None and p.image_keys is None for p in parts):
            out["image_keys"] = None  # keys for some images only: none (the pixels are compared)
        return RolloutBatch(**out)

    def with_masked_images(self) -> "RolloutBatch":
        """The same sequences with the masked images instead of the originals (a slice without
        images is its own masked copy)."""
        if self.pixel_values is None:
            return self
        if self.masked_pixel_values is None:
            raise ValueError("the masked branch needs masked_pixel_values in the rollout batch "
                             "(rl.masking must be on for PAPO)")
        return replace(self, pixel_values=self.masked_pixel_values)

    def paired(self) -> "RolloutBatch":
        """Original and masked samples in one batch [2N, L] (live masked branch)."""
        masked = self.with_masked_images()
        cat = {}
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(masked, f.name)
            if a is None:
                cat[f.name] = None
            elif f.name == "image_keys":  # the masked images are other images than the originals
                cat[f.name] = torch.cat([a, b - int(b.min()) + int(a.max()) + 1])
            elif f.name == "position_ids":
                cat[f.name] = torch.cat([a, b], dim=1)
            else:
                cat[f.name] = torch.cat([a, b], dim=0)
        cat["masked_pixel_values"] = None
        return RolloutBatch(**cat)


def shift_to_tokens(per_position: torch.Tensor) -> torch.Tensor:
    """Values computed at position t for token t+1 -> aligned with the tokens (position 0 = 0)."""
    return torch.nn.functional.pad(per_position[:, :-1], (1, 0))


def model_forward(model, mb: RolloutBatch) -> torch.Tensor:
    return model(mb.input_ids, mb.position_ids, mb.attention_mask, mb.pixel_values,
                 mb.image_grid_thw, image_keys=mb.image_keys)


def image_ids(batch: "RolloutBatch") -> list[tuple | None]:
    """Per sample: the keys of its images in order (``()`` without images; ``None`` when its
    images have no keys: such a sample's prompt is never shared)."""
    if batch.images_per_sample is None:
        return [()] * len(batch)
    counts = batch.images_per_sample.tolist()
    keys = batch.image_keys.tolist() if batch.image_keys is not None else None
    out, at = [], 0
    for count in counts:
        out.append(() if count == 0 else (tuple(keys[at:at + count]) if keys else None))
        at += count
    return out


class _Layout:
    """How one micro-batch meets the model. ``mb``: the micro-batch (its padded [n, L] tensors
    are what the loss sees); ``run``: what the model runs (``mb`` or, for the live masked
    branch, its original + masked pair). Padded: ``run`` as it is. Packed: ``run``'s samples in
    one row (rl/packing.py); with ``groups`` (shared prompts, :func:`~.packing.pack_shared`)
    each group's prompt once. :meth:`token_logprobs` and :meth:`per_token` bring the model's
    per-position values back to ``run``'s token-aligned [n, L] layout."""

    def __init__(self, mb: "RolloutBatch", run: "RolloutBatch", packed_to: int | None = None,
                 groups: list[list[int]] | None = None):
        self.mb, self.run = mb, run
        self.row = self.shared = None
        self.images = run
        if groups is not None:
            self.shared = pack_shared(run.input_ids, run.position_ids, run.attention_mask,
                                      run.response_mask, groups, packed_to)
            self.images = run.take(self.shared.leaders)   # each group's images once
        elif packed_to is not None:
            self.row = pack(run.input_ids, run.position_ids, run.attention_mask, packed_to)
            self.targets = self.row.targets
        else:
            self.targets = torch.nn.functional.pad(run.input_ids[:, 1:], (0, 1))

    def forward(self, model) -> torch.Tensor:
        row = self.shared if self.shared is not None else self.row
        if row is None:
            return model_forward(model, self.run)
        return model(row.input_ids, row.position_ids, None, self.images.pixel_values,
                     self.images.image_grid_thw, packed_seq_params=row.params,
                     image_keys=self.images.image_keys)

    def token_logprobs(self, logits: torch.Tensor) -> torch.Tensor:
        """[n, L] log p(token | the tokens before it), position 0 and padding 0."""
        if self.shared is None:
            return self.per_token(token_logprobs(logits, self.targets))

        def at(positions, targets):
            return token_logprobs(logits if positions is None else logits[:, positions], targets)
        return self.shared.token_logprobs(at)

    def per_token(self, per_position: torch.Tensor) -> torch.Tensor:
        """Values of each position that do not depend on the next token (entropies) -> [n, L]."""
        if self.shared is not None:
            return self.shared.per_token(per_position)
        if self.row is None:
            return shift_to_tokens(per_position)
        return self.row.per_token(per_position)


@dataclass
class UpdateConfig:
    micro_batch_size: int = 2
    mini_batch_size: int = 4          # sequences per optimizer step
    masked_branch: str = "frozen"     # "frozen" (authors') or "live"
    loss: LossConfig = field(default_factory=LossConfig)
    # what the engine sampled from (its temperature and suppressed ids): scored exactly
    distribution: SampledDistribution = field(default_factory=SampledDistribution)
    # packed (THD) micro-batches: the samples of a micro-batch in one row, no padding computed
    # (the same update: rl/packing.py); pad_multiple: the packed row's length is a multiple of it
    # (TP with sequence parallelism, 16 with FP8)
    packing: bool = False
    pad_multiple: int = 1
    # > 0: micro-batches by tokens instead of samples (bin-packed under this budget; packing only)
    max_tokens_per_micro_batch: int = 0
    # packing only: a micro-batch's samples with the same prompt run it once (rl/packing.py;
    # the local spec's attention: Transformer Engine's cannot keep the responses apart)
    share_prompts: bool = False

    def __post_init__(self):
        if self.max_tokens_per_micro_batch < 0:
            raise ValueError(f"trainer.max_tokens_per_micro_batch="
                             f"{self.max_tokens_per_micro_batch} must be >= 0 (0: off)")
        if self.max_tokens_per_micro_batch and not self.packing:
            raise ValueError("trainer.max_tokens_per_micro_batch needs trainer.packing=true")
        if self.share_prompts and not self.packing:
            raise ValueError("trainer.share_prompts needs trainer.packing=true")
        if self.masked_branch not in MASKED_BRANCH_MODES:
            raise ValueError(f"rl.masked_branch={self.masked_branch!r}: choose one of "
                             f"{list(MASKED_BRANCH_MODES)}")
        if self.mini_batch_size % self.micro_batch_size:
            raise ValueError(f"rl.mini_batch_size={self.mini_batch_size} must be a multiple of "
                             f"rl.micro_batch_size={self.micro_batch_size}")


class PolicyUpdater:
    """Runs forward-only log-prob passes and PAPO updates on megatron-core model chunks."""

    def __init__(self, model_chunks: list, optimizer, config: UpdateConfig):
        self.model = model_chunks
        self.optimizer = optimizer
        self.config = config

    # ------------------------------------------------------------------ forward only
    @torch.no_grad()
    def compute_logprobs(self, batch: RolloutBatch, model_chunks: list | None = None,
                         masked: bool = False) -> torch.Tensor | None:
        """Token-aligned log-probs [N, L] of ``batch`` under ``model_chunks`` (default: the
        policy; pass the reference model's chunks for ref_logp). ``masked=True`` uses the masked
        images. Computed on the last pipeline stage and broadcast to every stage."""
        chunks = model_chunks or self.model
        if masked:
            batch = batch.with_masked_images()
        stored: list[torch.Tensor] = []
        plan, micro = self.micro_batches(batch, paired=False)
        layouts, seq_length, run_mbs = self.layouts(micro, paired=False)

        def forward_step(data_iterator, model):
            layout = next(data_iterator)
            output = layout.forward(model)

            def keep(logits):
                logits = self.sampling_logits(logits)
                stored.append(layout.token_logprobs(logits))
                return logits.sum() * 0.0, {}
            return output, keep

        for chunk in chunks:
            chunk.eval()
        try:
            get_forward_backward_func()(
                forward_step_func=forward_step, data_iterator=iter(layouts), model=chunks,
                num_microbatches=len(layouts), seq_length=seq_length,
                micro_batch_size=run_mbs, forward_only=True)
        finally:
            for chunk in chunks:
                chunk.train()
        # on the model's device (NCCL broadcasts GPU tensors), returned on the batch's
        result = torch.empty(batch.input_ids.shape, dtype=torch.float32, device=model_device())
        if parallel_state.is_pipeline_last_stage():
            for indices, values in zip(plan, stored):
                result[indices] = values.float()
        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            torch.distributed.broadcast(
                result, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                group=parallel_state.get_pipeline_model_parallel_group())
        return result.to(batch.input_ids.device)

    def sampling_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return self.config.distribution.logits(logits)

    def micro_batches(self, batch: RolloutBatch, paired: bool
                      ) -> tuple[list[list[int]], list[RolloutBatch]]:
        """(sample indices of each micro-batch, the micro-batches): fixed
        ``micro_batch_size`` slices, or bins under ``max_tokens_per_micro_batch`` with the same
        count on every data-parallel rank."""
        c = self.config
        if not c.max_tokens_per_micro_batch:
            mbs = c.micro_batch_size
            plan = [list(range(i, min(i + mbs, len(batch)))) for i in range(0, len(batch), mbs)]
        else:
            plan = plan_micro_batches(sample_lengths(batch.attention_mask),
                                      c.max_tokens_per_micro_batch, weight=2 if paired else 1)
            count = torch.tensor([len(plan)])
            if parallel_state.get_data_parallel_world_size() > 1:
                torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.MAX,
                                             group=parallel_state.get_data_parallel_group())
            plan = split_to_count(plan, int(count))
        return plan, [batch.take(p) for p in plan]

    def layouts(self, micro: list[RolloutBatch], paired: bool
                ) -> tuple[list[_Layout], int, int]:
        """The micro-batches as the model will run them (``paired``: original + masked together)
        and the (seq_length, micro_batch_size) of the schedule. Packed rows share one length
        under pipeline parallelism (the p2p tensors have one shape per schedule)."""
        runs = [mb.paired() if paired else mb for mb in micro]
        if not self.config.packing:
            width = max(r.input_ids.shape[1] for r in runs)
            return ([_Layout(mb, run) for mb, run in zip(micro, runs)], width,
                    max(len(r) for r in runs))
        multiple = self.config.pad_multiple
        if self.config.share_prompts:
            groups = [prompt_groups(r.input_ids, r.attention_mask, r.response_mask, image_ids(r))
                      for r in runs]
            lengths = [shared_length(r.attention_mask, r.response_mask, g, multiple)
                       for r, g in zip(runs, groups)]
        else:
            groups = [None] * len(runs)
            lengths = [packed_length(sample_lengths(r.attention_mask), multiple) for r in runs]
        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            lengths = [max(lengths)] * len(lengths)
        return ([_Layout(mb, run, n, g) for mb, run, n, g in zip(micro, runs, lengths, groups)],
                max(lengths), 1)

    # ------------------------------------------------------------------ the loss
    def branch_logprobs(self, model, layout: _Layout):
        """(output of this stage, function logits -> (logp, masked_logp, entropy, masked_entropy))
        for one micro-batch: live mode runs the paired batch, frozen the original only."""
        live = self.config.masked_branch == "live" and self.config.loss.needs_masked_branch
        mb = layout.mb
        output = layout.forward(model)
        exact = self.config.loss.entropy_estimator == "exact"
        b = len(mb)

        def split(logits):
            logits = self.sampling_logits(logits)
            logp = layout.token_logprobs(logits)
            entropy = layout.per_token(token_entropy(logits)) if exact else None
            if live:
                return (logp[:b], logp[b:], entropy[:b] if exact else None,
                        entropy[b:] if exact else None)
            return logp, mb.masked_logp, entropy, None
        return output, split

    def _loss_func(self, mb: RolloutBatch, split, denominator: float, scale: float,
                   tokens: float):
        """``denominator``: the mini-batch's aggregation count over all micro-batches and DP
        ranks; ``scale`` undoes megatron-core's averaging over micro-batches and DP ranks, so that
        the gradient is that of the mini-batch's aggregate (micro-batch size and DP invariant).
        ``tokens``: the mini-batch's response tokens (all ranks): per-token metrics (clip
        fractions, entropies) are shares of the mini-batch's token mean, the same invariance."""
        cfg = self.config.loss

        def token_mean(values, mask):
            return (values.float() * mask).sum() / tokens * scale

        def loss_func(logits):
            logp, masked_logp, entropy, masked_entropy = split(logits)
            # on-policy (no old_logp, one mini-batch): the sampling weights are these weights,
            # so the old log-probs are this forward's own (ratio 1) and need no forward of their own
            old_logp = mb.old_logp if mb.old_logp is not None else logp.detach()
            inputs = LossInputs(logp=logp, mask=mb.response_mask, advantages=mb.advantages,
                                old_logp=old_logp, ref_logp=mb.ref_logp,
                                masked_logp=masked_logp, entropy=entropy,
                                masked_entropy=masked_entropy)
            loss, parts = combined_loss(inputs, cfg, denominator)
            loss = loss * scale
            parts = {k: v * scale for k, v in parts.items()}
            pg = clipped_policy_loss(logp.detach(), old_logp, mb.advantages, cfg.eps_low,
                                     cfg.eps_high, cfg.dual_clip)
            mask = mb.response_mask
            metrics = {f"loss/{k}": v for k, v in parts.items()}
            metrics.update({
                # a copy: megatron-core divides the returned loss by the micro-batch count in place
                "loss/total": loss.detach().clone(),
                "clip/high": token_mean(pg.clipped_high, mask),
                "clip/low": token_mean(pg.clipped_low, mask),
                "clip/dual": token_mean(pg.clipped_dual, mask),
                "entropy/original": token_mean(-logp.detach(), mask),
                "response/length": mask.float().sum(-1).mean(),
                "response/tokens": mask.float().sum(),
            })
            if masked_logp is not None:
                metrics["entropy/masked"] = token_mean(-masked_logp.detach(), mask)
            if mb.rollout_logp is not None:
                # engine vs trainer on the same tokens; in a rollout's FIRST mini-batch the
                # weights are still those the engine sampled with, so this is the mismatch the
                # trainer's recomputation would measure, without its extra forward
                metrics["check/logprob_mismatch"] = token_mean(
                    (logp.detach() - mb.rollout_logp).abs(), mask)
            return loss, metrics
        return loss_func

    # ------------------------------------------------------------------ the update
    def update(self, batch: RolloutBatch) -> list[dict]:
        """One optimizer step per mini-batch of the rollout batch; returns the metrics of each.
        Without ``old_logp`` the batch must be one mini-batch (its weights are the sampling
        weights: the ratio is 1 and the forward that computes the loss gives the old log-probs)."""
        cfg = self.config
        missing = ["advantages"] if batch.advantages is None else []
        if batch.old_logp is None and len(batch) > cfg.mini_batch_size:
            missing.append("old_logp (several mini-batches: the later ones are off-policy)")
        if cfg.loss.kl_beta > 0 and batch.ref_logp is None:
            missing.append("ref_logp")
        if (cfg.loss.needs_masked_branch and cfg.masked_branch == "frozen"
                and batch.masked_logp is None):
            missing.append("masked_logp")
        if missing:
            raise ValueError(f"rollout batch lacks {missing} needed by the loss")
        results = []
        for start in range(0, len(batch), cfg.mini_batch_size):
            mini = batch.select(start, min(start + cfg.mini_batch_size, len(batch)))
            results.append(self._step(mini))
        return results

    def _step(self, mini: RolloutBatch) -> dict:
        cfg = self.config
        live = cfg.masked_branch == "live" and cfg.loss.needs_masked_branch
        _, micro = self.micro_batches(mini, paired=live)
        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()

        # megatron-core divides each micro-batch's loss by their number and DDP averages the
        # gradients over DP: dividing by the whole mini-batch's count (summed over DP) and scaling
        # by micro-batches x DP makes the update that of the mini-batch aggregate.
        dp = parallel_state.get_data_parallel_world_size()
        count = aggregation_count(mini.response_mask, cfg.loss.aggregation)
        tokens = mini.response_mask.sum().float().reshape(1)
        counts = torch.cat([count.reshape(1).float(), tokens])
        if dp > 1:
            torch.distributed.all_reduce(counts, group=parallel_state.get_data_parallel_group())
        denominator = counts[0].clamp_min(1.0)
        tokens = float(counts[1].clamp_min(1.0))
        scale = float(len(micro) * dp)

        layouts, seq_length, run_mbs = self.layouts(micro, paired=live)

        def forward_step(data_iterator, model):
            layout = next(data_iterator)
            output, split = self.branch_logprobs(model, layout)
            return output, self._loss_func(layout.mb, split, denominator, scale, tokens)

        per_micro = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(layouts), model=self.model,
            num_microbatches=len(layouts), seq_length=seq_length,
            micro_batch_size=run_mbs, forward_only=False)
        ok, grad_norm, _ = self.optimizer.step()
        metrics = _shared_metrics(_mean_metrics(per_micro))
        metrics["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
        metrics["update_ok"] = bool(ok)
        return metrics


def _shared_metrics(metrics: dict) -> dict:
    """The loss metrics on every rank: computed on the last pipeline stage (broadcast over the
    pipeline group), averaged over data-parallel ranks (each rank's loss terms are its share of
    the mini-batch aggregate, scaled by DP: their mean IS the aggregate)."""
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        box = [metrics]
        torch.distributed.broadcast_object_list(
            box, src=parallel_state.get_pipeline_model_parallel_last_rank(),
            group=parallel_state.get_pipeline_model_parallel_group())
        metrics = box[0]
    return mean_over_data_parallel(metrics)


def mean_over_data_parallel(values: dict[str, float]) -> dict[str, float]:
    """The mean of each per-rank value over the data-parallel group (the same on every rank;
    every rank must pass the same keys)."""
    dp = parallel_state.get_data_parallel_world_size()
    if dp == 1 or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    torch.distributed.all_reduce(t, group=parallel_state.get_data_parallel_group())
    return dict(zip(keys, (t / dp).tolist()))


def _mean_metrics(per_micro: Iterable[dict]) -> dict:
    per_micro = list(per_micro)
    if not per_micro:
        return {}
    return {k: float(torch.stack([torch.as_tensor(m[k]).float() for m in per_micro]).mean())
            for k in per_micro[0]}


class PerceptionHackingMonitor:
    """Warns when the paper's symptoms of "KL_prcp hacking" appear together (Sec. on the Double
    Entropy Loss): the policy inflates the perception KL it is rewarded for (the perception
    loss, -gamma * KL, drops sharply) by emitting tokens unrelated to the image, while the
    entropies of both branches rise and so does the high-side clip fraction. Compares each
    step with the mean of the previous ``window`` steps: KL above ``spike`` x its recent mean,
    both entropies above ``rise`` x theirs, and - when the run clips at all (several optimizer
    steps per rollout; with one step the ratio is 1 and nothing clips) - the high-side clip
    fraction above ``rise`` x its recent mean. A jump of less than ``min_jump`` nats is noise
    (a collapsed policy's KL of 0.003 doubling is no hacking). The trainer passes each step's
    metrics as the mean over its mini-batches. The rule is frozen for the gamma sweep of
    docs/experiments.md (its definitions of a hacked run and of true/false positives)."""

    def __init__(self, window: int = 5, spike: float = 2.0, rise: float = 1.2,
                 min_jump: float = 0.1):
        self.window, self.spike, self.rise, self.min_jump = window, spike, rise, min_jump
        self.history: list[dict] = []

    def check(self, metrics: dict) -> bool:
        keys = ("loss/kl_prcp", "clip/high", "entropy/original", "entropy/masked")
        if not all(k in metrics for k in keys):
            return False
        past = self.history[-self.window:]
        self.history.append({k: metrics[k] for k in keys})
        if len(past) < self.window:
            return False
        mean = {k: sum(p[k] for p in past) / len(past) for k in keys}
        clips = mean["clip/high"] > 0 or metrics["clip/high"] > 0
        kl = metrics["loss/kl_prcp"]
        hacking = (kl > self.spike * mean["loss/kl_prcp"]
                   and kl - mean["loss/kl_prcp"] >= self.min_jump
                   and (not clips or metrics["clip/high"] > self.rise * mean["clip/high"])
                   and metrics["entropy/original"] > self.rise * mean["entropy/original"]
                   and metrics["entropy/masked"] > self.rise * mean["entropy/masked"])
        if hacking:
            log.warning(
                "KL_prcp hacking suspected: perception KL rose to %.3g (recent mean %.3g) while "
                "both entropies (%.3g, %.3g) and the high-side clip fraction (%.3g) rose. "
                "Lower the perception weight (prcp_gamma) or enable the double entropy loss "
                "(entropy_eta_original/masked, as papo_h does).",
                metrics["loss/kl_prcp"], mean["loss/kl_prcp"], metrics["entropy/original"],
                metrics["entropy/masked"], metrics["clip/high"])
        return hacking

"""Per-token log-probabilities and entropies from vocab-parallel logits, without gathering the
vocabulary (megatron-core's vocab-parallel cross-entropy pattern: local max / sum-exp / target
pick, all-reduced over the tensor-parallel group). Differentiable."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy
from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region


# The logit given to suppressed ids when scoring: exp() of it underflows to exactly 0 in fp32
# (probability 0, as the engine's -inf), yet it stays finite, so log-probs at prompt positions
# whose target is a suppressed id (the image pads) never turn a masked sum into NaN.
SUPPRESSED_LOGIT = -1.0e4


@dataclass(frozen=True)
class SampledDistribution:
    """The distribution the rollout engine samples from, which the trainer must score: logits /
    ``temperature`` (0 = greedy is scored at 1) with ``suppressed_token_ids`` at probability 0.
    The engine gives it (``RolloutEngine.distribution``) from the run's sampling settings and its
    tokenizer; the temperature is checked there, once."""

    temperature: float = 1.0
    suppressed_token_ids: tuple[int, ...] = ()

    def logits(self, logits: torch.Tensor) -> torch.Tensor:
        return sampling_logits(logits, self.temperature, self.suppressed_token_ids)


def sampling_logits(logits: torch.Tensor, temperature: float = 1.0,
                    suppressed_token_ids=()) -> torch.Tensor:
    """The logits of the distribution the rollout engine samples from: this rank's vocab shard
    [b, s, v/TP] in fp32, divided by ``temperature`` (0 = greedy is scored at 1), with the
    suppressed ids (vision special tokens, padding rows; global ids) set to a logit whose
    probability is exactly 0. Differentiable."""
    z = logits.float()
    if temperature > 0 and temperature != 1.0:
        z = z / temperature
    if len(suppressed_token_ids):
        local = z.shape[-1]
        start = parallel_state.get_tensor_model_parallel_rank() * local
        ids = torch.as_tensor(list(suppressed_token_ids), dtype=torch.long)
        ids = ids[(ids >= start) & (ids < start + local)] - start
        if ids.numel():
            mask = torch.zeros(local, dtype=torch.bool, device=z.device)
            mask[ids.to(z.device)] = True
            z = z.masked_fill(mask, SUPPRESSED_LOGIT)
    return z


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) per position. logits [b, s, v/TP] (this rank's vocab shard), targets [b, s]
    -> [b, s] (fp32). ``logits`` is left as it was: megatron-core's cross-entropy overwrites the
    tensor it is given (minus the max, then exp in place), and for b = 1 (a packed row) the
    transposed tensor is contiguous, i.e. the caller's own storage: it gets a copy then."""
    shaped = logits.transpose(0, 1).float().contiguous()
    if shaped.data_ptr() == logits.data_ptr():
        shaped = shaped.clone()
    loss = vocab_parallel_cross_entropy(shaped, targets.transpose(0, 1).contiguous())
    return -loss.transpose(0, 1)


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Exact entropy -sum_v p log p per position from vocab-parallel logits [b, s, v/TP] -> [b, s].

    H = log Z - sum_v p_v z_v with z = logits - max (the max is a constant for autograd: softmax is
    shift-invariant); the sums over the vocabulary are all-reduced across the TP group, whose
    backward is the identity, so every rank gets the gradient of its own shard."""
    z = logits.float()
    group = parallel_state.get_tensor_model_parallel_group()
    local_max = z.max(dim=-1, keepdim=True).values.detach()
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        torch.distributed.all_reduce(local_max, op=torch.distributed.ReduceOp.MAX, group=group)
        reduce = reduce_from_tensor_model_parallel_region
    else:
        def reduce(x):
            return x
    z = z - local_max
    exp = z.exp()
    sum_exp = reduce(exp.sum(-1))
    weighted = reduce((exp * z).sum(-1))
    return sum_exp.log() - weighted / sum_exp

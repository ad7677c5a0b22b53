"""The rollout side of RL: a colocated vLLM engine (``engine``), the shared prompt processing
(``inputs``), Megatron -> engine weight sync in buckets (``weights``) and rollouts ->
``RolloutBatch`` (``batch``).

Importing this package does not import vLLM; building a :class:`RolloutEngine` does."""

from .batch import build_rollout_batch
from .engine import (
    EngineConfig,
    PromptRollout,
    Response,
    RolloutEngine,
    SamplingConfig,
    ScoreRequest,
    close_all_engines,
)
from .inputs import EncodedPrompt, PromptEncoder, RolloutInputError
from .weights import DEFAULT_BUCKET_BYTES, PushStats, iter_hf_weights

__all__ = [
    "DEFAULT_BUCKET_BYTES", "EncodedPrompt", "EngineConfig", "PromptEncoder", "PromptRollout",
    "PushStats", "Response", "RolloutEngine", "RolloutInputError", "SamplingConfig",
    "ScoreRequest", "build_rollout_batch", "close_all_engines", "iter_hf_weights",
]

"""The rollout side of RL: a colocated vLLM engine (``engine``), its settings (``settings``: the
``rollout`` config group), the shared prompt processing (``inputs``), Megatron -> engine weight
sync in buckets (``weights``) and rollouts -> ``RolloutBatch`` (``batch``).

Importing this package imports nothing heavy: each name is loaded from its module on first use
(the main job reads the settings before torch, megatron-core or vLLM are imported)."""

from __future__ import annotations

import importlib

_HOMES = {
    "build_rollout_batch": "batch",
    "PromptRollout": "engine", "Response": "engine", "RolloutEngine": "engine",
    "ScoreRequest": "engine", "close_all_engines": "engine",
    "EncodedPrompt": "inputs", "PromptEncoder": "inputs",
    "EngineConfig": "settings", "EngineSettings": "settings", "PromptTooLongError": "settings",
    "RolloutInputError": "settings",
    "Sampling": "settings", "SamplingConfig": "settings", "SamplingError": "settings",
    "DEFAULT_BUCKET_BYTES": "weights", "PushStats": "weights", "iter_hf_weights": "weights",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
    globals()[name] = value
    return value

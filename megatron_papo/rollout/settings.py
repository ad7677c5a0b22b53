"""The settings of the rollout: the ``rollout`` config group's keys (:class:`Sampling` and
:class:`EngineSettings`, with their one set of defaults and their checks) and what one generate
call (:class:`SamplingConfig`) and one engine (:class:`EngineConfig`) add to them. Light: no torch,
no vLLM, so that the main job's config reads them before anything heavy is imported."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from megatron_papo.settings import SettingError


class RolloutInputError(ValueError):
    """A prompt or sampling setting that cannot be rolled out; the message names the field."""


class PromptTooLongError(RolloutInputError):
    """Prompt ``index`` has ``length`` tokens; with ``max_new_tokens`` it exceeds the engine's
    ``max_model_len`` (the message names the ``rollout`` keys; other front ends read the
    fields)."""

    def __init__(self, index: int, length: int, max_new_tokens: int, max_model_len: int):
        self.index, self.length = index, length
        self.max_new_tokens, self.max_model_len = max_new_tokens, max_model_len
        super().__init__(f"prompt {index}: {length} tokens + rollout.max_new_tokens="
                         f"{max_new_tokens} exceed rollout.max_model_len={max_model_len}; raise "
                         "max_model_len or drop long prompts (data.max_prompt_length)")


class SamplingError(SettingError, RolloutInputError):
    """A sampling or engine setting out of range; the message names the field (the main job's
    config names the full key, ``rollout.<field>``)."""


def _check(rules: list[tuple[bool, str, object, str]]) -> None:
    for ok, name, value, allowed in rules:
        if not ok:
            raise SamplingError(name, f"={value!r} is invalid: must be {allowed}")


@dataclass(kw_only=True)
class Sampling:
    """The sampling keys of the ``rollout`` config group; their one set of defaults (the main
    job's). :class:`SamplingConfig` adds what one generate call needs besides."""

    n: int = 8                  # samples per prompt (GRPO's group size; k of an avg@k)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = 16

    def __post_init__(self):
        _check([
            (isinstance(self.n, int) and self.n >= 1, "n", self.n, "an integer >= 1"),
            (self.temperature >= 0, "temperature", self.temperature, ">= 0 (0 = greedy)"),
            (0 < self.top_p <= 1, "top_p", self.top_p, "in (0, 1]"),
            (self.top_k == -1 or self.top_k >= 1, "top_k", self.top_k, "-1 (off) or >= 1"),
            (isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1,
             "max_new_tokens", self.max_new_tokens, "an integer >= 1"),
        ])

    def sampling_fields(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(Sampling)}


@dataclass(kw_only=True)
class SamplingConfig(Sampling):
    """Sampling settings of one generate call: the ``rollout`` keys, stop conditions and the
    seed."""

    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = 0

    def __post_init__(self):
        super().__post_init__()
        self.stop = tuple(self.stop)
        self.stop_token_ids = tuple(self.stop_token_ids)


DTYPES = ("float32", "bfloat16", "float16")


@dataclass(kw_only=True)
class EngineSettings:
    """The engine keys of the ``rollout`` config group; their one set of defaults (the main
    job's, on CPU)."""

    dtype: str = "float32"
    tensor_parallel_size: int = 1
    max_model_len: int = 512
    kv_cache_mb: int = 64                   # CPU: the KV cache must be sized explicitly
    gpu_memory_utilization: float = 0.5     # GPU: share of the device for weights + KV cache
    max_num_seqs: int = 512                 # sequences per engine step (0: vLLM's default)
    # tokens per KV-cache block (null: vLLM's, 128 on CPU, 16 on GPU); prefix-cache hits, e.g.
    # the prompt shared by the n scored responses of the engine's masked branch, are whole blocks
    block_size: int | None = None
    min_pixels: int | None = 28 * 28        # the image processor's bounds (null: its own)
    max_pixels: int | None = 56 * 56
    # images per prompt the engine accepts (vLLM's limit_mm_per_prompt: its memory profiling and
    # encoder budget follow it); null: the main job takes the most any data row has, else 1
    max_images_per_prompt: int | None = None

    def __post_init__(self):
        _check([
            (self.dtype in DTYPES, "dtype", self.dtype, f"one of {list(DTYPES)}"),
            (self.tensor_parallel_size >= 1, "tensor_parallel_size", self.tensor_parallel_size,
             ">= 1"),
            (self.max_model_len >= 2, "max_model_len", self.max_model_len, ">= 2"),
            (self.kv_cache_mb >= 0, "kv_cache_mb", self.kv_cache_mb, ">= 0 (GPU: unused)"),
            (0 < self.gpu_memory_utilization <= 1, "gpu_memory_utilization",
             self.gpu_memory_utilization, "in (0, 1]"),
            (self.max_num_seqs >= 0, "max_num_seqs", self.max_num_seqs, ">= 0 (0: vLLM's)"),
            (self.block_size is None or self.block_size in (8, 16, 32, 64, 128, 256),
             "block_size", self.block_size, "null (vLLM's) or a power of 2 from 8 to 256"),
            (self.max_images_per_prompt is None or self.max_images_per_prompt >= 1,
             "max_images_per_prompt", self.max_images_per_prompt, ">= 1 (null: from the data)"),
        ])

    def engine_fields(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(EngineSettings)}


@dataclass(kw_only=True)
class EngineConfig(EngineSettings):
    """The rollout engine: the ``rollout`` keys of :class:`EngineSettings` and the model.
    ``model_path`` is an HF folder: config, tokenizer, processor and weights (the trainer pushes
    Megatron's weights before the first rollout anyway).

    vLLM's ``load_format="dummy"`` is refused: it randomises persistent buffers that no checkpoint
    holds and no weight push restores (the vision input normalisation's mean/std), so image
    prompts would silently see corrupted pixels."""

    model_path: str = dataclasses.field(kw_only=False)
    load_format: str = "auto"
    sleep_while_training: bool = True       # GPU: give the memory back between rollouts
    enforce_eager: bool = True
    seed: int = 0

    def __post_init__(self):
        super().__post_init__()
        if self.max_images_per_prompt is None:
            self.max_images_per_prompt = 1
        if self.load_format not in ("auto", "safetensors"):
            raise SamplingError("load_format", f"={self.load_format!r}: choose auto or "
                                "safetensors ('dummy' corrupts the vision input normalisation "
                                "buffers, which no weight push restores)")

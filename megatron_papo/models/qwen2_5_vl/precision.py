"""FP8 and the GPU-only performance settings of the training model, as megatron-core
``TransformerConfig`` / DDP fields, with the checks that say why a setting cannot run here.

FP8 (Transformer Engine spec only): megatron-core's ``fp8`` format (``hybrid``: E4M3 forward,
E5M2 gradients; ``e4m3``) with the ``delayed`` (amax history) or ``current`` (per-tensor current
scaling, megatron's ``tensorwise``) recipe. Parameters stay bf16 with fp32 main weights and grads
(the distributed optimizer); the vision tower stays bf16 unless ``fp8_vision``; with the current
recipe the first / last decoder layers can stay bf16. FP8 applies to the trainer's forward and
backward only: the rollout engine receives bf16/fp32 weights and samples in its own dtype.

Every ``*_problem`` function returns None when the setting can run, else one line naming the
config key, the cause and the fix (the trainer raises it as a ``ConfigError``; the tools print it).
"""

from __future__ import annotations

import importlib.util

import torch

LAYER_SPECS = ("local", "te")  # specs.py builds them
FP8_FORMATS = ("hybrid", "e4m3")
# our name -> megatron-core's fp8_recipe
FP8_RECIPES = {"delayed": "delayed", "current": "tensorwise"}
RECOMPUTE_GRANULARITIES = ("selective", "full")
RECOMPUTE_METHODS = ("uniform", "block")
# settings that need Transformer Engine's CUDA kernels (fused RoPE, fused weight-gradient
# accumulation); the communication overlap (DDP) runs anywhere and pays off on GPUs
GPU_ONLY = ("gradient_accumulation_fusion", "apply_rope_fusion")


def transformer_engine_available() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None


def fp8_fields(fp8: str | None, recipe: str = "delayed", bf16_first_layers: int = 0,
               bf16_last_layers: int = 0, amax_history_len: int = 1024) -> dict:
    """The TransformerConfig fields of an FP8 setting ({} without FP8)."""
    if not fp8:
        return {}
    fields = dict(fp8=fp8, fp8_recipe=FP8_RECIPES[recipe])
    if recipe == "delayed":
        fields.update(fp8_amax_history_len=amax_history_len, fp8_amax_compute_algo="max")
    if bf16_first_layers or bf16_last_layers:
        fields.update(first_last_layers_bf16=True, num_layers_at_start_in_bf16=bf16_first_layers,
                      num_layers_at_end_in_bf16=bf16_last_layers)
    return fields


def gpu_name_and_capability() -> tuple[str, tuple[int, int]] | None:
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_name(), torch.cuda.get_device_capability()


def layer_spec_problem(layer_spec: str, key: str = "model.layer_spec") -> str | None:
    if layer_spec not in LAYER_SPECS:
        return f"{key}={layer_spec!r}: choose one of {list(LAYER_SPECS)}"
    if layer_spec == "te" and not transformer_engine_available():
        return (f"{key}=te needs Transformer Engine, which is not installed here (GPU install: "
                f"bash scripts/install.sh --gpu); use {key}=local")
    return None


def fp8_problem(fp8: str | None, recipe: str = "delayed", layer_spec: str = "te",
                params_dtype: str = "bfloat16", bf16_first_layers: int = 0,
                bf16_last_layers: int = 0, prefix: str = "model.",
                device: tuple[str, tuple[int, int]] | None | str = "detect",
                te: bool | None = None) -> str | None:
    """Why this FP8 setting cannot run on this machine (None: it can). ``device``: (name,
    compute capability) of the GPU, None for no GPU, "detect" to look; ``te``: whether
    Transformer Engine is installed (None: look)."""
    if not fp8:
        return None
    if fp8 not in FP8_FORMATS:
        return f"{prefix}fp8={fp8!r}: choose one of {list(FP8_FORMATS)} or null (no FP8)"
    if recipe not in FP8_RECIPES:
        return f"{prefix}fp8_recipe={recipe!r}: choose one of {list(FP8_RECIPES)}"
    for name, value in (("fp8_bf16_first_layers", bf16_first_layers),
                        ("fp8_bf16_last_layers", bf16_last_layers)):
        if value < 0:
            return f"{prefix}{name}={value} must be >= 0"
    if not (transformer_engine_available() if te is None else te):
        return (f"{prefix}fp8={fp8} needs Transformer Engine, which is not installed here (GPU "
                f"install: bash scripts/install.sh --gpu); set {prefix}fp8=null")
    gpu = gpu_name_and_capability() if device == "detect" else device
    if gpu is None:
        return f"{prefix}fp8={fp8} needs a GPU (none is visible); set {prefix}fp8=null"
    name, capability = gpu
    if tuple(capability) < (8, 9):
        return (f"{prefix}fp8={fp8} needs a GPU with FP8 tensor cores (Hopper sm_90 or Ada sm_89); "
                f"this is {name} (sm_{capability[0]}{capability[1]}): set {prefix}fp8=null")
    if (bf16_first_layers or bf16_last_layers) and recipe == "delayed":
        return (f"{prefix}fp8_bf16_first_layers / fp8_bf16_last_layers need "
                f"{prefix}fp8_recipe=current (megatron-core keeps layers in bf16 only with current "
                "scaling)")
    if params_dtype != "bfloat16":
        return (f"{prefix}fp8={fp8} trains bf16 parameters with fp32 main weights: set "
                f"{prefix}params_dtype=bfloat16 (got {params_dtype})")
    if layer_spec != "te":
        return (f"{prefix}fp8={fp8} needs the Transformer Engine layers: set "
                f"{prefix}layer_spec=te (got {layer_spec!r})")
    return None


def gpu_only_problem(settings: dict[str, bool], cuda: bool | None = None,
                     te: bool | None = None) -> str | None:
    """``settings``: {config key: on?} of GPU-only options (:data:`GPU_ONLY`); the first one
    that is on where it cannot run."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    te = transformer_engine_available() if te is None else te
    for key, on in settings.items():
        if not on:
            continue
        if not cuda:
            return f"{key}=true needs a GPU (none is visible); set it to false"
        if not te:
            return (f"{key}=true needs Transformer Engine's fused kernels (not installed: bash "
                    "scripts/install.sh --gpu); set it to false")
    return None


def recompute_problem(granularity: str | None, method: str | None, num_layers: int | None,
                      prefix: str = "model.") -> str | None:
    if granularity is None:
        if method is not None or num_layers is not None:
            return (f"{prefix}recompute_method / recompute_num_layers need "
                    f"{prefix}recompute_granularity=full")
        return None
    if granularity not in RECOMPUTE_GRANULARITIES:
        return (f"{prefix}recompute_granularity={granularity!r}: choose one of "
                f"{list(RECOMPUTE_GRANULARITIES)} or null")
    if granularity == "full":
        if method not in RECOMPUTE_METHODS:
            return (f"{prefix}recompute_granularity=full needs {prefix}recompute_method: one of "
                    f"{list(RECOMPUTE_METHODS)} (got {method!r})")
        if num_layers is None or num_layers < 1:
            return (f"{prefix}recompute_granularity=full needs {prefix}recompute_num_layers >= 1 "
                    f"(got {num_layers})")
    elif method is not None or num_layers is not None:
        return (f"{prefix}recompute_method / recompute_num_layers apply to "
                f"{prefix}recompute_granularity=full only (got {granularity})")
    return None


def recompute_fields(granularity: str | None, method: str | None = None,
                     num_layers: int | None = None) -> dict:
    if granularity is None:
        return {}
    fields = dict(recompute_granularity=granularity)
    if granularity == "full":
        fields.update(recompute_method=method, recompute_num_layers=num_layers)
    return fields

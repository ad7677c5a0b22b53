"""Qwen2.5-VL on megatron-core: config translation, model, layer specs, HF name mapping."""

from .bridge import mapping_table, tensor_dims
from .config import (
    ModelConfigError,
    Qwen25VLTextSpec,
    check_parallel_layout,
    load_hf_config,
    preset_hf_config,
    text_spec_from_hf,
)
from .model import Qwen25VLModel, build_qwen25vl, language_transformer_config

__all__ = [
    "ModelConfigError", "Qwen25VLModel", "Qwen25VLTextSpec", "build_qwen25vl",
    "check_parallel_layout", "language_transformer_config", "load_hf_config", "mapping_table",
    "preset_hf_config", "tensor_dims", "text_spec_from_hf",
]

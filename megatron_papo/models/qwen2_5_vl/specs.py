"""Layer specs: ``local`` (megatron-core's own modules; runs anywhere, CI uses it) and
``te`` (Transformer Engine modules; GPU, the base for FP8). Selected by name from config."""

from __future__ import annotations

from megatron.core.transformer.spec_utils import ModuleSpec

LAYER_SPECS = ("local", "te")


def language_layer_spec(name: str) -> ModuleSpec:
    if name == "local":
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

        return get_gpt_layer_local_spec(normalization="RMSNorm")
    if name == "te":
        try:
            from megatron.core.models.gpt.gpt_layer_specs import (
                get_gpt_layer_with_transformer_engine_spec,
            )

            return get_gpt_layer_with_transformer_engine_spec()
        except ImportError as err:  # TE absent (CPU machines)
            raise ValueError("model.layer_spec=te needs Transformer Engine (GPU install path: "
                             "bash scripts/install.sh --gpu); use model.layer_spec=local") from err
    raise ValueError(f"model.layer_spec={name!r} is not one of {LAYER_SPECS}")

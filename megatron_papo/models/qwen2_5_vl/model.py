"""Qwen2.5-VL from megatron-core layers.

``Qwen25VLModel`` = the language model (megatron-core ``GPTModel`` with MRoPE, SwiGLU, RMSNorm,
QKV bias) + (first pipeline stage only) the vision tower, whose features replace the embeddings of
image-pad tokens. The model knows megatron layer specs and nothing about HF names (bridge.py) or
checkpoint layouts.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import MegatronModule

from .config import Qwen25VLTextSpec, check_parallel_layout
from .specs import language_block_spec
from .vision import Qwen25VisionModel, vision_transformer_config


def language_transformer_config(spec: Qwen25VLTextSpec, tp: int = 1, pp: int = 1,
                                vpp: int | None = None, sequence_parallel: bool = False,
                                params_dtype: torch.dtype = torch.float32,
                                first_stage_layers: int | None = None,
                                last_stage_layers: int | None = None,
                                **overrides) -> TransformerConfig:
    check_parallel_layout(spec, tp, pp, vpp, first_stage_layers=first_stage_layers,
                          last_stage_layers=last_stage_layers)
    fields = dict(spec.transformer)
    fields.update(
        num_layers_in_first_pipeline_stage=first_stage_layers,
        num_layers_in_last_pipeline_stage=last_stage_layers,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp, sequence_parallel=sequence_parallel and tp > 1,
        mrope_section=spec.mrope_section, params_dtype=params_dtype, pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16, fp16=params_dtype == torch.float16,
        use_cpu_initialization=not torch.cuda.is_available(),
    )
    fields.update(overrides)
    return TransformerConfig(**fields)


def causal_padding_mask(padding_mask: torch.Tensor) -> torch.Tensor:
    """HF-style [b, s] (1 = token) -> megatron boolean [b, 1, s, s], True where attention is NOT
    allowed: future positions and padding keys."""
    s = padding_mask.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool, device=padding_mask.device).tril()
    allowed = causal[None] & padding_mask.bool()[:, None, :]
    return ~allowed[:, None]


class Qwen25VLModel(MegatronModule):
    """One pipeline stage (or virtual stage) of Qwen2.5-VL.

    forward(input_ids [b, s], position_ids [3, b, s], attention_mask, pixel_values, image_grid_thw,
    labels) -> logits [b, s, vocab/TP] (vocab-parallel) or, with labels, per-token loss [b, s].
    """

    def __init__(self, spec: Qwen25VLTextSpec, config: TransformerConfig, layer_spec: str = "local",
                 pre_process: bool = True, post_process: bool = True, vp_stage: int | None = None,
                 vision_model: torch.nn.Module | None = None):
        super().__init__(config=config)
        self.spec = spec
        self.pre_process = pre_process
        self.post_process = post_process
        self.language_model = GPTModel(
            config, language_block_spec(layer_spec, config, vp_stage), vocab_size=spec.vocab_size,
            max_sequence_length=spec.max_position_embeddings, pre_process=pre_process,
            post_process=post_process, share_embeddings_and_output_weights=spec.tie_word_embeddings,
            position_embedding_type="mrope", rotary_base=spec.rotary_base, parallel_output=True,
            scatter_embedding_sequence_parallel=False, vp_stage=vp_stage)
        self.vision_model = vision_model if pre_process else None
        self.share_embeddings_and_output_weights = spec.tie_word_embeddings
        self.model_type = self.language_model.model_type  # read by megatron-core's schedules

    def set_input_tensor(self, input_tensor) -> None:
        self.language_model.set_input_tensor(input_tensor)

    def shared_embedding_or_output_weight(self):
        return self.language_model.shared_embedding_or_output_weight()

    def embed(self, input_ids: torch.Tensor, pixel_values=None, image_grid_thw=None,
              image_keys=None) -> torch.Tensor:
        """Token embeddings [s, b, h] with image features in place of image-pad tokens, scattered
        to the sequence-parallel ranks only after the merge. ``image_keys``: see
        :meth:`Qwen25VisionModel.forward`."""
        embeddings = self.language_model.embedding(input_ids=input_ids, position_ids=None)
        if pixel_values is not None:
            if self.vision_model is None:
                raise ValueError("pixel_values were given but the model has no vision tower")
            features = self.vision_model(pixel_values, image_grid_thw, image_keys)  # [tokens, h]
            n_tokens = int((input_ids == self.spec.image_token_id).sum())
            if n_tokens != features.shape[0]:
                raise ValueError(
                    f"{n_tokens} image-pad tokens (id {self.spec.image_token_id}) in "
                    f"input_ids but the vision tower produced {features.shape[0]} features: "
                    "input_ids and pixel_values/image_grid_thw do not belong together")
            # features are in image order = row-major over (batch, sequence), as in the reference
            batch_major = embeddings.transpose(0, 1).clone()
            batch_major[input_ids == self.spec.image_token_id] = features.to(embeddings.dtype)
            embeddings = batch_major.transpose(0, 1).contiguous()
        if self.config.sequence_parallel:
            tp = self.config.tensor_model_parallel_size
            if embeddings.shape[0] % tp:
                raise ValueError(
                    f"sequence parallelism needs the sequence length ({embeddings.shape[0]}) to be "
                    f"a multiple of tensor_model_parallel_size ({tp}): pad the batch to a multiple "
                    f"of {tp} or turn sequence_parallel off")
            embeddings = tensor_parallel.scatter_to_sequence_parallel_region(embeddings)
        return embeddings

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None, pixel_values=None, image_grid_thw=None,
                labels: torch.Tensor | None = None, packed_seq_params=None,
                image_keys: torch.Tensor | None = None) -> torch.Tensor:
        """``attention_mask``: None (causal, no padding), HF-style [b, s] (1 = token, 0 = padding)
        or megatron's boolean [b, 1, s, s] (True = masked).

        ``packed_seq_params`` (megatron-core ``PackedSeqParams``, qkv_format "thd"): the samples
        are concatenated into ONE row (input_ids [1, t], position_ids [3, 1, t] = each sample's
        own MRoPE positions, concatenated) and ``cu_seqlens_q`` bounds them (its last entry = t:
        trailing padding is a segment of its own); attention stays within each segment and the
        rotary embedding is applied per token (megatron-core's THD RoPE takes the frequencies at
        each token's offset when they cover all t tokens); ``attention_mask`` must be None."""
        if packed_seq_params is not None and attention_mask is not None:
            raise ValueError("a packed micro-batch takes no attention_mask (cu_seqlens bound the "
                             "samples)")
        if attention_mask is not None and attention_mask.dim() == 2:
            attention_mask = causal_padding_mask(attention_mask)
        decoder_input = None
        if self.pre_process:
            decoder_input = self.embed(input_ids, pixel_values, image_grid_thw, image_keys)
        return self.language_model(input_ids=None, position_ids=position_ids,
                                   attention_mask=attention_mask, decoder_input=decoder_input,
                                   labels=labels, packed_seq_params=packed_seq_params)


def build_qwen25vl(spec: Qwen25VLTextSpec, config: TransformerConfig, layer_spec: str = "local",
                   vp_stage: int | None = None, with_vision: bool = True,
                   vision_overrides: dict | None = None) -> Qwen25VLModel:
    """The model chunk for this rank's (virtual) pipeline stage; the vision tower is built on the
    first stage when the HF config has a ``vision_config`` (``vision_overrides``: fields of its
    TransformerConfig, e.g. FP8)."""
    virtual = config.virtual_pipeline_model_parallel_size is not None
    pre = parallel_state.is_pipeline_first_stage(ignore_virtual=not virtual, vp_stage=vp_stage)
    post = parallel_state.is_pipeline_last_stage(ignore_virtual=not virtual, vp_stage=vp_stage)
    vision = None
    if pre and with_vision and spec.vision:
        vision_config = vision_transformer_config(
            spec.vision, tp=config.tensor_model_parallel_size, params_dtype=config.params_dtype,
            **(vision_overrides or {}))
        vision = Qwen25VisionModel(vision_config, spec.vision, layer_spec)
    return Qwen25VLModel(spec, config, layer_spec, pre_process=pre, post_process=post,
                         vp_stage=vp_stage, vision_model=vision)

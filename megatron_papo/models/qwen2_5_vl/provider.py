"""Config -> model chunks for this rank: the one place that builds Qwen2.5-VL for training,
conversion and tests (DDP wrapping optional), and loads HF tensors into it through the table."""

from __future__ import annotations

from typing import Callable

import torch
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region
from megatron.core.utils import unwrap_model

from megatron_papo.models.mapping.engine import export_megatron_to_hf, load_hf_into_megatron
from megatron_papo.parallel import check_pipeline_communication, default_batch_p2p_comm

from .bridge import mapping_table, tensor_dims
from .config import Qwen25VLTextSpec
from .model import build_qwen25vl, language_transformer_config


def build_model_chunks(spec: Qwen25VLTextSpec, tp: int = 1, pp: int = 1, vpp: int | None = None,
                       sequence_parallel: bool = False, layer_spec: str = "local",
                       params_dtype: torch.dtype = torch.float32, ddp: bool = True,
                       use_distributed_optimizer: bool = False,
                       first_stage_layers: int | None = None, last_stage_layers: int | None = None,
                       vision_overrides: dict | None = None, overlap_grad_reduce: bool = False,
                       overlap_param_gather: bool = False, **config_overrides) -> list:
    """The model chunks of this rank (one per virtual stage), optionally wrapped in megatron-core
    DDP (grads reduced in fp32; ``finalize_model_grads`` installed in the config).
    ``first_stage_layers`` / ``last_stage_layers``: a lighter first / last pipeline stage;
    ``config_overrides``: TransformerConfig fields of the language model (FP8, recompute, fused
    kernels: precision.py), ``vision_overrides`` those of the vision tower;
    ``overlap_grad_reduce`` / ``overlap_param_gather``: DDP's communication overlap (pays off on
    GPUs; after an optimizer step call :func:`sync_params` before reading the weights)."""
    config = language_transformer_config(spec, tp, pp, vpp, sequence_parallel, params_dtype,
                                         first_stage_layers, last_stage_layers,
                                         **config_overrides)
    if "batch_p2p_comm" not in config_overrides:
        config.batch_p2p_comm = default_batch_p2p_comm(config)
    check_pipeline_communication(config)
    chunks = [build_qwen25vl(spec, config, layer_spec, vp_stage=v if vpp else None,
                             vision_overrides=vision_overrides)
              for v in range(vpp or 1)]
    if not ddp:
        return chunks
    if overlap_param_gather and not (use_distributed_optimizer and overlap_grad_reduce):
        raise ValueError("overlap_param_gather needs overlap_grad_reduce and the distributed "
                         "optimizer")
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=overlap_grad_reduce,
        overlap_param_gather=overlap_param_gather,
        use_distributed_optimizer=use_distributed_optimizer)
    wrapped = [DistributedDataParallel(config, ddp_config, chunk) for chunk in chunks]
    config.finalize_model_grads_func = finalize_model_grads
    if overlap_grad_reduce:
        # the schedules reduce only after the last micro-batch (each chunk's buckets launch as
        # their gradients are ready); as megatron-core's own training loop wires it
        no_sync = [chunk.no_sync for chunk in wrapped]
        config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
        if len(wrapped) > 1:
            config.grad_sync_func = [chunk.start_grad_sync for chunk in wrapped]
    # overlap_param_gather: DDP's forward pre-hooks wait for (and dispatch) each bucket's gather
    return wrapped


def sync_params(chunks: list) -> None:
    """Finish the parameter all-gather that ``overlap_param_gather`` defers to the next forward,
    so that the weights read now (export, weight push, checkpoint) are those after the last
    optimizer step. A no-op without that overlap."""
    for chunk in chunks:
        ddp_config = getattr(chunk, "ddp_config", None)
        if ddp_config is not None and ddp_config.overlap_param_gather:
            chunk.start_param_sync(force_sync=True)


def load_hf_weights(chunks: list, spec: Qwen25VLTextSpec, get_hf: Callable[[str], torch.Tensor]
                    ) -> list[str]:
    """Load canonical-named HF tensors into every chunk of this rank; returns the names used."""
    table, dims = mapping_table(spec.tie_word_embeddings), tensor_dims(spec)
    group = parallel_state.get_tensor_model_parallel_group()
    used = []
    for chunk in chunks:
        used += load_hf_into_megatron(unwrap_model(chunk), table, get_hf, dims, group)
    return used


def export_hf_weights(chunks: list, spec: Qwen25VLTextSpec, convention: str = "hf",
                      skip: Callable[[str], bool] | None = None, **gather):
    """Yield (HF name, full tensor) for this rank's pipeline stage (TP shards gathered).
    ``skip(canonical HF name)`` leaves tensors out before they are gathered; ``gather``:
    ``gather_chunk_bytes`` of the TP gathers."""
    table, dims = mapping_table(spec.tie_word_embeddings), tensor_dims(spec)
    group = parallel_state.get_tensor_model_parallel_group()
    for chunk in chunks:
        yield from export_megatron_to_hf(unwrap_model(chunk), table, dims, table.convention(convention),
                                         group, skip=skip, **gather)


@torch.no_grad()
def forward_logits(chunks: list, input_ids: torch.Tensor, position_ids: torch.Tensor,
                   attention_mask: torch.Tensor | None = None, pixel_values=None,
                   image_grid_thw=None, gather_vocab: bool = True) -> torch.Tensor | None:
    """Logits [b, s, vocab] of one batch through megatron-core's forward-only schedule (any PP).
    Returned on the last pipeline stage (the full vocabulary gathered across TP unless
    ``gather_vocab=False``); None on other stages."""
    stored = []
    batch = dict(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                 pixel_values=pixel_values, image_grid_thw=image_grid_thw)

    def forward_step(data_iterator, model):
        b = next(data_iterator)
        out = model(b["input_ids"], b["position_ids"], b["attention_mask"], b["pixel_values"],
                    b["image_grid_thw"])

        def keep(logits):
            stored.append(logits.detach())
            return logits.sum() * 0.0, {}
        return out, keep

    for chunk in chunks:
        chunk.eval()
    get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter([batch]), model=chunks,
        num_microbatches=1, seq_length=input_ids.shape[1], micro_batch_size=input_ids.shape[0],
        forward_only=True)
    if not stored:
        return None
    logits = stored[0]
    if gather_vocab and parallel_state.get_tensor_model_parallel_world_size() > 1:
        logits = gather_from_tensor_model_parallel_region(logits)
    return logits

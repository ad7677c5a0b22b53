"""Weight sync: Megatron shards -> full HF-named tensors, streamed in buckets to every rollout
engine of the world.

Per pipeline stage in turn, the stage's ranks export their chunks through THE name table
(``provider.export_hf_weights``: TP shards all-gathered, fused rows split, names made global) and
pack the tensors, cast to the engine dtype, into flat byte buckets of ``bucket_bytes``; with PP > 1
each bucket is broadcast over the pipeline group so that every rank's engine receives every
stage's tensors. Consumers get views into the current bucket.

Memory: a bucket is closed only between "units" (the HF tensors that vLLM fuses into one module:
q/k/v, gate/up, a weight and its bias), so vLLM's layer-wise reload never holds a view into an
older bucket; peak extra memory is one bucket plus the largest unit being gathered (in practice
the largest tensor), not the model size.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist

from megatron_papo.models.qwen2_5_vl.provider import export_hf_weights

DEFAULT_BUCKET_BYTES = 512 * 2**20
_ALIGN = 64
_FUSED = re.compile(r"\.(q_proj|k_proj|v_proj|gate_proj|up_proj)$")


@dataclass
class PushStats:
    tensors: int = 0
    bytes: int = 0
    buckets: int = 0
    largest_bucket_bytes: int = 0     # the largest buffer this rank held
    largest_tensor_bytes: int = 0


def unit_key(hf_name: str) -> str:
    """Tensors with the same key land in one vLLM module (fused q/k/v and gate/up included)."""
    module = hf_name.rsplit(".", 1)[0]
    m = _FUSED.search(module)
    if m:
        module = module[:m.start()] + (".qkv" if m.group(1)[0] in "qkv" else ".gate_up")
    return module


def _units(tensors: Iterator[tuple[str, torch.Tensor]]) -> Iterator[list[tuple[str, torch.Tensor]]]:
    unit, key = [], None
    for name, tensor in tensors:
        k = unit_key(name)
        if unit and k != key:
            yield unit
            unit = []
        unit.append((name, tensor))
        key = k
    if unit:
        yield unit


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def _pack(units, dtype, bucket_bytes: int, stats: PushStats):
    """Yield (header, buffer): header [(name, shape, dtype, offset, nbytes)], buffer uint8."""
    pending, size = [], 0
    for unit in units:
        need = sum(_aligned(t.numel() * (dtype or t.dtype).itemsize) for _, t in unit)
        if pending and size + need > bucket_bytes:
            yield _fill(pending, size, dtype, stats)
            pending, size = [], 0
        pending.append(unit)
        size += need
        if size >= bucket_bytes:
            yield _fill(pending, size, dtype, stats)
            pending, size = [], 0
    if pending:
        yield _fill(pending, size, dtype, stats)


def _fill(units, size: int, dtype, stats: PushStats):
    buffer = torch.empty(size, dtype=torch.uint8)
    header, offset = [], 0
    for unit in units:
        for name, tensor in unit:
            t_dtype = dtype or tensor.dtype
            nbytes = tensor.numel() * t_dtype.itemsize
            buffer[offset:offset + nbytes].view(t_dtype).view(tensor.shape).copy_(tensor)
            header.append((name, tuple(tensor.shape), t_dtype, offset, nbytes))
            stats.largest_tensor_bytes = max(stats.largest_tensor_bytes,
                                             tensor.numel() * tensor.element_size())
            offset += _aligned(nbytes)
    units.clear()  # drop the gathered tensors before the bucket goes out
    stats.largest_bucket_bytes = max(stats.largest_bucket_bytes, size)
    return header, buffer


def _views(header, buffer) -> Iterator[tuple[str, torch.Tensor]]:
    for name, shape, t_dtype, offset, nbytes in header:
        yield name, buffer[offset:offset + nbytes].view(t_dtype).view(shape)


def iter_hf_weights(chunks: list, spec, dtype: torch.dtype | None = None,
                    bucket_bytes: int = DEFAULT_BUCKET_BYTES, include_vision: bool = True,
                    stats: PushStats | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Every HF-named tensor of the model (all pipeline stages), on every rank, in buckets.

    A collective over the TP and PP groups: every rank of the world must consume the generator
    to the end (e.g. ``engine.load_weights(iter_hf_weights(...))`` on every rank).
    ``include_vision=False`` pushes the language model only (frozen vision tower)."""
    from megatron.core import parallel_state

    if bucket_bytes < 1:
        raise ValueError(f"rollout.weight_bucket_bytes={bucket_bytes} must be >= 1")
    stats = stats if stats is not None else PushStats()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    stage = parallel_state.get_pipeline_model_parallel_rank()
    group = parallel_state.get_pipeline_model_parallel_group() if pp > 1 else None
    ranks = dist.get_process_group_ranks(group) if pp > 1 else None
    skip = None if include_vision else (lambda name: name.startswith("visual."))

    for source in range(pp):
        if source == stage:
            tensors = export_hf_weights(chunks, spec, skip=skip)
            buckets = _pack(_units(tensors), dtype, bucket_bytes, stats)
        else:
            buckets = None
        while True:
            if source == stage:
                item = next(buckets, None)
                if pp > 1:
                    dist.broadcast_object_list([None if item is None else item[0]],
                                               src=ranks[source], group=group)
                    if item is not None:
                        dist.broadcast(item[1], src=ranks[source], group=group)
            else:
                box = [None]
                dist.broadcast_object_list(box, src=ranks[source], group=group)
                item = None
                if box[0] is not None:
                    header = box[0]
                    size = max(off + _aligned(n) for *_, off, n in header)
                    buffer = torch.empty(size, dtype=torch.uint8)
                    dist.broadcast(buffer, src=ranks[source], group=group)
                    stats.largest_bucket_bytes = max(stats.largest_bucket_bytes, size)
                    item = (header, buffer)
            if item is None:
                break
            header, buffer = item
            item = None
            stats.buckets += 1
            for name, view in _views(header, buffer):
                stats.tensors += 1
                stats.bytes += view.numel() * view.element_size()
                yield name, view
            header = buffer = view = None  # the bucket is freed before the next one

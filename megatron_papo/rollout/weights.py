"""Weight sync: Megatron shards -> full HF-named tensors, streamed in buckets to every rollout
engine of the world.

Per pipeline stage in turn, the stage's ranks export their chunks through THE name table
(``provider.export_hf_weights``: TP shards all-gathered, fused rows split, names made global) and
copy the tensors, cast to the engine dtype, into flat byte buckets of ``bucket_bytes``; with PP > 1
each bucket is broadcast over the pipeline group so that every rank's engine receives every
stage's tensors. Consumers get views into the current bucket.

Memory: a bucket is closed only between "units" (the HF tensors that vLLM fuses into one module:
q/k/v, gate/up, a weight and its bias), so vLLM's layer-wise reload never holds a view into an
older bucket. Live at any time: one bucket plus the unit being gathered (in practice the largest
tensor) plus the TP-gather pieces (a quarter of a bucket), not the model. A unit larger than a
bucket travels alone, as it is; if the training and engine dtypes differ its cast copy adds its
size once more. The bucket buffer is reused from bucket to bucket when no view of it survives.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_papo.models.qwen2_5_vl.bridge import HF_VIS
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


def _nbytes(tensor: torch.Tensor, dtype) -> int:
    return tensor.numel() * (dtype or tensor.dtype).itemsize


def _storage_refs(tensor: torch.Tensor) -> int:
    """How many tensors share ``tensor``'s storage (views included); -1 if torch cannot say."""
    try:
        return torch._C._storage_Use_Count(tensor.untyped_storage()._cdata)
    except (AttributeError, RuntimeError):
        return -1


class _Reusable:
    """One bucket-sized buffer reused from bucket to bucket: fresh pages are slow to fault in
    (and slower still under the NUMA binding a CPU vLLM engine installs). It is handed out again
    only when no view of it survives elsewhere; otherwise a new one is made (never overwrite
    memory a consumer still reads)."""

    def __init__(self, size: int):
        self.size, self.buffer, self.refs = size, None, 0

    def get(self, need: int) -> torch.Tensor:
        if need > self.size:
            return torch.empty(need, dtype=torch.uint8)
        if self.buffer is None or _storage_refs(self.buffer) != self.refs or self.refs < 0:
            self.buffer = torch.empty(self.size, dtype=torch.uint8)
            self.refs = _storage_refs(self.buffer)
        return self.buffer


def _buckets(units, dtype, bucket_bytes: int, stats: PushStats):
    """Yield (header, buffer): header [(name, shape, dtype, offset, nbytes)], buffer a flat uint8
    tensor (a view of the used part of the bucket) or, for a unit larger than a bucket, None with
    the unit's tensors themselves in the header (no copy when the dtypes match).

    Each unit is copied into the open bucket as soon as it arrives (its gathered tensors are then
    dropped); a unit that does not fit closes the bucket first. Live at any time: one bucket plus
    the unit being gathered."""
    pool = _Reusable(bucket_bytes)
    buffer, header, used = None, [], 0
    for unit in units:
        need = sum(_aligned(_nbytes(t, dtype)) for _, t in unit)
        if header and used + need > bucket_bytes:
            stats.largest_bucket_bytes = max(stats.largest_bucket_bytes, used)
            yield header, buffer[:used]
            buffer, header, used = None, [], 0
        for _, tensor in unit:
            stats.largest_tensor_bytes = max(stats.largest_tensor_bytes,
                                             tensor.numel() * tensor.element_size())
        if need > bucket_bytes:  # alone, sent as it is (converted: the original let go first)
            lone = [(name, tensor.to(dtype) if dtype else tensor) for name, tensor in unit]
            unit.clear()
            yield lone, None
            lone = None
            continue
        if buffer is None:
            buffer = pool.get(bucket_bytes)
        for name, tensor in unit:
            t_dtype = dtype or tensor.dtype
            nbytes = _nbytes(tensor, dtype)
            buffer[used:used + nbytes].view(t_dtype).view(tensor.shape).copy_(tensor)
            header.append((name, tuple(tensor.shape), t_dtype, used, nbytes))
            used += _aligned(nbytes)
        unit.clear()
    if header:
        stats.largest_bucket_bytes = max(stats.largest_bucket_bytes, used)
        yield header, buffer[:used]


def _views(header, buffer) -> Iterator[tuple[str, torch.Tensor]]:
    if buffer is None:
        yield from header
        return
    for name, shape, t_dtype, offset, nbytes in header:
        yield name, buffer[offset:offset + nbytes].view(t_dtype).view(shape)


def _broadcast_item(item, source: int, group, pool: _Reusable):
    """Send (source) or receive one bucket over the pipeline group; None ends the stage."""
    if item is None:
        meta = None
    elif item[1] is None:  # a lone unit: its tensors one by one
        meta = ("tensors", [(name, tuple(t.shape), t.dtype) for name, t in item[0]])
    else:
        meta = ("bucket", item[0], item[1].numel())
    box = [meta]
    dist.broadcast_object_list(box, src=source, group=group)
    meta = box[0]
    if meta is None:
        return None
    if meta[0] == "tensors":
        tensors = item[0] if item is not None else [
            (name, torch.empty(shape, dtype=t_dtype)) for name, shape, t_dtype in meta[1]]
        for _, tensor in tensors:
            dist.broadcast(tensor.contiguous(), src=source, group=group)
        return tensors, None
    buffer = item[1] if item is not None else pool.get(meta[2])[:meta[2]]
    dist.broadcast(buffer, src=source, group=group)
    return meta[1], buffer


def iter_hf_weights(chunks: list, spec, dtype: torch.dtype | None = None,
                    bucket_bytes: int = DEFAULT_BUCKET_BYTES, include_vision: bool = True,
                    stats: PushStats | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Every HF-named tensor of the model (all pipeline stages), on every rank, in buckets.

    A collective over the TP and PP groups: every rank of the world must consume the generator
    to the end (e.g. ``engine.load_weights(iter_hf_weights(...))`` on every rank).
    ``include_vision=False`` pushes the language model only (frozen vision tower)."""
    if bucket_bytes < 1:
        raise ValueError(f"rollout.weight_bucket_bytes={bucket_bytes} must be >= 1")
    stats = stats if stats is not None else PushStats()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    stage = parallel_state.get_pipeline_model_parallel_rank()
    group = parallel_state.get_pipeline_model_parallel_group() if pp > 1 else None
    ranks = dist.get_process_group_ranks(group) if pp > 1 else None
    skip = None if include_vision else (lambda name: name.startswith(HF_VIS + "."))

    receive = _Reusable(bucket_bytes)
    for source in range(pp):
        local = None
        if source == stage:
            # TP-gather pieces: all ranks' pieces together a quarter of a bucket
            tensors = export_hf_weights(chunks, spec, skip=skip,
                                        gather_chunk_bytes=max(4096, bucket_bytes // (4 * tp)),
                                        dtype=dtype)
            local = _buckets(_units(tensors), dtype, bucket_bytes, stats)
        while True:
            item = next(local, None) if local is not None else None
            if pp > 1:
                received = _broadcast_item(item, ranks[source], group, receive)
                if source != stage:
                    item = received
                    if item is not None and item[1] is not None:
                        stats.largest_bucket_bytes = max(stats.largest_bucket_bytes,
                                                         item[1].numel())
            if item is None:
                break
            header, buffer = item
            item = received = None
            stats.buckets += 1
            for name, view in _views(header, buffer):
                stats.tensors += 1
                stats.bytes += view.numel() * view.element_size()
                yield name, view
            header = buffer = view = None  # the bucket is freed before the next one is filled

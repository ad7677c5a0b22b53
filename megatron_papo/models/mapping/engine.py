"""Apply a mapping table to one rank's shard: load HF tensors into it, or export it as HF tensors.

Both directions work on whatever TP/PP shard the rank holds: parameter names are made global
(layer numbers across pipeline stages) and TP slices are cut from / gathered into full tensors by
the row's own ``shard``/``unshard``. HF tensors are fetched one row at a time through a callback,
so a caller can stream them from safetensors files.
"""

from __future__ import annotations

import re
from typing import Callable, Iterator

import torch
import torch.distributed as dist

from .table import HFConvention, MappingError, MappingTable, Row

_LAYER = re.compile(r"^(.*?\.layers)\.(\d+)\.(.*)$")
DEFAULT_GATHER_CHUNK_BYTES = 64 * 2**20  # per rank and TP-gather piece


def global_megatron_name(model: torch.nn.Module, local_name: str) -> str:
    """``...layers.<local i>...`` -> ``...layers.<global i>...`` using each megatron-core layer's
    ``layer_number`` (1-based, global across pipeline and virtual stages)."""
    m = _LAYER.match(local_name)
    if not m:
        return local_name
    layer = model.get_submodule(f"{m.group(1)}.{m.group(2)}")
    number = getattr(layer, "layer_number", None)
    index = int(m.group(2)) if number is None else number - 1
    return f"{m.group(1)}.{index}.{global_megatron_name(layer, m.group(3))}"


def _tp_info(tp_group) -> tuple[int, int]:
    if tp_group is None or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(tp_group), dist.get_world_size(tp_group)


@torch.no_grad()
def load_hf_into_megatron(model: torch.nn.Module, table: MappingTable,
                          get_hf: Callable[[str], torch.Tensor], dims: dict, tp_group=None,
                          ) -> list[str]:
    """Copy HF tensors (canonical names, fetched with ``get_hf``) into this rank's parameters.

    Returns the canonical HF names that were used. Raises :class:`MappingError` naming the tensor
    on a missing row, a missing HF tensor or a shape mismatch; nothing is half-explained.
    """
    rank, size = _tp_info(tp_group)
    used = []
    for local_name, param in model.named_parameters():
        gname = global_megatron_name(model, local_name)
        row, idx = table.find(gname)
        names = row.hf_names(idx)
        try:
            tensors = [get_hf(n) for n in names]
        except KeyError as err:
            raise MappingError(f"the HF checkpoint has no tensor {err} (needed for megatron "
                               f"'{gname}'); is it a Qwen2.5-VL checkpoint of this config?"
                               ) from None
        full = row.merge(tensors, dims)
        local = row.shard(full, rank, size)
        if tuple(local.shape) != tuple(param.shape):
            raise MappingError(
                f"shape mismatch for megatron '{gname}' <- HF {names} "
                f"{[tuple(t.shape) for t in tensors]}: the rank's shard should be "
                f"{tuple(param.shape)} but the HF tensors give {tuple(local.shape)} "
                f"(tensor_model_parallel_size={size}); does config.json match the weights?")
        param.copy_(local.to(param.dtype))
        used.extend(names)
    return used


@torch.no_grad()
def export_megatron_to_hf(model: torch.nn.Module, table: MappingTable, dims: dict,
                          convention: HFConvention | None = None, tp_group=None,
                          value: Callable[[torch.nn.Parameter], torch.Tensor] | None = None,
                          skip: Callable[[str], bool] | None = None,
                          gather_chunk_bytes: int = DEFAULT_GATHER_CHUNK_BYTES,
                          dtype: torch.dtype | None = None,
                          ) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(hf_name, full tensor)`` for every parameter of this rank's pipeline stage.

    TP shards are all-gathered within ``tp_group`` (every TP rank then yields the same tensors;
    the caller picks who writes). Rows marked ``export=False`` (the last stage's copy of a tied
    embedding) are skipped. ``value`` picks what is exported per parameter (default: the weight;
    ``lambda p: p.grad`` exports gradients under HF names). ``skip(canonical HF name)`` leaves a
    parameter out (before its TP gather) when it is true for all the row's HF names. TP gathers run
    in pieces of ``gather_chunk_bytes`` per rank; ``dtype`` given, a gathered tensor is built in
    that dtype piece by piece (a push to a bf16 engine never holds an fp32 full tensor; tensors
    that need no gather are yielded as they are, the caller converts them).
    """
    rank, size = _tp_info(tp_group)
    for local_name, param in model.named_parameters():
        gname = global_megatron_name(model, local_name)
        row, idx = table.find(gname)
        if not row.export or (skip is not None and all(skip(n) for n in row.hf_names(idx))):
            continue
        tensor = param.detach() if value is None else value(param)
        if row.tp_dim is not None and size > 1:
            full = _gather_tp(row, tensor, size, tp_group, gather_chunk_bytes, dtype)
        else:
            full = tensor
        parts = [part.contiguous() for part in row.split(full, dims)]
        full = tensor = None  # only the exported parts stay alive (a push's memory bound)
        for name, part in zip(row.hf_names(idx), parts):
            yield (convention.from_canonical(name) if convention else name), part
        parts = part = None


def _gather_tp(row, tensor: torch.Tensor, size: int, tp_group,
               chunk_bytes: int = DEFAULT_GATHER_CHUNK_BYTES,
               dtype: torch.dtype | None = None) -> torch.Tensor:
    """The full tensor of a TP-sharded row, gathered in pieces of at most ``chunk_bytes`` per rank
    (the collective's own buffers stay small). One full-size allocation where the row is a plain
    concatenation along dim 0 (embeddings, output layer, QKV: the largest tensors), two otherwise
    (the row's own ``unshard`` reorders the gathered shards). ``dtype``: the result's dtype (each
    piece converted as it is copied in)."""
    tensor = tensor.contiguous()
    local = tensor.shape[0]
    plain = row.tp_dim == 0 and type(row).unshard is Row.unshard
    out = torch.empty((size * local, *tensor.shape[1:]) if plain else (size, *tensor.shape),
                      dtype=dtype or tensor.dtype, device=tensor.device)
    stacked = out.view(size, local, *tensor.shape[1:])
    row_bytes = max(1, tensor[:1].numel() * tensor.element_size())
    step = max(1, chunk_bytes // row_bytes)
    for a in range(0, local, step):
        b = min(local, a + step)
        piece = torch.empty((size * (b - a), *tensor.shape[1:]), dtype=tensor.dtype,
                            device=tensor.device)
        dist.all_gather_into_tensor(piece, tensor[a:b], group=tp_group)
        stacked[:, a:b].copy_(piece.view(size, b - a, *tensor.shape[1:]))
        piece = None
    if plain:
        return out
    return row.unshard(list(stacked.unbind(0)))

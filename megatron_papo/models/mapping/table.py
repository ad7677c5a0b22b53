"""Name-mapping rows HF <-> Megatron and the table that holds them.

A row links one Megatron parameter (a name with ``*`` for the layer index) to one or more HF
tensors, and knows four pure tensor operations, all reshapes, concatenations and slices (so every
conversion is bit-exact):

* ``merge(hf_tensors) -> full`` and ``split(full) -> hf_tensors`` between the HF tensors and the
  full (TP=1) Megatron tensor;
* ``shard(full, rank, size) -> local`` and ``unshard(shards) -> full`` between the full Megatron
  tensor and tensor-parallel shards.

Typed rows: :class:`Direct` (one-to-one, optionally TP-split on a dim), :class:`QKVInterleaved`
(q/k/v interleaved per KV group, as megatron-core's ``linear_qkv`` stores them),
:class:`GateUp` (gate and up projections concatenated, split per TP rank) and :class:`VisionQKV`
(a fused HF ``qkv`` reordered from [q; k; v] to per-head [q_h, k_h, v_h]).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch


class MappingError(KeyError):
    """A name or shape that the mapping table cannot place; the message names the tensor."""

    def __str__(self):  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


def _pattern(name: str) -> re.Pattern:
    return re.compile("^" + re.escape(name).replace(r"\*", r"(\d+)") + "$")


@dataclass(frozen=True)
class Row:
    megatron: str
    hf: tuple[str, ...]
    tp_dim: int | None = None
    export: bool = True  # False: a duplicate (a tied weight's second holder), never exported

    # -- names ------------------------------------------------------------------------------
    def match_megatron(self, name: str) -> tuple[str, ...] | None:
        m = _pattern(self.megatron).match(name)
        return m.groups() if m else None

    def hf_names(self, indices: Sequence[str]) -> list[str]:
        return [_fill(h, indices) for h in self.hf]

    # -- tensors ----------------------------------------------------------------------------
    def merge(self, hf_tensors: list[torch.Tensor], dims: dict) -> torch.Tensor:
        (t,) = hf_tensors
        return t

    def split(self, full: torch.Tensor, dims: dict) -> list[torch.Tensor]:
        return [full]

    def shard(self, full: torch.Tensor, rank: int, size: int) -> torch.Tensor:
        if self.tp_dim is None or size == 1:
            return full
        if full.shape[self.tp_dim] % size:
            raise MappingError(f"{self.megatron}: dim {self.tp_dim} of shape {tuple(full.shape)} "
                               f"is not divisible by tensor_model_parallel_size={size}")
        return full.chunk(size, dim=self.tp_dim)[rank]

    def unshard(self, shards: list[torch.Tensor]) -> torch.Tensor:
        if self.tp_dim is None or len(shards) == 1:
            return shards[0]
        return torch.cat(shards, dim=self.tp_dim)


def _fill(pattern: str, indices: Sequence[str]) -> str:
    it = iter(indices)
    return re.sub(r"\*", lambda _: next(it), pattern)


@dataclass(frozen=True)
class Direct(Row):
    def __init__(self, megatron: str, hf: str, tp_dim: int | None = None, export: bool = True):
        object.__setattr__(self, "megatron", megatron)
        object.__setattr__(self, "hf", (hf,))
        object.__setattr__(self, "tp_dim", tp_dim)
        object.__setattr__(self, "export", export)


@dataclass(frozen=True)
class QKVInterleaved(Row):
    """HF q, k, v (weights [out, in] or biases [out]) -> megatron ``linear_qkv``.

    Megatron stores, for each KV group g: the group's query heads, then its key head, then its value
    head. TP splits whole groups, so the TP shard is a contiguous slice of the interleaved tensor.
    ``dims`` keys: ``heads``, ``groups``, ``head_dim`` (from ``dims_key`` of the table's dims).
    """

    dims_key: str = "text"

    def __init__(self, megatron: str, q: str, k: str, v: str, dims_key: str = "text"):
        object.__setattr__(self, "megatron", megatron)
        object.__setattr__(self, "hf", (q, k, v))
        object.__setattr__(self, "tp_dim", 0)
        object.__setattr__(self, "dims_key", dims_key)

    def merge(self, hf_tensors, dims):
        d = dims[self.dims_key]
        q, k, v = hf_tensors
        groups, hd = d["groups"], d["head_dim"]
        per = d["heads"] // groups
        rest = q.shape[1:]
        qkv = torch.cat([q.reshape(groups, per * hd, *rest), k.reshape(groups, hd, *rest),
                         v.reshape(groups, hd, *rest)], dim=1)
        return qkv.reshape(groups * (per + 2) * hd, *rest)

    def split(self, full, dims):
        d = dims[self.dims_key]
        groups, hd = d["groups"], d["head_dim"]
        per = d["heads"] // groups
        rest = full.shape[1:]
        grouped = full.reshape(groups, (per + 2) * hd, *rest)
        q, k, v = torch.split(grouped, [per * hd, hd, hd], dim=1)
        return [q.reshape(groups * per * hd, *rest), k.reshape(groups * hd, *rest),
                v.reshape(groups * hd, *rest)]


@dataclass(frozen=True)
class GateUp(Row):
    """HF gate_proj and up_proj -> megatron ``linear_fc1`` of a gated MLP: [gate; up], where each
    TP rank holds [gate_r; up_r] (its slices of both)."""

    def __init__(self, megatron: str, gate: str, up: str):
        object.__setattr__(self, "megatron", megatron)
        object.__setattr__(self, "hf", (gate, up))
        object.__setattr__(self, "tp_dim", 0)

    def merge(self, hf_tensors, dims):
        return torch.cat(hf_tensors, dim=0)

    def split(self, full, dims):
        return list(full.chunk(2, dim=0))

    def shard(self, full, rank, size):
        if size == 1:
            return full
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(size, 0)[rank], up.chunk(size, 0)[rank]], dim=0)

    def unshard(self, shards):
        if len(shards) == 1:
            return shards[0]
        halves = [s.chunk(2, dim=0) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)


@dataclass(frozen=True)
class Reshaped(Row):
    """One HF tensor stored in another shape (the vision patch embedding: a Conv3d kernel
    [out, C, T, P, P] used as a Linear [out, C*T*P*P]). ``dims[dims_key]`` holds the HF shape."""

    dims_key: str = "patch_embed_shape"

    def __init__(self, megatron: str, hf: str, dims_key: str = "patch_embed_shape"):
        object.__setattr__(self, "megatron", megatron)
        object.__setattr__(self, "hf", (hf,))
        object.__setattr__(self, "tp_dim", None)
        object.__setattr__(self, "dims_key", dims_key)

    def merge(self, hf_tensors, dims):
        (t,) = hf_tensors
        return t.reshape(t.shape[0], -1)

    def split(self, full, dims):
        return [full.reshape(dims[self.dims_key])]


@dataclass(frozen=True)
class VisionQKV(Row):
    """HF vision ``attn.qkv`` ([q; k; v], each heads x head_dim) -> megatron ``linear_qkv`` with
    one KV group per head ([q_h, k_h, v_h] for each head h)."""

    dims_key: str = "vision"

    def __init__(self, megatron: str, hf: str, dims_key: str = "vision"):
        object.__setattr__(self, "megatron", megatron)
        object.__setattr__(self, "hf", (hf,))
        object.__setattr__(self, "tp_dim", 0)
        object.__setattr__(self, "dims_key", dims_key)

    def merge(self, hf_tensors, dims):
        (qkv,) = hf_tensors
        d = dims[self.dims_key]
        rest = qkv.shape[1:]
        return qkv.reshape(3, d["heads"], d["head_dim"], *rest).transpose(0, 1).reshape(qkv.shape)

    def split(self, full, dims):
        d = dims[self.dims_key]
        rest = full.shape[1:]
        return [full.reshape(d["heads"], 3, d["head_dim"], *rest).transpose(0, 1)
                .reshape(full.shape)]


@dataclass(frozen=True)
class HFConvention:
    """One on-disk HF naming convention: (canonical prefix, this convention's prefix) pairs, tried
    in order. The canonical names are the ones the table's rows use."""

    name: str
    prefixes: tuple[tuple[str, str], ...] = ()

    def to_canonical(self, hf_name: str) -> str:
        for canonical, alt in self.prefixes:
            if hf_name.startswith(alt):
                return canonical + hf_name[len(alt):]
        return hf_name

    def from_canonical(self, hf_name: str) -> str:
        for canonical, alt in self.prefixes:
            if hf_name.startswith(canonical):
                return alt + hf_name[len(canonical):]
        return hf_name


class MappingTable:
    """The rows of one model family, its HF naming conventions and megatron name aliases."""

    def __init__(self, rows: Iterable[Row], conventions: Sequence[HFConvention] = (),
                 detect_convention=None, megatron_aliases: dict[str, str] | None = None):
        self.rows = tuple(rows)
        self.conventions = {c.name: c for c in conventions}
        self._detect = detect_convention
        # alternative megatron suffix (e.g. TE's fused norm weight) -> canonical (local spec) suffix
        self.megatron_aliases = megatron_aliases or {}

    def canonical_megatron(self, name: str) -> str:
        for alt, canonical in self.megatron_aliases.items():
            if name.endswith(alt):
                return name[: -len(alt)] + canonical
        return name

    def find(self, megatron_name: str) -> tuple[Row, tuple[str, ...]]:
        name = self.canonical_megatron(megatron_name)
        for row in self.rows:
            idx = row.match_megatron(name)
            if idx is not None:
                return row, idx
        raise MappingError(f"no mapping row for megatron parameter '{megatron_name}'")

    def convention(self, name: str) -> HFConvention:
        if name not in self.conventions:
            raise MappingError(f"unknown HF naming convention '{name}': choose one of "
                               f"{sorted(self.conventions)}")
        return self.conventions[name]

    def detect_convention(self, hf_names: Iterable[str]) -> HFConvention:
        return self.convention(self._detect(list(hf_names)))

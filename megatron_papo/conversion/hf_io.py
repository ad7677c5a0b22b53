"""HF checkpoint folders: lazy safetensors reading, sharded streaming writing, and the small
files (config, generation config, tokenizer, processor) that travel with the weights."""

from __future__ import annotations

import json
import os
import shutil
from typing import Iterable

import torch
from safetensors import safe_open

from megatron_papo.files import read_json

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Files other than weights that belong to a usable HF folder (transformers, vLLM).
SIDECAR_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "vocab.json", "merges.txt", "added_tokens.json",
    "chat_template.json", "chat_template.jinja", "preprocessor_config.json",
    "processor_config.json", "video_preprocessor_config.json",
)


class HFCheckpointError(ValueError):
    """An HF folder that cannot be read; names the file and the fix."""


class HFCheckpointReader:
    """Reads tensors one at a time from an HF folder (``model.safetensors`` or sharded files
    with ``model.safetensors.index.json``), keeping at most the open file handles in memory."""

    def __init__(self, folder: str):
        self.folder = folder
        index = os.path.join(folder, INDEX_FILE)
        single = os.path.join(folder, SINGLE_FILE)
        if os.path.exists(index):
            weight_map = read_json(index, HFCheckpointError).get("weight_map")
            if not weight_map or not isinstance(weight_map, dict):
                raise HFCheckpointError(f"{index} has no 'weight_map' (tensor name -> file): "
                                        "repair or replace the index")
            self.files = {name: os.path.join(folder, file) for name, file in weight_map.items()}
        elif os.path.exists(single):
            self.files = {name: single for name in self._header_names(single)}
        else:
            raise HFCheckpointError(f"no {SINGLE_FILE} or {INDEX_FILE} in {folder}: pass an HF "
                                    "checkpoint folder with safetensors weights")
        missing = sorted({p for p in self.files.values() if not os.path.exists(p)})
        if missing:
            raise HFCheckpointError(f"the index of {folder} names missing files: {missing}")
        # every file's header, up front and on every rank: a truncated or foreign file is one
        # error before any work, not a failure halfway through on the rank that reads it
        by_file: dict[str, set[str]] = {}
        for name, path in self.files.items():
            by_file.setdefault(path, set()).add(name)
        for path, names in by_file.items():
            absent = names - self._header_names(path)
            if absent:
                raise HFCheckpointError(
                    f"{path} lacks {len(absent)} tensors that {INDEX_FILE} places there (e.g. "
                    f"{sorted(absent)[0]}): the index and the weight files do not belong together")

    @staticmethod
    def _header_names(path: str) -> set[str]:
        open(path, "rb").close()  # permission denied, a folder, ...: an OSError naming the file
        try:
            with safe_open(path, framework="pt") as f:
                return set(f.keys())
        except Exception as err:  # noqa: BLE001  (safetensors' own error type)
            raise HFCheckpointError(
                f"{path} is not a readable safetensors file ({err}): it is truncated or "
                "corrupt; download or copy it again") from None

    def names(self) -> list[str]:
        return sorted(self.files)

    def get(self, name: str) -> torch.Tensor:
        """One tensor, copied out of the file. The file is mapped only for this call: pages of
        a kept-open mapping would stay resident and count in the process's RSS."""
        path = self.files[name]  # KeyError for an absent tensor, reported by the caller
        with safe_open(path, framework="pt") as f:
            return f.get_tensor(name)


_SAFETENSORS_DTYPES = {
    torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}
_COPY_CHUNK = 64 * 2**20


class ShardedSafetensorsWriter:
    """Writes (name, tensor) pairs into safetensors files of at most ``max_shard_bytes`` each
    (a tensor larger than that gets a file of its own), holding at most one tensor in memory:
    tensor bytes go to a raw spill file as they come; a shard is closed by writing the
    safetensors header and copying the spilled bytes behind it in chunks. Files are named with a
    per-writer ``prefix``; :func:`finalize_shards` renames them to ``model-0000i-of-0000N`` and
    writes the index once every writer is done."""

    def __init__(self, folder: str, prefix: str, max_shard_bytes: int, dtype: torch.dtype | None):
        self.folder, self.prefix, self.max = folder, prefix, max_shard_bytes
        self.dtype = dtype
        self.entries: dict[str, dict] = {}
        self.bytes = 0
        self.spill = None
        self.written: list[tuple[str, list[str], int]] = []  # (file, names, bytes)

    def _spill_path(self) -> str:
        return os.path.join(self.folder, f"{self.prefix}.spill")

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if self.dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(self.dtype)
        tensor = tensor.detach().to("cpu").contiguous()
        size = tensor.numel() * tensor.element_size()
        if self.entries and self.bytes + size > self.max:
            self.flush()
        if self.spill is None:
            self.spill = open(self._spill_path(), "wb")
        raw = tensor.reshape(-1).view(torch.uint8) if size else torch.empty(0, dtype=torch.uint8)
        self.spill.write(memoryview(raw.numpy()))
        self.entries[name] = {"dtype": _SAFETENSORS_DTYPES[tensor.dtype],
                              "shape": list(tensor.shape),
                              "data_offsets": [self.bytes, self.bytes + size]}
        self.bytes += size

    def flush(self) -> None:
        if not self.entries:
            return
        self.spill.close()
        self.spill = None
        header = {"__metadata__": {"format": "pt"}, **self.entries}
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # align the data section to 8 bytes
        file = f"{self.prefix}-{len(self.written):05d}.safetensors"
        with open(os.path.join(self.folder, file), "wb") as out, \
                open(self._spill_path(), "rb") as spilled:
            out.write(len(blob).to_bytes(8, "little"))
            out.write(blob)
            shutil.copyfileobj(spilled, out, _COPY_CHUNK)
        os.remove(self._spill_path())
        self.written.append((file, list(self.entries), self.bytes))
        self.entries, self.bytes = {}, 0


def finalize_shards(folder: str, parts: Iterable[tuple[str, list[str], int]]) -> dict:
    """Rename the parts written by all writers to model-0000i-of-0000N.safetensors (or
    model.safetensors if there is one) and write the index. Returns the index dict."""
    parts = sorted(parts, key=lambda p: p[0])
    total = sum(p[2] for p in parts)
    weight_map = {}
    for i, (file, names, _) in enumerate(parts):
        final = SINGLE_FILE if len(parts) == 1 else f"model-{i + 1:05d}-of-{len(parts):05d}.safetensors"
        os.replace(os.path.join(folder, file), os.path.join(folder, final))
        weight_map.update({n: final for n in names})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    if len(parts) > 1:
        with open(os.path.join(folder, INDEX_FILE), "w") as f:
            json.dump(index, f, indent=2)
    return index


def copy_sidecar_files(src: str, dst: str) -> list[str]:
    """Copy config / tokenizer / processor files that exist in ``src``; returns their names."""
    copied = []
    for name in SIDECAR_FILES:
        path = os.path.join(src, name)
        if os.path.isfile(path):
            shutil.copy2(path, os.path.join(dst, name))
            copied.append(name)
    return copied

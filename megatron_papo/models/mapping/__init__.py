"""HF <-> Megatron name mapping, family-agnostic: the typed rows a model family's table is made of
(:mod:`.table`) and the engine that applies a table to one rank's TP/PP shard (:mod:`.engine`).
Each family's table lives with it (``models/<family>/bridge.py``); the checkpoint converters
(``conversion/``) and the vLLM weight bridge (``rollout/weights.py``) both go through here."""

from .table import (
    Direct,
    GateUp,
    HFConvention,
    MappingError,
    MappingTable,
    QKVInterleaved,
    Reshaped,
    VisionQKV,
)

__all__ = [
    "Direct", "GateUp", "HFConvention", "MappingError", "MappingTable", "QKVInterleaved",
    "Reshaped", "VisionQKV",
]

"""Shared HF <-> Megatron conversion machinery: typed mapping rows and the engine that applies a
model family's table to a rank's TP/PP shard. The tables themselves live with each model family
(``models/<family>/bridge.py``); converters and the vLLM weight bridge both go through here."""

from .table import (
    HFConvention,
    Direct,
    GateUp,
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

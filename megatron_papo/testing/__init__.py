"""Test support shipped with the package: the multi-process harness, memory probes and the
counting-task helpers (the tiny model the default job builds lives in models/qwen2_5_vl/tiny.py)."""

from .distributed import (
    DistributedTestError,
    DistributedTestTimeout,
    run_distributed,
    shutdown_worker_pools,
)

__all__ = [
    "DistributedTestError",
    "DistributedTestTimeout",
    "run_distributed",
    "shutdown_worker_pools",
]

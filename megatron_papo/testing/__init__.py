"""Test support shipped with the package: the multi-process harness and tiny-model builders."""

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

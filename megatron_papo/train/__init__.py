"""The main job: ``python -m megatron_papo.train`` (Hydra; configs/ at the repository root).

The config (``config``) imports nothing heavy; the loop (``loop``: megatron-core, vLLM) is loaded
on first use of :class:`Trainer`, after the entry point has applied the CPU patches."""

from .config import ConfigError, TrainConfig, build_config

__all__ = ["ConfigError", "TrainConfig", "Trainer", "build_config"]


def __getattr__(name: str):
    if name == "Trainer":
        # lazy on purpose: megatron-core and vLLM only after the entry point's CPU patches
        from .loop import Trainer

        return Trainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

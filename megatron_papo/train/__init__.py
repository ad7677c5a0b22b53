"""The main job: ``python -m megatron_papo.train`` (Hydra; configs/ at the repository root)."""

from .config import ConfigError, TrainConfig, build_config
from .loop import Trainer

__all__ = ["ConfigError", "TrainConfig", "Trainer", "build_config"]

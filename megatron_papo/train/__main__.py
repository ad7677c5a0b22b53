"""``python -m megatron_papo.train [group=option] [key=value ...]`` (``--help`` lists the groups).

Single process by default; under torchrun every process runs it (TP/PP/DP from ``parallel``)."""

from __future__ import annotations

import os
import sys

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "configs")

# Errors that are the user's to fix: one line, exit code 2, no traceback.
USER_ERRORS = ("ConfigError", "DataError", "RolloutInputError", "RewardError",
               "ModelConfigError", "ParallelConfigError", "MappingError", "HFCheckpointError")


def run(raw: dict) -> None:
    from megatron_papo.compat import apply_cpu_patches

    apply_cpu_patches()
    import torch.distributed as dist

    from .config import build_config
    from .loop import Trainer, init_processes

    init_processes()
    trainer = None
    interrupted = 0
    try:
        config = build_config(raw, dist.get_world_size())
        trainer = Trainer(config)
        interrupted = trainer.run()["interrupted"]
    except Exception as err:  # noqa: BLE001
        if type(err).__name__ not in USER_ERRORS:
            raise
        print(f"error: {err}", file=sys.stderr, flush=True)
        if trainer is not None:
            trainer.close()
            trainer = None
        sys.exit(2)
    finally:
        if trainer is not None:
            trainer.close()
    dist.destroy_process_group()
    if interrupted:  # stopped by SIGTERM/SIGUSR1 after saving a checkpoint
        sys.exit(128 + interrupted)


def main() -> None:
    import hydra
    from omegaconf import OmegaConf

    from omegaconf.errors import MissingMandatoryValue

    @hydra.main(config_path=CONFIG_DIR, config_name="train", version_base=None)
    def _main(cfg) -> None:
        try:
            raw = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
        except MissingMandatoryValue as err:
            key = getattr(err, "full_key", None) or str(err)
            print(f"error: {key} has no value and this configuration needs one: pass {key}=... "
                  "on the command line", file=sys.stderr, flush=True)
            sys.exit(2)
        run(raw)

    _main()


if __name__ == "__main__":
    main()

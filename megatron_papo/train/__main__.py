"""``python -m megatron_papo.train [group=option] [key=value ...]`` (``--help`` lists the groups).

Single process by default; under torchrun every process runs it (TP/PP/DP from ``parallel``)."""

from __future__ import annotations

import os
import sys

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "configs")


def run(raw: dict) -> None:
    from megatron_papo.compat import apply_cpu_patches

    apply_cpu_patches()
    import torch.distributed as dist

    from megatron_papo.cli import fail, is_user_error, quiet_redundant_logs
    from megatron_papo.parallel import init_processes

    quiet_redundant_logs()
    from .config import build_config
    from .loop import Trainer

    init_processes()
    trainer = None
    interrupted = 0
    try:
        config = build_config(raw, dist.get_world_size())
        trainer = Trainer(config)
        interrupted = trainer.run()["interrupted"]
    except Exception as err:  # noqa: BLE001
        if not is_user_error(err):
            raise
        if trainer is not None:
            trainer.close()
            trainer = None
        fail(err)
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
            from megatron_papo.cli import fail

            key = getattr(err, "full_key", None) or str(err)
            fail(f"{key} has no value and this configuration needs one: pass {key}=... on the "
                 "command line")
        run(raw)

    _main()


if __name__ == "__main__":
    main()

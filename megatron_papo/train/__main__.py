"""``python -m megatron_papo.train [group=option] [key=value ...]`` (``--help`` lists the groups).

Started as one process it runs ``parallel.processes`` ranks on this machine (auto: the tiny model
on a CPU machine gets one per core, at most 4; train/launch.py); under torchrun every process
runs it (TP/PP/DP from ``parallel``)."""

from __future__ import annotations

import contextlib
import os
import sys

import hydra
import psutil
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf
from omegaconf.errors import MissingMandatoryValue

from megatron_papo.cli import fail, internal_error, is_user_error, quiet_redundant_logs

# torch, megatron-core and vLLM are imported by the ranks only (run): the command that starts
# them reads the configuration and spawns at once (~5 s less before the ranks start)
from .config import CONFIG_DIR, ConfigError, TrainerConfig, build_config
from .launch import processes_to_start, spawn


def _exit_now(code: int) -> None:
    """Exit at once, without the process group's teardown (it would wait for the lost peer
    again) and without leaving a child process behind (os._exit skips the handlers that would
    stop multiprocessing's children)."""
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            child.kill()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run(raw: dict) -> None:
    import torch.distributed as dist

    from megatron_papo.compat import apply_cpu_patches
    from megatron_papo.parallel import (
        diagnose_collective_failure,
        init_processes,
        is_collective_failure,
    )

    quiet_redundant_logs()  # before megatron-core is imported (its import notes)
    apply_cpu_patches()
    from .loop import Trainer  # megatron-core and vLLM: after apply_cpu_patches(), which they need

    timeout = (raw.get("trainer") or {}).get("collective_timeout_minutes")
    init_processes(timeout_minutes=timeout or TrainerConfig.collective_timeout_minutes)
    trainer = None
    interrupted = 0
    try:
        config = build_config(raw, dist.get_world_size())
        trainer = Trainer(config)
        interrupted = trainer.run()["interrupted"]
    except Exception as err:  # noqa: BLE001
        if dist.get_world_size() > 1 and is_collective_failure(err):
            # a peer hung or died: no further collective (it would wait again); say which rank
            # stopped where, release the engine, exit non-zero (torchrun stops the others)
            print(f"error: {diagnose_collective_failure(err)}", file=sys.stderr, flush=True)
            if trainer is not None:
                trainer.engine.close()
            _exit_now(3)
        if trainer is not None:
            trainer.close()
            trainer = None
        if not is_user_error(err):
            # a bug or an unforeseen failure: one line, the traceback in the run folder
            sys.exit(internal_error(err, "train", (raw.get("trainer") or {}).get("output_dir")))
        fail(err)
    finally:
        if trainer is not None:
            trainer.close()
    dist.destroy_process_group()
    if interrupted:  # stopped by SIGTERM/SIGUSR1 after saving a checkpoint
        sys.exit(128 + interrupted)


def main() -> None:
    @hydra.main(config_path=CONFIG_DIR, config_name="train", version_base=None)
    def _main(cfg) -> None:
        try:
            raw = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
        except MissingMandatoryValue as err:
            key = getattr(err, "full_key", None) or str(err)
            fail(f"{key} has no value and this configuration needs one: pass {key}=... on the "
                 "command line")
        try:
            processes = processes_to_start(raw)
        except ConfigError as err:
            fail(err)
        if processes > 1:
            print(f"[train] {processes} processes on this machine (parallel.processes="
                  f"{(raw.get('parallel') or {}).get('processes')}; one: parallel.processes=1)",
                  flush=True)
            sys.exit(spawn(processes, sys.argv[1:], HydraConfig.get().run.dir))
        run(raw)

    _main()


if __name__ == "__main__":
    main()

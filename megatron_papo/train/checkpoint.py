"""Training checkpoints: everything a run needs to continue exactly where it stopped.

``<checkpoint_dir>/step_00000050/``, written by every rank through ``atomic_output_dir`` (a
temporary name renamed when complete, so a crash never leaves a folder that looks complete)::

    megatron_papo.json   format, kind "training", dtype, the layout it was written at
    hf/                  config, tokenizer and processor of the model it trains (mcore-to-hf and
                         `python -m megatron_papo.evaluate` read training checkpoints directly)
    weights/             megatron-core dist_checkpointing: {"model", "optimizer"} (the distributed
                         optimizer as ``fully_reshardable``: loadable at another TP/PP/DP)
    trainer_state.json   step, warm start done, the data sampler's RNG, the monitor's history
    rng/rank_XXXXX.pt    torch / numpy / python / model-parallel tracker RNG states per rank
    config.json          the configuration that made it

``<checkpoint_dir>/latest`` names the newest complete one; older ones beyond ``keep_last`` are
removed after a save. :func:`find_resumable` picks the newest COMPLETE checkpoint, saying why it
skips any other.
"""

from __future__ import annotations

import json
import os
import random
import shutil

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, tensor_parallel
from megatron.core.utils import unwrap_model

from megatron_papo.compat import save_sharded
from megatron_papo.conversion.atomic import atomic_output_dir
from megatron_papo.conversion.checkpoint import (
    FORMAT,
    HF_DIR,
    META_FILE,
    WEIGHTS_DIR,
    ConversionError,
)
from megatron_papo.conversion.hf_io import copy_sidecar_files
from megatron_papo.conversion.locate import PREFIX, RNG_DIR, STATE_FILE, step_dirs

CONFIG_FILE = "config.json"
LATEST = "latest"


def _meta(optimizer_format: str) -> dict:
    """megatron-core's sharded-state-dict metadata for ``trainer.checkpoint_format``."""
    return {"distrib_optim_sharding_type": optimizer_format}


def step_dir(root: str, step: int) -> str:
    return os.path.join(root, f"{PREFIX}{step:08d}")


def _sharded(chunks: list, optimizer, is_loading: bool,
             optimizer_format: str = "fully_reshardable") -> dict:
    # the model inside DDP / Float16Module: the keys of converted checkpoints, so training and
    # converted checkpoints load the same way
    model_sd = unwrap_model(chunks[0]).sharded_state_dict()
    return {"model": model_sd,
            "optimizer": optimizer.sharded_state_dict(model_sd, is_loading=is_loading,
                                                      metadata=_meta(optimizer_format))}


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
             "python": random.getstate(),
             "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(root: str, step: int, chunks: list, optimizer, state: dict, config: dict, hf_dir: str,
         dtype: str, layout: dict, keep_last: int = 2,
         optimizer_format: str = "fully_reshardable") -> str:
    """Write checkpoint ``step`` (every rank calls it); returns its folder. ``optimizer_format``:
    fully_reshardable (loads at any layout; megatron-core gathers a copy of the fp32 weights and
    Adam moments on every rank while saving) or dp_reshardable (the buffers as they are: no
    copy; loads at the same TP/PP)."""
    rank = dist.get_rank()
    path = step_dir(root, step)
    os.makedirs(root, exist_ok=True)
    with atomic_output_dir(path, force=True, inputs=[hf_dir]) as tmp:
        if rank == 0:
            for sub in (WEIGHTS_DIR, HF_DIR, RNG_DIR):
                os.makedirs(os.path.join(tmp, sub))
            copy_sidecar_files(hf_dir, os.path.join(tmp, HF_DIR))
            short = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(dtype, dtype)
            with open(os.path.join(tmp, META_FILE), "w") as f:
                json.dump({"format": FORMAT, "kind": "training", "dtype": short, "step": step,
                           "written_at": layout, "optimizer_format": optimizer_format}, f,
                          indent=2)
            with open(os.path.join(tmp, STATE_FILE), "w") as f:
                json.dump(state, f)
            with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
                json.dump(config, f, indent=1)
        dist.barrier()
        save_sharded(_sharded(chunks, optimizer, is_loading=False,
                              optimizer_format=optimizer_format),
                     os.path.join(tmp, WEIGHTS_DIR))
        torch.save(_rng_state(), os.path.join(tmp, RNG_DIR, f"rank_{rank:05d}.pt"))
    if rank == 0:
        pointer = os.path.join(root, LATEST)
        with open(pointer + ".tmp", "w") as f:
            f.write(os.path.basename(path) + "\n")
        os.replace(pointer + ".tmp", pointer)
        for old in sorted(step_dirs(root))[:-keep_last] if keep_last > 0 else []:
            if os.path.basename(old) != os.path.basename(path):
                shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return path


def load(path: str, chunks: list, optimizer, layout: dict, log=print) -> dict:
    """Load weights, optimizer and (same layout only) RNG states; returns the trainer state. A
    dp_reshardable checkpoint at another TP/PP is refused in one line before anything loads."""
    with open(os.path.join(path, META_FILE)) as f:
        meta = json.load(f)
    written_at = meta["written_at"]
    optimizer_format = meta.get("optimizer_format", "fully_reshardable")  # (before the key)
    fixed = ("tp", "pp", "stage_layers")
    if optimizer_format == "dp_reshardable" and any(written_at.get(k) != layout.get(k)
                                                    for k in fixed):
        raise ConversionError(
            f"{path} was written with trainer.checkpoint_format=dp_reshardable at "
            f"{ {k: written_at.get(k) for k in fixed if k in written_at} }; this run is "
            f"{ {k: layout.get(k) for k in fixed if k in layout} }: resume at the same TP/PP "
            "(any DP), or convert it with tools/convert_checkpoint.py mcore-to-hf and start "
            "from the HF folder")
    state = dist_checkpointing.load(_sharded(chunks, optimizer, is_loading=True,
                                             optimizer_format=optimizer_format),
                                    os.path.join(path, WEIGHTS_DIR))
    unwrap_model(chunks[0]).load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    rng_file = os.path.join(path, RNG_DIR, f"rank_{dist.get_rank():05d}.pt")
    if written_at == layout and os.path.exists(rng_file):
        _set_rng_state(torch.load(rng_file, weights_only=False))
    else:
        log(f"[train] {path} was written at {written_at}, this run is {layout}: weights and "
            "optimizer resharded, per-rank RNG states not restored")
    with open(os.path.join(path, STATE_FILE)) as f:
        return json.load(f)

"""Everything that depends on the platform or on the megatron-core version lives here.

* :func:`apply_cpu_patches` - the one call made at process start (entry points, test workers).
  On a machine without CUDA it applies every patch in :data:`CPU_PATCHES` (see ``cpu.py``; each
  docstring names the failure it fixes); with CUDA it only records that nothing was needed.
* version differences between megatron-core 0.16.x (Python 3.11 wheels) and 0.19.x are handled
  by the same patches (e.g. ``cpu.patch_triton_free_import`` only bites on 0.19.x); the suite runs
  on both.
"""

from __future__ import annotations

import os
import queue
import warnings

import torch

from . import cpu
from .torchvision_cpu import patch_torchvision_meta_registrations


def patch_quiet_cpu_fallback_warnings() -> None:
    """megatron-core warns at import that TE/Apex are absent and it falls back to torch, and
    its dist_checkpointing calls torch APIs that torch has deprecated.

    That is the expected state on CPU and nothing a user can act on; the warnings (several per
    process and rank) bury real output, above all a one-line error."""
    for message in (r"Transformer Engine and Apex are not installed",
                    r"Apex is not installed\. Falling back to Torch Norm",
                    r"full scope is deprecated"):
        warnings.filterwarnings("ignore", message=message, category=UserWarning)
    for message in (r"`load_state_dict` is deprecated", r"Please use DTensor instead"):
        warnings.filterwarnings("ignore", message=message, category=FutureWarning)


def patch_megatron_core() -> None:
    """Apply the megatron-core patches of ``cpu.py`` (imports megatron.core)."""
    cpu.patch_triton_free_import()
    cpu.patch_megatron_cuda_calls()
    import megatron.core  # noqa: F401  (after the import hook, so its modules are redirected)

    cpu.patch_megatron_cuda_calls()
    cpu.patch_rng_tracker()
    cpu.patch_cuda_tensor_type_checks()
    cpu.patch_fresh_optimizer_state_for_loading()


_ROPE_MARK = "_megatron_papo_one_pass"


def patch_packed_rope_in_one_pass() -> None:
    """Speed, not a failure: the rotary embedding of a packed (THD) micro-batch in one pass.

    With rotary angles given for every token (``freqs.size(0) == cu_seqlens[-1]``: the language
    model's MRoPE, computed per token of the packed row), megatron-core's unfused
    ``_apply_rotary_pos_emb_thd`` splits the tokens per sequence and reads each sequence's
    offset with ``.item()`` to slice ``freqs[offset:offset + length]``, then concatenates the
    slices: without context parallelism that concatenation IS ``freqs``. For the default job
    (128 sequences per micro-batch, query and key, every layer, forward and backward) the loop
    was ~6 % of a training step. Here, without context parallelism and with per-token angles,
    the rotation runs once over the packed tokens with ``freqs`` itself: the same elementwise
    operations on the same values (bit-identical, ``tests/test_compat.py``). Anything else
    (context parallelism, angles per position of the longest sequence) takes the original."""
    from megatron.core.models.common.embeddings import rope_utils

    original = rope_utils._apply_rotary_pos_emb_thd
    if getattr(original, _ROPE_MARK, False):
        return

    def one_pass(t, cu_seqlens, freqs, rotary_interleaved=False, multi_latent_attention=False,
                 mscale=1.0, cp_group=None):
        if (cp_group is not None and cp_group.size() == 1 and freqs.dim() >= 1
                and freqs.size(0) == t.size(0) and int(cu_seqlens[-1]) == t.size(0)):
            return rope_utils._apply_rotary_pos_emb_bshd(
                t.unsqueeze(1), freqs, rotary_interleaved=rotary_interleaved,
                multi_latent_attention=multi_latent_attention, mscale=mscale).squeeze(1)
        return original(t, cu_seqlens, freqs, rotary_interleaved=rotary_interleaved,
                        multi_latent_attention=multi_latent_attention, mscale=mscale,
                        cp_group=cp_group)

    setattr(one_pass, _ROPE_MARK, True)
    one_pass.original = original
    rope_utils._apply_rotary_pos_emb_thd = one_pass


CPU_PATCHES = (
    patch_quiet_cpu_fallback_warnings,
    patch_torchvision_meta_registrations,
    patch_megatron_core,
    patch_packed_rope_in_one_pass,
)

_APPLIED: bool | None = None


def apply_cpu_patches(force: bool = False) -> bool:
    """Apply every CPU patch if CUDA is absent. Safe to call any number of times.

    Returns True when the patches are in force. ``force=True`` is for tests only.
    """
    global _APPLIED
    if _APPLIED and not force:
        return True
    if torch.cuda.is_available() and not force:
        _APPLIED = False
        return False
    # vLLM on CPU: its engine runs in-process and needs no inductor compile (ENVIRONMENT.md).
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    for patch in CPU_PATCHES:
        patch()
    _APPLIED = True
    return True


def save_sharded(sharded_state_dict: dict, folder: str) -> None:
    """``dist_checkpointing.save`` (synchronous, as every save here is), its write results handed
    over in this process.

    megatron-core's file writer passes its results through a queue of a multiprocessing Manager
    that it starts on first use in a spawned interpreter (one per process; seconds, as the fresh
    interpreter imports the entry point's modules), so that an asynchronous save in another
    process can report back. A synchronous save's writers report to the saving process itself,
    where a plain queue carries the results (same files, same finalisation)."""
    # megatron-core: this package is imported before apply_cpu_patches, which must precede it
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if getattr(filesystem_async, "_results_queue", False) is None:
        filesystem_async._results_queue = queue.Queue()
    dist_checkpointing.save(sharded_state_dict, folder)


__all__ = ["apply_cpu_patches", "CPU_PATCHES", "save_sharded"]

"""What a vLLM engine living inside a training process needs (CPU and GPU alike).

vLLM assumes it owns ``torch.distributed``; a colocated engine shares the process with the
trainer, whose default process group (and megatron-core's groups) must outlive the engine.
"""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def engine_shutdown_keeps_process_group():
    """Failure fixed: shutting down an in-process vLLM engine (``EngineCore.shutdown`` ->
    ``cleanup_dist_env_and_memory`` -> ``destroy_distributed_environment``) calls
    ``torch.distributed.destroy_process_group()`` on the DEFAULT group, the trainer's: the next
    collective of the trainer then fails, and a later engine in the same process re-initialises
    the world and hangs waiting for peers.

    Within this context vLLM's teardown destroys its own groups (the world coordinator's
    sub-groups, TP/PP/DP groups) and forgets them, but leaves the default group alone. The patch
    is scoped to the context: outside it vLLM is untouched.
    """
    from vllm.distributed import parallel_state as vps

    original = vps.destroy_distributed_environment

    def destroy_own_groups_only():
        if vps._WORLD is not None:
            vps._WORLD.destroy()  # its device/cpu groups are sub-groups made by new_group
        vps._WORLD = None
        vps._NODE_COUNT = None

    vps.destroy_distributed_environment = destroy_own_groups_only
    try:
        yield
    finally:
        vps.destroy_distributed_environment = original

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


def reprocess_tied_modules(worker) -> int:
    """Failure fixed: after an in-place weight reload, a TIED output head served the previous
    weights' head (the engine's output equalled neither the old nor the new model).

    What vLLM does with tied heads: ``ParallelLMHead.tie_weights`` makes ``lm_head.weight`` the
    very Parameter of ``embed_tokens`` (two modules, one tensor), and the model's
    ``load_weights`` skips ``lm_head.*`` names, so a reload fills the shared tensor through the
    embedding only. But the head computes its logits through what its quant method's
    ``process_weights_after_loading`` derived from that tensor when the model was first loaded:
    on CPU (``UnquantizedEmbeddingMethod`` -> ``dispatch_cpu_unquantized_gemm``) a packed copy of
    the weight (sgl-kernel / oneDNN) held by ``lm_head.cpu_linear``. The layer-wise reload
    re-runs that processing only for modules that received weights; the head receives none
    ("Failed to load weights" for ``ParallelLMHead``, silenced by us as expected), so it kept
    the packed copy of the OLD weight while the embedding rows were new.

    The fix, run in every worker after every reload: each module whose parameter is shared with
    another module (a tie) has its processing redone from the current tensor. On GPU the
    unquantized processing is a no-op (the head reads ``lm_head.weight`` itself, already new),
    so this is the same code path there and costs nothing. Returns how many modules it redid."""
    model = worker.get_model()
    owners: dict[int, list] = {}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            owners.setdefault(id(param), []).append(module)
    redone = 0
    done: set[int] = set()
    for modules in owners.values():
        if len(modules) < 2:
            continue
        for module in modules:
            method = getattr(module, "quant_method", None)
            if method is None or id(module) in done:
                continue
            method.process_weights_after_loading(module)
            done.add(id(module))
            redone += 1
    return redone

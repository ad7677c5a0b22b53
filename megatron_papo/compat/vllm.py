"""What a vLLM engine living inside a training process needs (CPU and GPU alike).

vLLM assumes it owns ``torch.distributed``; a colocated engine shares the process with the
trainer, whose default process group (and megatron-core's groups) must outlive the engine.
"""

from __future__ import annotations

import contextlib
import os

import torch


def cpu_shm_names_per_job() -> None:
    """Failure fixed: vLLM on CPU names the shared memory of a TP group's collectives after the
    port of its distributed init method; an engine inside a training process (the external
    launcher, ``env://``) has none, so every TP > 1 engine on one machine takes the same name and
    a second job's engine fails with ``create shm in SHMManager failed. errno: 17`` (two test
    workers, or two CPU jobs on one machine). The job's MASTER_PORT (the same on all its ranks,
    held by it while it runs) is added to the name. Idempotent; CPU engines only."""
    from vllm.distributed.device_communicators import cpu_communicator as cc

    make = cc._CPUSHMDistributed.make_group_name
    if getattr(make, "_per_job", False):
        return

    def per_job(communicator) -> str:
        # (no '/' inside: shm_open refuses it; vLLM's own name starts with the '//' of env://)
        return f"{os.environ.get('MASTER_PORT', '')}-{make(communicator).replace('/', '')}"

    per_job._per_job = True
    cc._CPUSHMDistributed.make_group_name = staticmethod(per_job)


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
    from vllm.distributed import parallel_state as vps  # vLLM (seconds): engine paths only

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


def score_with_sampling_distribution(worker, temperature: float | None,
                                     suppressed_token_ids: list[int] = ()) -> int:
    """Gap filled: vLLM's prompt log-probs are computed from the RAW logits (its
    ``_get_prompt_logprobs_dict`` calls ``compute_logits`` and ``compute_logprobs`` directly:
    neither the temperature nor the logits processors of sampling apply), whereas scoring a
    sampled response for RL needs the distribution it was sampled from.

    ``temperature`` given: every ``LogitsProcessor`` layer of the model (the output head's
    logits, computed once for sampling and for prompt log-probs) sets the suppressed ids to -inf
    and divides by the temperature, until called again with ``temperature=None``. Only scoring
    requests run in between (their one sampled token is discarded). Run in every worker through
    ``collective_rpc``; returns how many layers it changed."""
    from vllm.model_executor.layers.logits_processor import LogitsProcessor  # vLLM: in its workers

    changed = 0
    for module in worker.get_model().modules():
        if not isinstance(module, LogitsProcessor):
            continue
        module.__dict__.pop("forward", None)  # back to the class's forward
        if temperature is not None:
            original = module.forward
            ids = torch.tensor(list(suppressed_token_ids), dtype=torch.long)

            def forward(*args, _original=original, _ids=ids, **kwargs):
                logits = _original(*args, **kwargs)
                if logits is None:  # a TP rank that does not hold the gathered logits
                    return None
                logits = logits.clone()
                if _ids.numel():
                    logits.index_fill_(-1, _ids.to(logits.device), float("-inf"))
                return logits / temperature

            module.forward = forward
        changed += 1
    return changed


def generate_continuations(llm, prompts: list[dict], continuations: list[list[list[int]]],
                           params) -> list[list]:
    """Run "prompt + continuation" for every continuation of every prompt (token prompts with
    their multimodal data); returns vLLM's outputs per prompt, per continuation.

    Cost fixed: vLLM renders every request on its own (the multimodal processor, its cache
    lookup, the placeholder expansion: ~1.5 ms per request on CPU, more than the prefill of a
    short sequence), although the n responses of a prompt share the prompt and its images. Here
    each prompt is rendered ONCE (``LLM._preprocess_cmpl_one``: the same rendering as
    ``LLM.generate``) and its continuations are appended to the rendered, already expanded
    token ids (the image placeholders keep their offsets); vLLM documents passing rendered
    inputs to ``LLMEngine.add_request``. A vLLM without these entry points gets the plain path
    (one ``generate`` request per continuation, the placeholders collapsed for it to expand)."""
    # vLLM (seconds to import): only the engine's paths need it
    from vllm.outputs import RequestOutput
    from vllm.sampling_params import RequestOutputKind

    if not all(hasattr(llm, name) for name in ("_preprocess_cmpl_one", "_run_engine")):
        return _generate_continuations_plainly(llm, prompts, continuations, params)
    inputs, owners = [], []
    for p, (prompt, ends) in enumerate(zip(prompts, continuations)):
        base = llm._preprocess_cmpl_one(prompt)
        for k, end in enumerate(ends):
            engine_input = dict(base)
            engine_input["prompt_token_ids"] = list(base["prompt_token_ids"]) + list(end)
            inputs.append(engine_input)
            owners.append((p, k))
    params = params.clone()
    params.output_kind = RequestOutputKind.FINAL_ONLY  # as LLM.generate asks
    external, internal = [], []
    try:
        for engine_input in inputs:
            external.append(str(next(llm.request_counter)))
            internal.append(llm.llm_engine.add_request(external[-1], engine_input,
                                                       params.clone()))
    except Exception:
        if internal:
            llm.llm_engine.abort_request(internal, internal=True)
        raise
    by_id = {out.request_id: out for out in llm._run_engine(RequestOutput, use_tqdm=False)}
    result = [[None] * len(ends) for ends in continuations]
    for request_id, (p, k) in zip(external, owners):
        result[p][k] = by_id[request_id]
    return result


def _generate_continuations_plainly(llm, prompts, continuations, params) -> list[list]:
    requests, owners = [], []
    for p, (prompt, ends) in enumerate(zip(prompts, continuations)):
        for k, end in enumerate(ends):
            requests.append({**prompt, "prompt_token_ids": list(prompt["prompt_token_ids"]) +
                             list(end)})
            owners.append((p, k))
    result = [[None] * len(ends) for ends in continuations]
    for (p, k), out in zip(owners, llm.generate(requests, params, use_tqdm=False)):
        result[p][k] = out
    return result

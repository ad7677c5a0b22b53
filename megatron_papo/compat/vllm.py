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


def batched_prompt_logprobs(worker, on: bool) -> bool:
    """Cost fixed: vLLM computes prompt log-probs request by request ("a rare feature": a Python
    loop of ~6 small ops each: the output head, log-softmax, gather, rank, three copies), which
    for scoring 512 short sequences on CPU took ~28% of the scoring time (py-spy, default job).
    ``on``: the model runner's ``_get_prompt_logprobs_dict`` does the same for all requests of a
    step at once (one head, one log-softmax, one gather over their rows, the same chunk
    bookkeeping), until called with ``on=False``. Requests asking for different numbers of
    prompt log-probs, or for logits instead of log-probs, take vLLM's loop. Run in every worker
    through ``collective_rpc``."""
    runner = worker.model_runner
    runner.__dict__.pop("_get_prompt_logprobs_dict", None)  # back to the class's method
    if not on:
        return False
    from vllm.v1.outputs import LogprobsTensors  # vLLM: in its workers

    per_request = runner._get_prompt_logprobs_dict

    def all_at_once(hidden_states: torch.Tensor, num_scheduled_tokens: dict) -> dict:
        wanted = runner.num_prompt_logprobs
        if not wanted:
            return {}
        if (len(set(wanted.values())) > 1
                or runner.model_config.logprobs_mode in ("raw_logits", "processed_logits")):
            return per_request(hidden_states, num_scheduled_tokens)
        k = next(iter(wanted.values()))
        result, done, parts = {}, [], []
        for req_id in wanted:
            num_tokens = num_scheduled_tokens.get(req_id)
            if num_tokens is None:  # preempted in its prefill
                continue
            request = runner.requests[req_id]
            if request.prompt_token_ids is None:  # prompt embeddings: no prompt log-probs
                continue
            prompt = len(request.prompt_token_ids)
            tensors = request.in_progress_prompt_logprobs_cpu
            if tensors is None:
                tensors = LogprobsTensors.empty_cpu(prompt - 1, k + 1)
                request.in_progress_prompt_logprobs_cpu = tensors
            start = request.num_computed_tokens
            count = min(num_tokens, prompt - start - 1)
            if num_tokens > prompt - start - 1:  # its last prompt chunk
                done.append(req_id)
                result[req_id] = tensors
            if count > 0:
                offset = runner.query_start_loc.np[runner.input_batch.req_id_to_index[req_id]]
                parts.append((tensors, start, count, int(offset),
                              request.prompt_token_ids[start + 1:start + 1 + count]))
        if parts:
            device = hidden_states.device
            rows = torch.cat([torch.arange(offset, offset + count)
                              for _, _, count, offset, _ in parts]).to(device)
            targets = torch.tensor([t for *_, ids in parts for t in ids], dtype=torch.int64,
                                   device=device)
            scores = runner.sampler.compute_logprobs(runner.model.compute_logits(
                hidden_states[rows]))
            ids, logprobs, ranks, *_ = runner.sampler.gather_logprobs(scores, k, targets)
            at = 0
            for tensors, start, count, _, _ in parts:
                into, take = slice(start, start + count), slice(at, at + count)
                tensors.logprob_token_ids[into].copy_(ids[take], non_blocking=True)
                tensors.logprobs[into].copy_(logprobs[take], non_blocking=True)
                tensors.selected_token_ranks[into].copy_(ranks[take], non_blocking=True)
                at += count
        for req_id in done:
            del wanted[req_id]
            runner.requests[req_id].in_progress_prompt_logprobs_cpu = None
        if result:
            runner._sync_device()
        return result

    runner._get_prompt_logprobs_dict = all_at_once
    return True


# SamplingParams.extra_args key: the prompt length a scoring request may read from the prefix cache
CACHE_HIT_CAP = "megatron_papo_cache_hit_cap"


def cap_prefix_cache_hits(llm) -> bool:
    """Gap filled: vLLM never reads the prefix cache for a request that asks for prompt
    log-probs (``SamplingParams.skip_reading_prefix_cache`` defaults to true then: the cached
    positions would have no log-probs), so each of a prompt's n scored responses prefills the
    whole prompt again. Scoring needs log-probs of the RESPONSE positions only: a request whose
    ``extra_args`` carry ``CACHE_HIT_CAP`` = c may read cached blocks covering at most its first
    c tokens (c = prompt length - 1: the last prompt position's hidden state gives the first
    response token's log-prob, so every needed position is computed; vLLM's prompt log-probs
    start at the request's computed-token count). Installed once on the engine's scheduler
    (in this process); other requests are untouched. Returns False where the scheduler is not
    in this process (the caller then keeps the cache unread)."""
    try:
        manager = llm.llm_engine.engine_core.engine_core.scheduler.kv_cache_manager
        coordinator = manager.coordinator
    except AttributeError:
        return False
    if getattr(manager.get_computed_blocks, "_capped", False):
        return True
    original = manager.get_computed_blocks

    def get_computed_blocks(request):
        params = request.sampling_params
        cap = (params.extra_args or {}).get(CACHE_HIT_CAP) if params is not None else None
        if cap is None:
            return original(request)
        find = coordinator.find_longest_cache_hit
        coordinator.find_longest_cache_hit = (
            lambda hashes, longest: find(hashes, min(longest, cap)))
        try:
            return original(request)
        finally:
            del coordinator.find_longest_cache_hit  # the class's method again

    get_computed_blocks._capped = True
    manager.get_computed_blocks = get_computed_blocks
    return True


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
    (one ``generate`` request per continuation, the placeholders collapsed for it to expand).

    With prompt log-probs, the n continuations of a prompt also share its prefill: each may read
    the prefix cache up to the prompt (:func:`cap_prefix_cache_hits`; blocks of vLLM's
    ``block_size``, so prompts shorter than a block gain nothing); a request that read further
    (never expected) raises instead of returning log-probs that were not computed."""
    # vLLM (seconds to import): only the engine's paths need it
    from vllm.outputs import RequestOutput
    from vllm.sampling_params import RequestOutputKind

    if not all(hasattr(llm, name) for name in ("_preprocess_cmpl_one", "_run_engine")):
        return _generate_continuations_plainly(llm, prompts, continuations, params)
    params = params.clone()
    params.output_kind = RequestOutputKind.FINAL_ONLY  # as LLM.generate asks
    shared = params.prompt_logprobs is not None and cap_prefix_cache_hits(llm)
    inputs, owners, caps = [], [], []
    for p, (prompt, ends) in enumerate(zip(prompts, continuations)):
        base = llm._preprocess_cmpl_one(prompt)
        own = params.clone()
        if shared:  # the prompt's prefill shared by its continuations (see above)
            own.skip_reading_prefix_cache = False
            own.extra_args = {**(own.extra_args or {}),
                              CACHE_HIT_CAP: len(base["prompt_token_ids"]) - 1}
        for k, end in enumerate(ends):
            engine_input = dict(base)
            engine_input["prompt_token_ids"] = list(base["prompt_token_ids"]) + list(end)
            inputs.append((engine_input, own))
            owners.append((p, k))
            caps.append(len(base["prompt_token_ids"]) - 1)
    external, internal = [], []
    try:
        for engine_input, own in inputs:
            external.append(str(next(llm.request_counter)))
            internal.append(llm.llm_engine.add_request(external[-1], engine_input, own.clone()))
    except Exception:
        if internal:
            llm.llm_engine.abort_request(internal, internal=True)
        raise
    by_id = {out.request_id: out for out in llm._run_engine(RequestOutput, use_tqdm=False)}
    result = [[None] * len(ends) for ends in continuations]
    for request_id, (p, k), cap in zip(external, owners, caps):
        out = result[p][k] = by_id[request_id]
        if shared and (out.num_cached_tokens or 0) > cap:
            raise RuntimeError(f"prompt {p}, continuation {k}: vLLM read {out.num_cached_tokens} "
                               f"tokens from its prefix cache, past the prompt ({cap + 1}): the "
                               "log-probs of the first continuation tokens were not computed")
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

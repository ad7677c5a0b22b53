"""The PAPO training loop on Megatron-Core with colocated vLLM rollouts.

One step, top to bottom (:meth:`Trainer.step`): rollout -> reward -> advantages -> old / ref /
masked log-probs -> update -> weight sync -> metrics. :meth:`Trainer.run` wraps it with
held-out evaluation before, periodically and after, and ends with an HF export.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import signal
import time

import torch
import torch.distributed as dist

from megatron_papo.compat import apply_cpu_patches

apply_cpu_patches()  # before megatron-core is imported: its CPU fixes hook that import

from megatron.core import parallel_state  # noqa: E402
from megatron.core.optimizer import (  # noqa: E402
    OptimizerConfig,
    ParamKey,
    get_megatron_optimizer,
    get_standard_config_overrides,
)

from megatron_papo.conversion import checkpoint as ck  # noqa: E402
from megatron_papo.conversion.atomic import overlapping_input  # noqa: E402
from megatron_papo.conversion.locate import find_resumable, why_incomplete  # noqa: E402
from megatron_papo.data import images_per_prompt, load_split, write_counting_dataset  # noqa: E402
from megatron_papo.evaluate import EVAL_SEED, avg_at_k  # noqa: E402
from megatron_papo.models.qwen2_5_vl import load_hf_config, text_spec_from_hf  # noqa: E402
from megatron_papo.models.qwen2_5_vl.provider import build_model_chunks, sync_params  # noqa: E402
from megatron_papo.models.qwen2_5_vl.tiny import (  # noqa: E402
    build_word_tokenizer,
    sized_hf_config,
    write_tiny_checkpoint,
)
from megatron_papo.parallel import (  # noqa: E402
    all_gather_objects,
    heartbeat,
    initialize_model_parallel,
    model_device,
)
from megatron_papo.reward import score_all  # noqa: E402
from megatron_papo.rl.algorithms import (  # noqa: E402
    LossConfig,
    fill_with_signal,
    group_advantages,
    overlong_penalty,
    redraw_prompts,
)
from megatron_papo.rl.logprobs import SampledDistribution  # noqa: E402
from megatron_papo.rl.masking import masked_copies  # noqa: E402
from megatron_papo.rl.step import (  # noqa: E402
    PerceptionHackingMonitor,
    PolicyUpdater,
    UpdateConfig,
)
from megatron_papo.rollout import (  # noqa: E402
    PromptRollout,
    Response,
    RolloutEngine,
    ScoreRequest,
    build_rollout_batch,
    iter_hf_weights,
)
from megatron_papo.rollout.engine import (  # noqa: E402
    data_parallel_share,
    is_long_rollout,
    split_evenly,
)
from megatron_papo.runlock import acquire_on_rank0, folder_lock, release_all  # noqa: E402

from . import checkpoint  # noqa: E402
from .config import ConfigError, TrainConfig  # noqa: E402
from .metrics import (  # noqa: E402
    MemoryLedger,
    Metrics,
    process_seconds,
    return_free_memory,
    step_record,
    stop_on_mismatch,
    watch,
)
from .metrics import log as _log  # noqa: E402

SYNTHETIC_DIR = "data"
INITIAL_HF_DIR = "initial_hf"
EXPORT_DIR = "hf"
WARM_START_DIR = "warm_start_hf"  # the policy RL starts from after a warm start: the reference


def _texts(examples) -> list[str]:
    return [item["text"] if isinstance(item, dict) else item
            for e in examples for message in e.messages
            for item in (message["content"] if isinstance(message["content"], list)
                         else [message["content"]])
            if isinstance(item, str) or item.get("type") == "text"]


def tiny_hf_folder(folder: str, config: TrainConfig, examples=()) -> str:
    """The embedded tiny Qwen2.5-VL (random weights, local tokenizer and processor). With
    ``model.tiny_tokenizer=words`` its vocabulary is the words of ``examples``' prompts, the
    answers' digits and the response format (~35 tokens on the counting task)."""
    m = config.model
    tokenizer = None
    if m.tiny_tokenizer == "words":
        texts = set(_texts(examples)) | {config.trainer.warmup_target.format(answer=e.answer)
                                         for e in examples}
        tokenizer = build_word_tokenizer(sorted(texts))
    write_tiny_checkpoint(folder, dtype=torch.float32, seed=config.trainer.seed,
                          tokenizer=tokenizer, hf_config=sized_hf_config(
                              m.tiny_hidden_size, m.tiny_layers,
                              vision_hidden=m.tiny_vision_hidden_size,
                              initializer_range=m.tiny_initializer_range,
                              tied=m.tiny_tied_embeddings))
    return folder


def target_rollout(encoder, messages, index: int, target: str):
    """Prompt ``index`` with one given response (``target`` + <|im_end|>), as if the engine had
    sampled it: supervised steps run through the RL update (:func:`supervised_updater`)."""
    tokenizer = encoder.tokenizer
    ids = tokenizer(target, add_special_tokens=False)["input_ids"] + [
        tokenizer.convert_tokens_to_ids("<|im_end|>")]
    encoded = encoder.encode_one(messages, index)
    return PromptRollout(index, encoded.input_ids.tolist(),
                         [Response(ids, [0.0] * len(ids), "stop")], encoded=encoded)


def supervised_updater(chunks: list, optimizer, micro_batch_size: int, mini_batch_size: int,
                       suppressed_token_ids=(), packing: bool = False, pad_multiple: int = 1,
                       max_tokens_per_micro_batch: int = 0):
    """The policy-gradient update that, with advantage 1 and the old log-probs of the current
    weights, is exactly supervised learning of the responses (ratio 1, no clipping, no KL)."""
    # the policy term alone (no KL, perception or entropy term), no dual clip
    supervised = LossConfig(dual_clip=None, kl_beta=0.0, prcp_gamma=0.0,
                            entropy_eta_original=0.0, entropy_eta_masked=0.0)
    return PolicyUpdater(chunks, optimizer, UpdateConfig(
        micro_batch_size=micro_batch_size, mini_batch_size=mini_batch_size,
        loss=supervised, distribution=SampledDistribution(1.0, tuple(suppressed_token_ids)),
        packing=packing, pad_multiple=pad_multiple,
        max_tokens_per_micro_batch=max_tokens_per_micro_batch))


def build_optimizer(chunks: list, o, dtype: torch.dtype):
    """megatron-core's distributed Adam over ``chunks`` (``o``: the run's OptimConfig), the
    vision tower in its own parameter group at ``o.lr x o.vision_lr_mult``."""
    config = OptimizerConfig(
        optimizer="adam", lr=o.lr, weight_decay=o.weight_decay, clip_grad=o.clip_grad,
        adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2, use_distributed_optimizer=True,
        params_dtype=dtype, bf16=dtype == torch.bfloat16)
    overrides = None  # megatron-core's standard groups (no weight decay on biases and norms)
    if o.vision_lr_mult != 1:
        overrides = get_standard_config_overrides(config)
        overrides[ParamKey(name="*vision_model.*")] = {"max_lr": o.lr * o.vision_lr_mult}
    optimizer = get_megatron_optimizer(config, chunks, overrides)
    for group in optimizer.param_groups:  # no lr scheduler: each group runs at its max_lr
        group["lr"] = group["max_lr"]
    return optimizer


def _by_group(result: dict, prefix: str) -> str:
    """" (right 0.950, wrong 0.400)": the accuracy per data.group_key value, if any."""
    marker = prefix + "accuracy@"
    parts = [f"{k[len(marker):]} {v:.3f}" for k, v in sorted(result.items())
             if k.startswith(marker)]
    return f" ({', '.join(parts)})" if parts else ""


def _jsonable(value):
    return [_jsonable(v) for v in value] if isinstance(value, (tuple, list)) else value


def _tupled(value):
    return tuple(_tupled(v) for v in value) if isinstance(value, list) else value


@dataclasses.dataclass
class _Group:
    """One prompt's responses of a step, scored."""

    example: object
    rollout: object
    scored: list
    rewards: torch.Tensor
    position: int = -1  # the example's row in the training data

    @property
    def has_signal(self) -> bool:  # rewards not all equal: a non-zero advantage
        return bool((self.rewards != self.rewards[0]).any()) if self.rewards.numel() > 1 else False


class _StopSignals:
    """SIGTERM / SIGUSR1 (what SLURM sends before preemption or the time limit) only set a flag;
    the ranks agree on it after each step, save a checkpoint and stop together."""

    SIGNALS = ("SIGTERM", "SIGUSR1")

    def __init__(self):
        self.received = 0
        self.previous = {}
        for name in self.SIGNALS:
            number = getattr(signal, name)
            self.previous[number] = signal.signal(number, self._handle)

    def _handle(self, number, frame):
        self.received = number

    def agreed(self) -> int:
        flag = torch.tensor([self.received], dtype=torch.long)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag)

    def restore(self) -> None:
        for number, handler in self.previous.items():
            signal.signal(number, handler)


class Trainer:
    def __init__(self, config: TrainConfig):
        self.config = c = config
        self.out = c.trainer.output_dir
        export = os.path.join(self.out, EXPORT_DIR)
        if c.trainer.export_hf and overlapping_input(export, [c.model.hf_dir]):
            raise ConfigError(f"the HF export {export} (trainer.output_dir/{EXPORT_DIR}) overlaps "
                              f"model.hf_dir={c.model.hf_dir}: it would replace the model it "
                              "starts from; choose another trainer.output_dir")
        self.checkpoint_dir = c.trainer.checkpoint_dir or os.path.join(self.out, "checkpoints")
        # one job per folder: the locks first, before anything is written
        self.locks = self._locks()
        acquire_on_rank0(self.locks, c.trainer.force_unlock, log=_log)
        try:
            self._build()
        except BaseException:
            release_all(self.locks)
            raise

    def _locks(self) -> list:
        hint = "set trainer.force_unlock=true"
        locks = [folder_lock(self.out, f"trainer.output_dir={self.out}", hint)]
        inside = os.path.commonpath([os.path.abspath(self.out),
                                     os.path.abspath(self.checkpoint_dir)])
        if inside != os.path.abspath(self.out):  # checkpoints elsewhere: locked too
            locks.append(folder_lock(self.checkpoint_dir,
                                     f"trainer.checkpoint_dir={self.checkpoint_dir}", hint))
        return locks

    def _build(self) -> None:
        """Data, model, optimizer, engine, updater: each from its own builder, in this order
        (a bad data file or column stops the run before any other work)."""
        c = self.config
        if c.trainer.resume not in ("auto", "none", ""):
            reason = why_incomplete(c.trainer.resume)
            if reason:
                raise ConfigError(f"trainer.resume={c.trainer.resume} cannot be resumed from: "
                                  f"{reason}")
        if dist.get_rank() == 0:
            os.makedirs(self.out, exist_ok=True)
        dist.barrier()
        self.train_data, self.val_data = self._load_data()
        self.max_images = self._images_per_prompt()
        self.hf_dir = self._initial_hf_folder()
        p = c.parallel
        initialize_model_parallel(p.tensor_model_parallel_size, p.pipeline_model_parallel_size,
                                  seed=c.trainer.seed,
                                  timeout_minutes=c.trainer.collective_timeout_minutes)
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_size = parallel_state.get_data_parallel_world_size()
        self.spec = text_spec_from_hf(load_hf_config(self.hf_dir))
        self.loss = c.algorithm.loss
        self.ledger = ledger = MemoryLedger()  # what each builder below adds, measured
        self.chunks = self._policy_chunks(trained=True)
        ledger.mark("policy")  # weights + gradient buffers
        self.optimizer = build_optimizer(self.chunks, c.optim, getattr(torch, c.model.params_dtype))
        ledger.mark("optimizer")
        # the reference model exists only when it is used
        self.reference = self._policy_chunks(trained=False) if self.loss.kl_beta > 0 else None
        ledger.mark("reference")
        self.engine = RolloutEngine(c.rollout.engine(self.hf_dir, seed=c.trainer.seed,
                                                     max_images_per_prompt=self.max_images))
        return_free_memory()  # (CPU) the engine's loading and profiling run
        ledger.mark("engine")
        self.updater = PolicyUpdater(self.chunks, self.optimizer, self._update_config())
        self.rng = random.Random(c.trainer.seed)
        self.metrics = Metrics(self.out, c.logging, dataclasses.asdict(c))
        self.metrics.ledger = ledger
        self.monitor = PerceptionHackingMonitor()
        self.step_index = 0
        self.warmed_up = False
        self.reached: float | None = None  # the held-out accuracy that met stop_at_accuracy

    def _load_data(self) -> tuple[list, list]:
        """(training rows, held-out rows): ``data.*`` files, or the embedded counting task
        written into the run folder."""
        c, d = self.config, self.config.data
        train_files, val_files = list(d.train_files), list(d.val_files)
        if not train_files:
            folder = os.path.join(self.out, SYNTHETIC_DIR)
            if dist.get_rank() == 0:
                write_counting_dataset(folder, d.synthetic_train, d.synthetic_val,
                                       seed=c.trainer.seed, hint=d.synthetic_hint)
            dist.barrier()
            paths = {s: os.path.join(folder, f"{s}.parquet") for s in ("train", "test")}
            train_files, val_files = [paths["train"]], val_files or [paths["test"]]
        train = load_split(train_files, d, log=_log)
        val = load_split(val_files, d, log=_log) if val_files else []
        if len(train) < c.trainer.prompts_per_step:
            raise ConfigError(f"trainer.prompts_per_step={c.trainer.prompts_per_step} exceeds "
                              f"the {len(train)} usable training rows")
        return train, val

    def _initial_hf_folder(self) -> str:
        """``model.hf_dir``, or the embedded tiny model written into the run folder once."""
        c = self.config
        folder = c.model.hf_dir or os.path.join(self.out, INITIAL_HF_DIR)
        if not c.model.hf_dir and dist.get_rank() == 0 and not os.path.exists(
                os.path.join(folder, "config.json")):
            tiny_hf_folder(folder, c, self.train_data + self.val_data)
        dist.barrier()
        return folder

    def _policy_chunks(self, trained: bool) -> list:
        """The model at the run's layout, loaded from the initial HF folder: the trained policy
        (DDP, distributed optimizer) or a frozen copy (the reference model)."""
        c, p = self.config, self.config.parallel
        language, vision = c.model.transformer_overrides()
        build = dict(tp=p.tensor_model_parallel_size, pp=p.pipeline_model_parallel_size,
                     sequence_parallel=p.sequence_parallel,
                     params_dtype=getattr(torch, c.model.params_dtype),
                     first_stage_layers=p.first_stage_layers,
                     last_stage_layers=p.last_stage_layers, layer_spec=c.model.layer_spec,
                     vision_overrides=vision, **language)
        if trained:
            build.update(use_distributed_optimizer=True, overlap_grad_reduce=p.overlap_grad_reduce,
                         overlap_param_gather=p.overlap_param_gather)
        else:
            build.update(ddp=False)
        chunks = build_model_chunks(self.spec, **build)
        ck.load_hf_folder(chunks, self.spec, self.hf_dir)
        return_free_memory()  # (CPU) the loaded files' tensors, copied into the model
        return chunks

    def _update_config(self) -> UpdateConfig:
        """The updater's settings: batch sizes for this DP size, the algorithm, the engine's
        sampling distribution, packing."""
        c, p = self.config, self.config.parallel
        local, mini, micro = c.batch_sizes(self.dp_size)
        # each DP rank's prompts: its part of every mini-batch, so that several optimizer steps
        # per rollout update on the same samples at any DP size (whole prompts per mini-batch)
        self._blocks = local // mini if mini % c.rollout.n == 0 else 1
        # sequence parallelism splits the sequence over TP; FP8 GEMMs need multiples of 16 tokens
        self._pad = math.lcm(p.tensor_model_parallel_size if p.sequence_parallel else 1,
                             16 if c.model.fp8 else 1)
        return UpdateConfig(
            micro_batch_size=micro, mini_batch_size=mini,
            masked_branch=c.algorithm.masked_branch, loss=self.loss,
            distribution=self.engine.distribution(c.rollout),
            packing=c.trainer.packing, pad_multiple=self._pad,
            share_prompts=c.trainer.packing and c.trainer.share_prompts,
            max_tokens_per_micro_batch=c.trainer.max_tokens_per_micro_batch)

    def _images_per_prompt(self) -> int:
        """rollout.max_images_per_prompt, or the most images any row has (said when > 1)."""
        key = "rollout.max_images_per_prompt"
        limit = self.config.rollout.max_images_per_prompt
        most = images_per_prompt(self.train_data + self.val_data, limit,
                                 f"{key}={limit}", "null: the most any row has")
        if limit is None and most > 1:
            _log(f"[train] up to {most} images per prompt ({key}: from the data)")
        return most

    # ------------------------------------------------------------------ one step
    def step(self) -> dict:
        c, m = self.config, self.metrics
        m.phases, m.memory = {}, {}
        m.step = self.step_index + 1
        start = time.perf_counter()
        if c.algorithm.dynamic_sampling:
            # every rank selects from every rank's groups (the same selection at any DP size),
            # then trains its own places of the first draw
            first_round, train_groups, everything, sampling_stats = self._fill_with_signal()
        else:
            first_round = self._draw_groups(0)
            train_groups, everything, sampling_stats = first_round, first_round, {}
        # the trained groups take the first draw's places in the global prompt list (their
        # index seeds the image masks: the same for any DP layout)
        prompts = [None] * c.trainer.prompts_per_step
        rollouts = []
        for slot, group in zip(first_round, train_groups):
            prompts[slot.rollout.index] = group.example.messages
            rollouts.append(dataclasses.replace(group.rollout, index=slot.rollout.index))
        rewards = torch.cat([g.rewards for g in train_groups])
        groups = torch.tensor([r.index for r in rollouts for _ in r.responses])
        a = c.algorithm
        needs_masked = self.loss.needs_masked_branch
        frozen = needs_masked and a.masked_branch == "frozen"
        scored_by_engine = frozen and a.masked_logprobs == "engine"
        mask_seed = self.step_index * 100_003
        with m.phase("batch"):  # advantages, the trainer's tensors, the masked images
            advantages = group_advantages(rewards, groups)
            batch = build_rollout_batch(   # (the engine masks its own copies when it scores)
                prompts, rollouts, self.engine.encoder, pad_multiple=self._pad,
                mask_ratio=a.mask_ratio if needs_masked and not scored_by_engine else None,
                mask_patch=a.mask_patch, mask_seed=mask_seed, advantages=advantages)
            batch = batch.to(model_device())  # built on the host; the trainer reads it on the GPU
        with m.phase("logprobs"):
            batch.old_logp = (batch.rollout_logp if c.rollout.old_logprobs_from_engine
                              else self.updater.compute_logprobs(batch))
            if self.reference is not None:
                batch.ref_logp = self.updater.compute_logprobs(batch, model_chunks=self.reference)
            if frozen and not scored_by_engine:
                batch.masked_logp = self.updater.compute_logprobs(batch, masked=True)
        if scored_by_engine:
            with m.phase("masked_scoring"):  # the rollout-time weights are still the engine's
                batch.masked_logp = self._engine_masked_logprobs(
                    first_round, train_groups, rollouts, batch, mask_seed
                ).to(batch.input_ids.device)
        with m.phase("update"):
            updates = self.updater.update(batch)
            return_free_memory()  # (CPU) the activations' pages, before the push allocates
        with m.phase("sync"):
            self.push_weights()
            return_free_memory()  # (CPU) the push's whole tensors, before the next rollout
        record = step_record(self.step_index + 1, first_round, everything, batch, updates,
                             sampling_stats, m.phases, time.perf_counter() - start, self.dp_size)
        record.update({f"mem/{k}": v for k, v in m.memory.items()})
        if scored_by_engine and self.engine.score_stats["prompt_tokens"]:
            # this rank's share of the scored prompts' tokens read from the prefix cache
            stats = self.engine.score_stats
            record["masked_scoring/prompt_cached"] = (stats["prompt_tokens_cached"]
                                                      / stats["prompt_tokens"])
        watch(record, c.rollout, self.monitor)
        self.step_index += 1
        m.write(record)
        if self.step_index == MemoryLedger.STEPS:
            self._report_memory()
        stop_on_mismatch(record, c.rollout)
        return record

    def _report_memory(self) -> None:
        """After step 2 of a run that started at step 0: every rank's memory parts
        (:meth:`MemoryLedger.parts`) in ``<output_dir>/memory.json``, rank 0's in one line
        (``tools/rehearse.py --memory`` sets them beside the planner's)."""
        parts = self.ledger.parts()
        ranks = all_gather_objects(parts)
        if dist.get_rank() != 0 or parts is None:
            return
        measure = "GPU memory allocated by torch" if torch.cuda.is_available() else "resident set"
        with open(os.path.join(self.out, "memory.json"), "w") as f:
            json.dump({"unit": "GiB", "measure": measure, "layout": self._layout(),
                       "ranks": ranks}, f, indent=1)
        _log("[train] memory of rank 0 (GiB, " + measure + "): "
             + ", ".join(f"{k} {v:.2f}" for k, v in parts.items())
             + " (every rank's: memory.json)")

    def _engine_masked_logprobs(self, slots: list[_Group], groups: list[_Group], rollouts: list,
                                batch, mask_seed: int) -> torch.Tensor:
        """The frozen branch's masked log-probs [N, L] from the rollout engine: each sampled
        response scored after its prompt with the masked images (``rl.masking.masked_copies``,
        the masks the trainer would use), under the sampling distribution."""
        a = self.config.algorithm
        # the global prompt list (the engine scores any rank's prompts): slot -> training row
        places = [(slot.rollout.index, group.position) for slot, group in zip(slots, groups)]
        prompts = [None] * self.config.trainer.prompts_per_step
        for part in all_gather_objects(places):
            for index, position in part:
                prompts[index] = self.train_data[position].messages
        requests = [ScoreRequest(r.index, r.prompt_ids, [resp.token_ids for resp in r.responses])
                    for r in rollouts]
        scores = self.engine.score(
            prompts, requests, self.config.rollout.temperature,
            images=lambda index, images: masked_copies(images, index, a.mask_ratio,
                                                       a.mask_patch, mask_seed))
        result = torch.zeros(batch.input_ids.shape, dtype=torch.float32)
        row = 0
        for r, per_prompt in zip(rollouts, scores):
            start = len(r.prompt_ids)
            for values in per_prompt:
                result[row, start:start + len(values)] = torch.tensor(values)
                row += 1
        return result

    def _draw_groups(self, round_index: int, prompts: int | None = None,
                     every_rank: bool = False) -> list[_Group]:
        """Draw ``prompts`` prompts (``trainer.prompts_per_step`` unless given), roll out this
        DP rank's share and score them: one :class:`_Group` per prompt (its responses, their
        scores and rewards, the overlong penalty included). ``every_rank``: the groups of every
        DP rank (each rank scores its share, the scores are exchanged)."""
        c, m = self.config, self.metrics
        # rows by position (the same draw as sampling the rows themselves)
        positions = self.rng.sample(range(len(self.train_data)),
                                    prompts or c.trainer.prompts_per_step)
        examples = [self.train_data[j] for j in positions]
        prompts = [e.messages for e in examples]
        sampling = c.rollout.sampling(
            seed=c.trainer.seed * 1_000_003 + self.step_index + round_index * 7_919)
        with m.phase("rollout"):
            rollouts = self.engine.generate(      # this DP rank's prompts (or all of them)
                prompts, sampling, progress=c.logging.progress_bars
                and is_long_rollout(len(prompts), sampling), blocks=self._blocks,
                **({"dp_rank": 0, "dp_size": 1} if every_rank else {}))
        with m.phase("reward"):
            mine = (split_evenly(len(rollouts), self.dp_size, self.dp_rank) if every_rank
                    else range(len(rollouts)))
            scores = self._score([rollouts[i] for i in mine], examples)
            if every_rank:
                scores = {i: v for part in all_gather_objects(scores) for i, v in part.items()}
        groups = []
        for r in rollouts:
            scored, rewards = scores[r.index]
            groups.append(_Group(examples[r.index], r, scored, rewards, positions[r.index]))
        return groups

    def _score(self, rollouts: list, examples: list) -> dict:
        """prompt index -> (each response's score, its reward with the overlong penalty)."""
        c = self.config
        texts = [resp.text for r in rollouts for resp in r.responses]
        answers = [examples[r.index].answer for r in rollouts for _ in r.responses]
        names = [f"prompt {r.index} ({examples[r.index].source}), sample {k}"
                 for r in rollouts for k in range(len(r.responses))]
        scored = score_all(texts, answers, names=names)
        buffer = round(c.algorithm.overlong_buffer_ratio * c.rollout.max_new_tokens)
        lengths = torch.tensor([len(resp.token_ids) for r in rollouts for resp in r.responses],
                               dtype=torch.long)
        rewards = torch.tensor([s.reward for s in scored], dtype=torch.float32) + overlong_penalty(
            lengths, c.rollout.max_new_tokens, buffer, c.algorithm.overlong_penalty_factor)
        out, at = {}, 0
        for r in rollouts:
            n = len(r.responses)
            out[r.index] = (scored[at:at + n], rewards[at:at + n])
            at += n
        return out

    def _fill_with_signal(self) -> tuple[list[_Group], list[_Group], list[_Group], dict]:
        """DAPO's dynamic sampling: keep only groups whose rewards differ and draw more prompts
        until the batch is full (``algorithm.max_sampling_rounds`` draws at most, a later one
        only as large as the shortfall needs at the share with signal seen so far:
        :func:`redraw_prompts`; short of that, groups without signal fill the rest and
        ``sampling/filled_without_signal`` counts them). The selection is made over every DP
        rank's groups, in draw order, so it is the same at any DP size; the k-th kept group
        takes the k-th place of the first draw. Returns (this rank's places of the first draw,
        the groups it trains on them, every group drawn, metrics)."""
        c = self.config
        per_step = c.trainer.prompts_per_step
        sizes = [per_step]

        def draw(round_index: int, short: int, share: float) -> list[_Group]:
            sizes.append(redraw_prompts(short, share, per_step))
            return self._draw_groups(round_index, sizes[-1], every_rank=True)

        first = self._draw_groups(0, every_rank=True)
        kept, drawn, rounds, filled = fill_with_signal(
            first, draw, lambda g: g.has_signal, c.algorithm.max_sampling_rounds)
        stats = {"sampling/rounds": float(rounds),
                 "sampling/prompts_drawn": float(sum(sizes)),
                 "sampling/filled_without_signal": float(filled),
                 "sampling/trained_groups_with_signal":
                     sum(g.has_signal for g in kept) / len(kept)}
        places = data_parallel_share(per_step, self.dp_size, self.dp_rank, self._blocks)
        return [first[i] for i in places], [kept[i] for i in places], drawn, stats

    def _logged(self) -> list[dict]:
        if not os.path.exists(self.metrics.path):
            return []
        with open(self.metrics.path) as f:
            return [json.loads(line) for line in f if line.strip()]

    def _sync_params(self) -> None:
        """Weights read after an optimizer step are complete (parallel.overlap_param_gather)."""
        sync_params(self.chunks)

    def push_weights(self) -> None:
        """The updated weights into the rollout engine (in buckets, every rank)."""
        r = self.config.rollout
        self._sync_params()
        self.engine.load_weights(iter_hf_weights(self.chunks, self.spec, getattr(torch, r.dtype),
                                                 r.weight_bucket_mb * 2**20))

    # ------------------------------------------------------------------ format warm start
    def warm_start(self) -> None:
        """``trainer.warmup_steps`` supervised steps on ``trainer.warmup_target`` responses with
        random answers: the policy-gradient update with advantage 1 and the old log-probs of the
        current weights is exactly supervised learning of the target (ratio 1, no clipping)."""
        heartbeat("format warm start")

        c = self.config
        encoder = self.engine.encoder
        local = c.trainer.prompts_per_step // self.dp_size
        sft = supervised_updater(self.chunks, self.optimizer,
                                 math.gcd(self.updater.config.micro_batch_size, local), local,
                                 self.engine.suppressed_token_ids, c.trainer.packing, self._pad,
                                 c.trainer.max_tokens_per_micro_batch)
        answers = sorted({e.answer for e in self.train_data})
        for step in range(c.trainer.warmup_steps):
            examples = self.rng.sample(self.train_data, c.trainer.prompts_per_step)
            prompts = [e.messages for e in examples]
            # drawn for the whole batch on every rank: the ranks' generators stay in step
            labels = [self.rng.choice(answers) for _ in prompts]
            rollouts = [target_rollout(encoder, prompts[i], i,
                                       c.trainer.warmup_target.format(answer=labels[i]))
                        for i in split_evenly(len(prompts), self.dp_size, self.dp_rank)]
            batch = build_rollout_batch(prompts, rollouts, encoder, pad_multiple=self._pad,
                                        advantages=torch.ones(len(rollouts)))
            (metrics,) = sft.update(batch)  # one mini-batch, on-policy: plain supervised steps
            if (step + 1) % 10 == 0 or step + 1 == c.trainer.warmup_steps:
                _log(f"[train] format warm start {step + 1}/{c.trainer.warmup_steps}: "
                     f"response log-prob {-metrics['entropy/original']:.3f}")
        self.push_weights()
        self.warmed_up = True
        if self.reference is not None:
            self._sync_params()
            ck.write_hf_folder(self.chunks, self.spec, self._warm_start_folder(), self.hf_dir,
                               getattr(torch, c.model.params_dtype), force=True)
            self._load_reference()

    def _warm_start_folder(self) -> str:
        return os.path.join(self.out, WARM_START_DIR)

    def _load_reference(self) -> None:
        """The reference KL's model is the policy RL starts from: after a format warm start the
        warm-started weights (written to ``<output_dir>/warm_start_hf`` once, read again on
        resume), not the initial ones it was built from (the tiny model's are random)."""
        folder = self._warm_start_folder()
        if not os.path.exists(os.path.join(folder, "config.json")):
            raise ConfigError(f"the reference model (algorithm.loss.kl_beta > 0) is the "
                              f"warm-started policy, saved in {folder}, which is missing: resume "
                              "with the run's own trainer.output_dir, or start over "
                              "(trainer.resume=none)")
        ck.load_hf_folder(self.reference, self.spec, folder)
        return_free_memory()
        _log(f"[train] reference model (algorithm.loss.kl_beta="
             f"{self.loss.kl_beta}): the warm-started policy, {folder}")

    # ------------------------------------------------------------------ checkpoints
    def _layout(self) -> dict:
        p = self.config.parallel
        layout = {"tp": p.tensor_model_parallel_size, "pp": p.pipeline_model_parallel_size,
                  "dp": self.dp_size}
        if p.first_stage_layers is not None or p.last_stage_layers is not None:
            layout["stage_layers"] = [p.first_stage_layers, p.last_stage_layers]
        return layout

    def save(self) -> str:
        """A training checkpoint of the current step (every rank)."""
        heartbeat("checkpoint save", self.step_index)
        self._sync_params()
        return_free_memory()  # (CPU) what the push freed, before the state dict's copies
        state = {"step": self.step_index, "warmed_up": self.warmed_up,
                 "sampler": _jsonable(self.rng.getstate()), "monitor": self.monitor.history,
                 "reached": self.reached}
        start = time.perf_counter()
        path = checkpoint.save(self.checkpoint_dir, self.step_index, self.chunks, self.optimizer,
                               state, dataclasses.asdict(self.config), self.hf_dir,
                               self.config.model.params_dtype, self._layout(),
                               self.config.trainer.keep_last,
                               self.config.trainer.checkpoint_format)
        _log(f"[train] checkpoint saved: {path} ({time.perf_counter() - start:.1f}s)")
        return path

    def resume(self) -> bool:
        """Continue from ``trainer.resume`` (auto: the newest complete checkpoint, if any)."""
        choice = self.config.trainer.resume
        if choice in ("none", "") or not self.config.trainer.save_every and choice == "auto":
            return False
        if choice == "auto":
            path = find_resumable(self.checkpoint_dir, log=_log)
            if path is None:
                return False
        else:
            path = choice  # checked before any work (_build)
        state = checkpoint.load(path, self.chunks, self.optimizer, self._layout(), log=_log)
        self.step_index = int(state["step"])
        self.warmed_up = bool(state["warmed_up"])
        self.rng.setstate(_tupled(state["sampler"]))
        self.monitor.history = list(state["monitor"])
        self.reached = state.get("reached")
        if self.reference is not None and self.warmed_up:
            self._load_reference()
        self.push_weights()
        if self.metrics.jsonl and os.path.exists(self.metrics.path):  # drop what came after
            kept = [r for r in self._logged() if r.get("step", 0) <= self.step_index]
            with open(self.metrics.path, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in kept)
        _log(f"[train] resumed from {path} at step {self.step_index}")
        return True

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, images_swapped: bool = False) -> dict:
        """avg@k accuracy and format rate on the held-out prompts (temperature of the run);
        ``images_swapped``: every prompt shown another prompt's image (vision dependence)."""
        heartbeat("evaluation" + (" (images swapped)" if images_swapped else ""))
        c = self.config
        start = time.perf_counter()
        result = avg_at_k(self.engine, self.val_data[:c.trainer.eval_prompts],
                          c.rollout.sampling(seed=EVAL_SEED, n=c.trainer.eval_k),
                          images_swapped=images_swapped, progress=c.logging.progress_bars)
        result["seconds"] = time.perf_counter() - start
        result["elapsed"] = process_seconds()   # the evaluation's end, since the command started
        prefix = "val_swapped/" if images_swapped else "val/"
        return {prefix + k: v for k, v in result.items() if k != "samples"}

    def _target_reached(self) -> bool:
        target = self.config.trainer.stop_at_accuracy
        return target is not None and self.reached is not None and self.reached >= target

    # ------------------------------------------------------------------ the run
    def run(self) -> dict:
        c = self.config
        before = {}
        if self.resume():  # the held-out accuracy RL started from, from the resumed run's log
            initial = [r for r in self._logged() if r.get("step") == 0 and "val/accuracy" in r]
            before = next((r for r in initial if r.get("after_warm_start")),
                          initial[0] if initial else {})
        else:
            self.metrics.start_over()
            # the initial weights' evaluation: RL's starting point unless a warm start follows
            # (then only when asked: the tiny model's random weights score 0.000, and it took
            # 3.9-10.8 s of 256 prompts x 8 on the 2-core machine)
            if not c.trainer.warmup_steps or c.trainer.eval_before_warm_start:
                before = self.evaluate()
                _log(f"[train] held-out before training: accuracy "
                     f"{before.get('val/accuracy', 0):.3f} (avg@{c.trainer.eval_k}), format "
                     f"{before.get('val/format', 0):.3f}")
                self.metrics.write({"step": 0, **before})
        if c.trainer.warmup_steps and not self.warmed_up:
            self.warm_start()
            warmed = before = self.evaluate()
            self.metrics.write({"step": 0, "after_warm_start": True, **warmed})
            _log(f"[train] held-out after the format warm start: accuracy "
                 f"{warmed.get('val/accuracy', 0):.3f}, format {warmed.get('val/format', 0):.3f}"
                 " (random labels: accuracy stays near chance; the reward is often flat for a "
                 "while before it rises, watch 'signal', the share of groups with differing "
                 "rewards)")
        _log("[train] per step: reward, accuracy, format rate, signal = share of groups whose "
             "rewards differ (0: no gradient), perception KL, entropy original/masked image, clip "
             "fraction high/low, seconds per phase")
        last, after = {}, None
        stop = _StopSignals()
        for _ in range(self.step_index, c.trainer.steps):
            if self._target_reached():  # a resumed run that had already reached it
                break
            record = self.step()
            s = record
            _log(f"[train] step {s['step']}/{c.trainer.steps} reward {s['reward']:.3f} acc "
                 f"{s['accuracy']:.3f} fmt {s['format']:.3f} signal {s['groups_with_signal']:.2f}"
                 f" kl_prcp {s.get('loss/kl_prcp', 0):.3g} ent {s.get('entropy/original', 0):.3f}"
                 f"/{s.get('entropy/masked', 0):.3f} clip {s.get('clip/high', 0):.3f}/"
                 f"{s.get('clip/low', 0):.3f} | {s['tokens_per_s']:.0f} tok/s | "
                 + (f"{s['sampling/prompts_drawn']:.0f} prompts drawn | "
                    if "sampling/prompts_drawn" in s else "")
                 + " ".join(f"{k[5:]} {v:.2f}s" for k, v in s.items()
                            if k.startswith("time/")))
            if c.trainer.eval_every and s["step"] % c.trainer.eval_every == 0 \
                    and s["step"] < c.trainer.steps:
                evaluation = self.evaluate()
                self.metrics.write({"step": s["step"], **evaluation})
                _log(f"[train] held-out at step {s['step']}: accuracy "
                     f"{evaluation.get('val/accuracy', 0):.3f}{_by_group(evaluation, 'val/')} "
                     f"({evaluation['val/seconds']:.1f}s; {evaluation['val/elapsed']:.0f}s since "
                     "the command started)")
                if c.trainer.stop_at_accuracy is not None:
                    self.reached = evaluation["val/accuracy"]
                    if self._target_reached():
                        after = evaluation  # the final evaluation: these weights, just measured
                        _log(f"[train] held-out accuracy {self.reached:.3f} >= "
                             f"trainer.stop_at_accuracy={c.trainer.stop_at_accuracy} at step "
                             f"{s['step']}: training ends here")
            last = s
            heartbeat("end of step", s["step"])
            signal_number = stop.agreed()
            if signal_number or (c.trainer.save_every and s["step"] % c.trainer.save_every == 0
                                 and s["step"] < c.trainer.steps and after is None):
                self.save()
            if signal_number:
                _log(f"[train] signal {signal_number}: checkpoint of step {s['step']} saved; "
                     "stopping (resume with the same command: trainer.resume=auto)")
                stop.restore()
                return {"interrupted": signal_number, "last": last}
            if after is not None:
                break
        stop.restore()
        if c.trainer.save_every:
            self.save()
        if after is None:
            after = self.evaluate()
        swapped = self.evaluate(images_swapped=True)
        self.metrics.write({"step": self.step_index, **after, **swapped})
        _log(f"[train] held-out after training: accuracy {after.get('val/accuracy', 0):.3f}"
             f"{_by_group(after, 'val/')} (RL started from {before.get('val/accuracy', 0):.3f}, "
             f"avg@{c.trainer.eval_k}), format {after.get('val/format', 0):.3f}; with the images "
             f"swapped between prompts: accuracy {swapped.get('val_swapped/accuracy', 0):.3f}"
             f"{_by_group(swapped, 'val_swapped/')} (a model that looks at the "
             "image drops towards chance)")
        if c.trainer.export_hf:
            self.export_hf(os.path.join(self.out, EXPORT_DIR))
        return {"before": before, "after": {**after, **swapped}, "last": last, "interrupted": 0}

    def export_hf(self, folder: str) -> None:
        heartbeat("HF export")
        self._sync_params()
        ck.write_hf_folder(self.chunks, self.spec, folder, self.hf_dir,
                           getattr(torch, self.config.model.params_dtype), force=True)
        _log(f"[train] HF export of the trained model: {folder}")

    def close(self) -> None:
        self.metrics.close()
        self.engine.close()
        release_all(self.locks)

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
import time
from contextlib import contextmanager

import torch
import torch.distributed as dist

from megatron_papo.parallel import heartbeat
from megatron_papo.runlock import acquire_on_rank0, folder_lock, release_all

from .config import ConfigError, TrainConfig

SYNTHETIC_DIR = "data"
INITIAL_HF_DIR = "initial_hf"
EXPORT_DIR = "hf"
MISMATCH_WARN = 1e-3  # mean |log p| per token, engine vs trainer (fp32: ~1e-6)


class EngineMismatchError(RuntimeError):
    """The rollout engine's log-probs left the trainer's: it samples from other weights."""


def _log(message: str) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(message, flush=True)


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
    from megatron_papo.models.qwen2_5_vl.tiny import (build_word_tokenizer, sized_hf_config,
                                            write_tiny_checkpoint)

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
    from megatron_papo.rollout import PromptRollout, Response

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
    from megatron_papo.rl.algorithms import LossConfig
    from megatron_papo.rl.logprobs import SampledDistribution
    from megatron_papo.rl.step import PolicyUpdater, UpdateConfig

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
    from megatron.core.optimizer import (
        OptimizerConfig,
        ParamKey,
        get_megatron_optimizer,
        get_standard_config_overrides,
    )

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


class Metrics:
    """Per-step metrics on rank 0: JSONL always, TensorBoard when installed, W&B when
    configured; plus the per-phase timer."""

    def __init__(self, folder: str, config, run_config: dict | None = None):
        self.path = os.path.join(folder, "metrics.jsonl")
        self.rank0 = not dist.is_initialized() or dist.get_rank() == 0
        self.jsonl = config.jsonl and self.rank0
        self.phases: dict[str, float] = {}
        self.step: int | None = None  # the step being run (for heartbeats)
        self.tensorboard = self.wandb = None
        if not self.rank0:
            return
        if config.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tensorboard = SummaryWriter(os.path.join(folder, "tensorboard"))
            except ImportError:
                _log("[train] TensorBoard is not installed (pip install tensorboard): metrics go "
                     f"to {self.path} only")
        if config.wandb_project:
            import wandb

            self.wandb = wandb.init(project=config.wandb_project, name=config.wandb_run_name,
                                    dir=folder, config=run_config)

    @contextmanager
    def phase(self, name: str):
        heartbeat(name, self.step)  # what this rank is doing, should a peer wait for it in vain
        start = time.perf_counter()
        yield
        self.phases[name] = self.phases.get(name, 0.0) + time.perf_counter() - start

    def start_over(self) -> None:
        """A run that starts from step 0 in a folder with a log (a run killed before its first
        checkpoint, or resume=none): the old log is kept beside, the new one starts empty."""
        if self.jsonl and os.path.exists(self.path) and os.path.getsize(self.path):
            kept = f"{self.path[:-len('.jsonl')]}.previous-{time.strftime('%Y%m%d-%H%M%S')}.jsonl"
            os.replace(self.path, kept)
            _log(f"[train] starting from step 0: the earlier log of this folder is kept as {kept}")

    def write(self, record: dict) -> None:
        if self.jsonl:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        numbers = {k: v for k, v in record.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}
        if self.tensorboard is not None:
            for key, value in numbers.items():
                self.tensorboard.add_scalar(key, value, record.get("step", 0))
            self.tensorboard.flush()
        if self.wandb is not None:
            self.wandb.log(numbers, step=record.get("step", 0))

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


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
        import signal

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
        import signal

        for number, handler in self.previous.items():
            signal.signal(number, handler)


class Trainer:
    def __init__(self, config: TrainConfig):
        from megatron_papo.conversion.atomic import overlapping_input

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
        from megatron.core import parallel_state

        from megatron_papo.conversion import checkpoint as ck
        from megatron_papo.data import load_split, write_counting_dataset
        from megatron_papo.models.qwen2_5_vl import load_hf_config, text_spec_from_hf
        from megatron_papo.models.qwen2_5_vl.provider import build_model_chunks
        from megatron_papo.parallel import initialize_model_parallel
        from megatron_papo.rl.step import PerceptionHackingMonitor, PolicyUpdater, UpdateConfig
        from megatron_papo.rollout import RolloutEngine

        c = self.config
        rank = dist.get_rank()
        if rank == 0:
            os.makedirs(self.out, exist_ok=True)
        dist.barrier()
        # --- data first: a bad file or column stops the run before any other work
        d = c.data
        train_files, val_files = list(d.train_files), list(d.val_files)
        if not train_files:
            folder = os.path.join(self.out, SYNTHETIC_DIR)
            if rank == 0:
                write_counting_dataset(folder, d.synthetic_train, d.synthetic_val,
                                       seed=c.trainer.seed)
            dist.barrier()
            paths = {s: os.path.join(folder, f"{s}.parquet") for s in ("train", "test")}
            train_files, val_files = [paths["train"]], val_files or [paths["test"]]
        self.train_data = load_split(train_files, d, log=_log)
        self.val_data = load_split(val_files, d, log=_log) if val_files else []
        if len(self.train_data) < c.trainer.prompts_per_step:
            raise ConfigError(f"trainer.prompts_per_step={c.trainer.prompts_per_step} exceeds "
                              f"the {len(self.train_data)} usable training rows")
        self.max_images = self._images_per_prompt()
        # --- the model: an HF folder (or the embedded tiny one) -> Megatron chunks
        self.hf_dir = c.model.hf_dir or os.path.join(self.out, INITIAL_HF_DIR)
        if not c.model.hf_dir and rank == 0 and not os.path.exists(
                os.path.join(self.hf_dir, "config.json")):
            tiny_hf_folder(self.hf_dir, c, self.train_data + self.val_data)
        dist.barrier()
        p = c.parallel
        initialize_model_parallel(p.tensor_model_parallel_size, p.pipeline_model_parallel_size,
                                  seed=c.trainer.seed,
                                  timeout_minutes=c.trainer.collective_timeout_minutes)
        self.spec = text_spec_from_hf(load_hf_config(self.hf_dir))
        dtype = getattr(torch, c.model.params_dtype)
        language, vision = c.model.transformer_overrides()
        build = dict(tp=p.tensor_model_parallel_size, pp=p.pipeline_model_parallel_size,
                     sequence_parallel=p.sequence_parallel, params_dtype=dtype,
                     first_stage_layers=p.first_stage_layers,
                     last_stage_layers=p.last_stage_layers, layer_spec=c.model.layer_spec,
                     vision_overrides=vision, **language)
        self.chunks = build_model_chunks(self.spec, **build, use_distributed_optimizer=True,
                                         overlap_grad_reduce=p.overlap_grad_reduce,
                                         overlap_param_gather=p.overlap_param_gather)
        ck.load_hf_folder(self.chunks, self.spec, self.hf_dir)
        self.optimizer = build_optimizer(self.chunks, c.optim, dtype)
        self.loss = c.algorithm.loss
        self.reference = None
        if self.loss.kl_beta > 0:  # the reference model exists only when it is used
            self.reference = build_model_chunks(self.spec, **build, ddp=False)
            ck.load_hf_folder(self.reference, self.spec, self.hf_dir)
        # --- the rollout engine, colocated
        r = c.rollout
        self.engine = RolloutEngine(r.engine(self.hf_dir, seed=c.trainer.seed,
                                             max_images_per_prompt=self.max_images))
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_size = parallel_state.get_data_parallel_world_size()
        local, mini, micro = c.batch_sizes(self.dp_size)
        # each DP rank's prompts: its part of every mini-batch, so that several optimizer steps
        # per rollout update on the same samples at any DP size (whole prompts per mini-batch)
        self._blocks = local // mini if mini % r.n == 0 else 1
        # sequence parallelism splits the sequence over TP; FP8 GEMMs need multiples of 16 tokens
        self._pad = math.lcm(p.tensor_model_parallel_size if p.sequence_parallel else 1,
                             16 if c.model.fp8 else 1)
        self.updater = PolicyUpdater(self.chunks, self.optimizer, UpdateConfig(
            micro_batch_size=micro, mini_batch_size=mini,
            masked_branch=c.algorithm.masked_branch, loss=self.loss,
            distribution=self.engine.distribution(r),
            packing=c.trainer.packing, pad_multiple=self._pad,
            max_tokens_per_micro_batch=c.trainer.max_tokens_per_micro_batch))
        self.rng = random.Random(c.trainer.seed)
        self.metrics = Metrics(self.out, c.logging, dataclasses.asdict(c))
        self.monitor = PerceptionHackingMonitor()
        self.step_index = 0
        self.warmed_up = False
        self.reached: float | None = None  # the held-out accuracy that met stop_at_accuracy

    def _images_per_prompt(self) -> int:
        """rollout.max_images_per_prompt, or the most images any row has (said when > 1)."""
        from megatron_papo.data import images_per_prompt

        key = "rollout.max_images_per_prompt"
        limit = self.config.rollout.max_images_per_prompt
        most = images_per_prompt(self.train_data + self.val_data, limit,
                                 f"{key}={limit}", "null: the most any row has")
        if limit is None and most > 1:
            _log(f"[train] up to {most} images per prompt ({key}: from the data)")
        return most

    # ------------------------------------------------------------------ one step
    def step(self) -> dict:
        from megatron_papo.rl.algorithms import group_advantages
        from megatron_papo.rl.step import mean_over_data_parallel
        from megatron_papo.rollout import build_rollout_batch

        c, m = self.config, self.metrics
        m.phases = {}
        m.step = self.step_index + 1
        start = time.perf_counter()
        first_round = self._draw_groups(0)
        train_groups, everything, sampling_stats = first_round, first_round, {}
        if c.algorithm.dynamic_sampling:
            train_groups, everything, sampling_stats = self._fill_with_signal(first_round)
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
        # what the policy did (every group drawn this step), not only what it trains on
        scored = [s for g in everything for s in g.scored]
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
                    first_round, train_groups, rollouts, batch, mask_seed)
        with m.phase("update"):
            updates = self.updater.update(batch)
        with m.phase("sync"):
            self.push_weights()
        mask = batch.response_mask.bool()
        local = {
            "reward": sum(float(g.rewards.sum()) for g in everything) / len(scored),
            "accuracy": sum(s.accuracy for s in scored) / len(scored),
            "format": sum(s.format for s in scored) / len(scored),
            # share of the first draw's groups whose rewards differ (before any filtering)
            "groups_with_signal": sum(g.has_signal for g in first_round) / len(first_round),
            "response_length": float(mask.sum(-1).float().mean()),
            "tokens": float(mask.sum()),
            **sampling_stats,
        }
        record = mean_over_data_parallel(local)
        # engine vs trainer on every step, measured in the update's first mini-batch (the
        # sampling weights still): no extra forward
        record["logprob_mismatch"] = mismatch = updates[0]["check/logprob_mismatch"]
        if (c.rollout.old_logprobs_from_engine   # (above the limit: EngineMismatchError below)
                and MISMATCH_WARN < mismatch <= c.rollout.logprob_mismatch_limit()):
            _log(f"[train] warning: engine vs trainer log-probs differ by {mismatch:.2e} per "
                 "token; the importance ratios are off: set rollout.old_logprobs_from_engine=false")
        record["tokens"] *= self.dp_size
        record.update({k: v for k, v in updates[-1].items()  # shared by every rank
                       if k.startswith(("loss/", "clip/", "entropy/")) or k == "grad_norm"})
        seconds = time.perf_counter() - start
        record.update({f"time/{k}": v for k, v in m.phases.items()})
        record.update(step=self.step_index + 1, seconds=seconds,
                      tokens_per_s=record["tokens"] / seconds)
        if self.monitor.check(record):  # the paper's KL_prcp-hacking symptoms, together
            record["alert/perception_hacking"] = 1.0
            _log(f"[train] ALERT step {record['step']}: perception-KL hacking suspected (KL_prcp "
                 "jumped while both entropies rose): lower the perception "
                 "weight (algorithm.loss.prcp_gamma=...) or turn on the double entropy loss "
                 "(algorithm.loss.entropy_eta_original=0.03 algorithm.loss."
                 "entropy_eta_masked=0.03)")
        self.step_index += 1
        m.write(record)
        self._check_mismatch(record)
        return record

    def _engine_masked_logprobs(self, slots: list[_Group], groups: list[_Group], rollouts: list,
                                batch, mask_seed: int) -> torch.Tensor:
        """The frozen branch's masked log-probs [N, L] from the rollout engine: each sampled
        response scored after its prompt with the masked images (``rl.masking.masked_copies``,
        the masks the trainer would use), under the sampling distribution."""
        from megatron_papo.parallel import all_gather_objects
        from megatron_papo.rl.masking import masked_copies
        from megatron_papo.rollout import ScoreRequest

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

    def _check_mismatch(self, record: dict) -> None:
        """Stop (one line) when the engine's log-probs left the trainer's: training on would
        sample from, and take old log-probs from, a policy that is not the trained one."""
        r = self.config.rollout
        limit = r.logprob_mismatch_limit()
        value = record.get("logprob_mismatch", 0.0)
        if limit and not value <= limit:  # NaN stops too
            raise EngineMismatchError(
                f"step {record['step']}: the rollout engine's log-probs differ from the trainer's "
                f"by {value:.3g} per response token (limit {limit:g} for a {r.dtype} engine, "
                "rollout.max_logprob_mismatch); the engine is not serving the trained weights. "
                "Likely causes: weights not pushed after the update, an output head tied to the "
                "embedding not refreshed by the engine, engine and trainer dtypes or processors "
                "that differ (rollout.dtype, model.params_dtype, rollout.min/max_pixels). The "
                "metrics up to this step are in metrics.jsonl; raise the limit or set it to 0 "
                "only if this level is expected")

    def _draw_groups(self, round_index: int) -> list[_Group]:
        """Draw ``trainer.prompts_per_step`` prompts, roll out this DP rank's share and score
        them: one :class:`_Group` per prompt (its responses, their scores and rewards, the
        overlong penalty included)."""
        from megatron_papo.reward import score_all
        from megatron_papo.rl.algorithms import overlong_penalty
        from megatron_papo.rollout.engine import is_long_rollout

        c, m = self.config, self.metrics
        # rows by position (the same draw as sampling the rows themselves)
        positions = self.rng.sample(range(len(self.train_data)), c.trainer.prompts_per_step)
        examples = [self.train_data[j] for j in positions]
        prompts = [e.messages for e in examples]
        sampling = c.rollout.sampling(
            seed=c.trainer.seed * 1_000_003 + self.step_index + round_index * 7_919)
        with m.phase("rollout"):
            rollouts = self.engine.generate(      # this DP rank's prompts
                prompts, sampling, progress=c.logging.progress_bars
                and is_long_rollout(len(prompts), sampling), blocks=self._blocks)
        with m.phase("reward"):
            texts = [resp.text for r in rollouts for resp in r.responses]
            answers = [examples[r.index].answer for r in rollouts for _ in r.responses]
            names = [f"prompt {r.index} ({examples[r.index].source}), sample {k}"
                     for r in rollouts for k in range(len(r.responses))]
            scored = score_all(texts, answers, names=names)
            buffer = round(c.algorithm.overlong_buffer_ratio * c.rollout.max_new_tokens)
            lengths = torch.tensor([len(resp.token_ids) for r in rollouts for resp in r.responses])
            rewards = torch.tensor([s.reward for s in scored]) + overlong_penalty(
                lengths, c.rollout.max_new_tokens, buffer, c.algorithm.overlong_penalty_factor)
        groups, at = [], 0
        for r in rollouts:
            n = len(r.responses)
            groups.append(_Group(examples[r.index], r, scored[at:at + n], rewards[at:at + n],
                                 positions[r.index]))
            at += n
        return groups

    def _fill_with_signal(self, first: list[_Group]
                          ) -> tuple[list[_Group], list[_Group], dict]:
        """DAPO's dynamic sampling: keep only groups whose rewards differ and draw more prompts
        until every DP rank holds as many as one draw gives it (``algorithm.max_sampling_rounds``
        draws at most; short of that, groups without signal fill the rest and
        ``sampling/filled_without_signal`` counts them). Returns (the groups to train on, every
        group drawn, metrics)."""
        from megatron_papo.rl.algorithms import fill_with_signal

        def short_anywhere(short: int) -> int:
            value = torch.tensor([short], dtype=torch.long)
            dist.all_reduce(value, op=dist.ReduceOp.MAX)
            return int(value)

        kept, drawn, rounds, filled = fill_with_signal(
            first, self._draw_groups, lambda g: g.has_signal,
            self.config.algorithm.max_sampling_rounds, short_anywhere)
        stats = {"sampling/rounds": float(rounds),
                 "sampling/prompts_drawn": float(rounds * self.config.trainer.prompts_per_step),
                 "sampling/filled_without_signal": float(filled),
                 "sampling/trained_groups_with_signal":
                     sum(g.has_signal for g in kept) / len(kept)}
        return kept, drawn, stats

    def _logged(self) -> list[dict]:
        if not os.path.exists(self.metrics.path):
            return []
        with open(self.metrics.path) as f:
            return [json.loads(line) for line in f if line.strip()]

    def _sync_params(self) -> None:
        """Weights read after an optimizer step are complete (parallel.overlap_param_gather)."""
        from megatron_papo.models.qwen2_5_vl.provider import sync_params

        sync_params(self.chunks)

    def push_weights(self) -> None:
        """The updated weights into the rollout engine (in buckets, every rank)."""
        from megatron_papo.rollout import iter_hf_weights

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
        from megatron_papo.rollout import build_rollout_batch
        from megatron_papo.rollout.engine import split_evenly

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
            batch.old_logp = sft.compute_logprobs(batch)
            (metrics,) = sft.update(batch)
            if (step + 1) % 10 == 0 or step + 1 == c.trainer.warmup_steps:
                _log(f"[train] format warm start {step + 1}/{c.trainer.warmup_steps}: "
                     f"response log-prob {-metrics['entropy/original']:.3f}")
        self.push_weights()
        self.warmed_up = True

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
        from . import checkpoint

        heartbeat("checkpoint save", self.step_index)
        self._sync_params()
        state = {"step": self.step_index, "warmed_up": self.warmed_up,
                 "sampler": _jsonable(self.rng.getstate()), "monitor": self.monitor.history,
                 "reached": self.reached}
        start = time.perf_counter()
        path = checkpoint.save(self.checkpoint_dir, self.step_index, self.chunks, self.optimizer,
                               state, dataclasses.asdict(self.config), self.hf_dir,
                               self.config.model.params_dtype, self._layout(),
                               self.config.trainer.keep_last)
        _log(f"[train] checkpoint saved: {path} ({time.perf_counter() - start:.1f}s)")
        return path

    def resume(self) -> bool:
        """Continue from ``trainer.resume`` (auto: the newest complete checkpoint, if any)."""
        from megatron_papo.conversion.locate import find_resumable, why_incomplete

        from . import checkpoint

        choice = self.config.trainer.resume
        if choice in ("none", "") or not self.config.trainer.save_every and choice == "auto":
            return False
        if choice == "auto":
            path = find_resumable(self.checkpoint_dir, log=_log)
            if path is None:
                return False
        else:
            path = choice
            reason = why_incomplete(path)
            if reason:
                raise ConfigError(f"trainer.resume={path} cannot be resumed from: {reason}")
        state = checkpoint.load(path, self.chunks, self.optimizer, self._layout(), log=_log)
        self.step_index = int(state["step"])
        self.warmed_up = bool(state["warmed_up"])
        self.rng.setstate(_tupled(state["sampler"]))
        self.monitor.history = list(state["monitor"])
        self.reached = state.get("reached")
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
        from megatron_papo.evaluate import EVAL_SEED, avg_at_k

        heartbeat("evaluation" + (" (images swapped)" if images_swapped else ""))
        c = self.config
        start = time.perf_counter()
        result = avg_at_k(self.engine, self.val_data[:c.trainer.eval_prompts],
                          c.rollout.sampling(seed=EVAL_SEED, n=c.trainer.eval_k),
                          images_swapped=images_swapped, progress=c.logging.progress_bars)
        result["seconds"] = time.perf_counter() - start
        prefix = "val_swapped/" if images_swapped else "val/"
        return {prefix + k: v for k, v in result.items() if k != "samples"}

    def _target_reached(self) -> bool:
        target = self.config.trainer.stop_at_accuracy
        return target is not None and self.reached is not None and self.reached >= target

    # ------------------------------------------------------------------ the run
    def run(self) -> dict:
        c = self.config
        before = {}
        if self.resume():  # the held-out accuracy before training, from the resumed run's log
            before = next((r for r in self._logged() if r.get("step") == 0
                           and "val/accuracy" in r and not r.get("after_warm_start")), {})
        else:
            self.metrics.start_over()
            before = self.evaluate()
            _log(f"[train] held-out before training: accuracy "
                 f"{before.get('val/accuracy', 0):.3f} (avg@{c.trainer.eval_k}), format "
                 f"{before.get('val/format', 0):.3f}")
            self.metrics.write({"step": 0, **before})
        if c.trainer.warmup_steps and not self.warmed_up:
            self.warm_start()
            warmed = self.evaluate()
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
                     f"{evaluation.get('val/accuracy', 0):.3f} ({evaluation['val/seconds']:.1f}s)")
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
        _log(f"[train] held-out after training: accuracy {after.get('val/accuracy', 0):.3f} "
             f"(before {before.get('val/accuracy', 0):.3f}, avg@{c.trainer.eval_k}), format "
             f"{after.get('val/format', 0):.3f}; with the images swapped between prompts: "
             f"accuracy {swapped.get('val_swapped/accuracy', 0):.3f} (a model that looks at the "
             "image drops towards chance)")
        if c.trainer.export_hf:
            self.export_hf(os.path.join(self.out, EXPORT_DIR))
        return {"before": before, "after": {**after, **swapped}, "last": last, "interrupted": 0}

    def export_hf(self, folder: str) -> None:
        from megatron_papo.conversion.checkpoint import write_hf_folder

        heartbeat("HF export")
        self._sync_params()
        write_hf_folder(self.chunks, self.spec, folder, self.hf_dir,
                        getattr(torch, self.config.model.params_dtype), force=True)
        _log(f"[train] HF export of the trained model: {folder}")

    def close(self) -> None:
        self.metrics.close()
        self.engine.close()
        release_all(self.locks)

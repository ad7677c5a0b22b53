"""The run's configuration: one validated dataclass per Hydra group (``configs/<group>/``).

:func:`build_config` turns the composed Hydra config (a plain dict) into :class:`TrainConfig`; an
unknown key, a wrong type or an inconsistent combination stops the run before any work with one
line naming the key and what is allowed."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import types
import typing
from dataclasses import dataclass, field

import yaml

from megatron_papo.data import DataConfig
from megatron_papo.evaluate import EVAL_K
from megatron_papo.rl.loss_config import LossConfig
from megatron_papo.rollout.settings import (
    DTYPES,
    EngineConfig,
    EngineSettings,
    Sampling,
    SamplingConfig,
)
from megatron_papo.settings import SettingError

# the Hydra configs of the main job (configs/<group>/<option>.yaml)
CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "configs")


def algorithm_names() -> list[str]:
    """The algorithm options (``configs/algorithm/<name>.yaml``)."""
    return sorted(f[:-len(".yaml")] for f in os.listdir(os.path.join(CONFIG_DIR, "algorithm"))
                  if f.endswith(".yaml"))


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the key."""


@dataclass
class ModelConfig:
    hf_dir: str | None = None        # an HF Qwen2.5-VL folder; None: the embedded tiny model
    tiny_hidden_size: int = 64       # the embedded tiny model (built locally, no download)
    tiny_layers: int = 2
    tiny_vision_hidden_size: int = 64
    tiny_initializer_range: float = 0.1
    tiny_tokenizer: str = "words"    # words: one token per word of the data (fast to learn) | bpe
    tiny_tied_embeddings: bool = False  # the output head IS the embedding (as in Qwen2.5-VL-3B)
    params_dtype: str = "float32"
    layer_spec: str = "local"        # local (megatron-core's own layers, anywhere) | te (GPU)
    # FP8 (layer_spec=te, bf16 params, Hopper/Ada GPU): hybrid | e4m3 | null; training
    # forward/backward only, the rollout engine keeps its dtype
    fp8: str | None = None
    fp8_recipe: str = "delayed"      # delayed (amax history) | current (per-tensor current scaling)
    fp8_amax_history_len: int = 1024
    fp8_bf16_first_layers: int = 0   # decoder layers kept in bf16 at the start / end (current
    fp8_bf16_last_layers: int = 0    # recipe only)
    fp8_vision: bool = False         # the vision tower in FP8 too (default: bf16)
    # activation recompute: null | selective (attention) | full (+ method uniform|block, layers)
    recompute_granularity: str | None = None
    recompute_method: str | None = None
    recompute_num_layers: int | None = None
    # GPU-only fused kernels (Transformer Engine)
    gradient_accumulation_fusion: bool = False
    apply_rope_fusion: bool = False

    def transformer_overrides(self) -> tuple[dict, dict]:
        """TransformerConfig fields of the language model and of the vision tower."""
        # megatron-core (seconds; after apply_cpu_patches): config checks stay free of it
        from megatron_papo.models.qwen2_5_vl.precision import fp8_fields, recompute_fields

        fp8 = fp8_fields(self.fp8, self.fp8_recipe, self.fp8_bf16_first_layers,
                         self.fp8_bf16_last_layers, self.fp8_amax_history_len)
        fused = dict(gradient_accumulation_fusion=self.gradient_accumulation_fusion,
                     apply_rope_fusion=self.apply_rope_fusion)
        language = {**fp8, **fused, **recompute_fields(
            self.recompute_granularity, self.recompute_method, self.recompute_num_layers)}
        vision = {**fused, **(fp8_fields(self.fp8, self.fp8_recipe, 0, 0,
                                          self.fp8_amax_history_len) if self.fp8_vision else {})}
        return language, vision


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    sequence_parallel: bool = False
    # uneven pipeline stages: decoder layers of the first / last stage (None: even stages);
    # tools/pp_stages.py suggests a split that lightens the vision tower's stage
    first_stage_layers: int | None = None
    last_stage_layers: int | None = None
    # overlap the data-parallel gradient reduce-scatter with the backward pass and the parameter
    # all-gather with the next forward (the distributed optimizer); pays off on GPUs
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False
    # processes that ``python -m megatron_papo.train`` starts on this machine (train/launch.py):
    # auto = the tiny model on a CPU machine: one per core (at most 4); else 1; a number: that
    # many; ignored under torchrun, which decides
    processes: int | str = "auto"


@dataclass
class AlgorithmConfig:
    # grpo | papo | papo_h | papo_no_kl_ref | papo_no_kl_ref_ds (the main job's) | dapo | papo_d
    name: str = "papo_no_kl_ref_ds"
    # every coefficient of the loss; each algorithm's numbers: configs/algorithm/<name>.yaml
    loss: LossConfig = field(default_factory=LossConfig)
    masked_branch: str = "frozen"    # frozen (the authors') | live
    # frozen branch: who computes the masked-image log-probs of the sampled responses: the rollout
    # engine (a prefill with the rollout-time weights, the weights the frozen branch asks for) or
    # the trainer (an extra forward before the update); live: always the trainer
    masked_logprobs: str = "trainer"  # engine | trainer
    mask_ratio: float = 0.6
    mask_patch: int = 14
    # DAPO (dapo, papo_d, papo_no_kl_ref_ds): groups whose rewards are all equal are dropped, more drawn
    # until the batch is full (at most max_sampling_rounds draws: the first of prompts_per_step
    # prompts, each later one sized to the shortfall, rl.algorithms.redraw_prompts)
    dynamic_sampling: bool = True   # the main job's default (papo_no_kl_ref_ds; issue #22)
    max_sampling_rounds: int = 10
    # DAPO's soft overlong punishment over the last ratio x rollout.max_new_tokens tokens (0: off)
    overlong_buffer_ratio: float = 0.0
    overlong_penalty_factor: float = 1.0


# Default stop line of rollout.max_logprob_mismatch (mean |delta log p| per response token, engine
# vs trainer). Healthy runs measured on CPU (tiny model, 2026-12-02): fp32 engine ~2e-7 per step;
# bf16 engine ~2e-3 (fp32 or bf16 trainer). A tied output head served stale (the bug this guards
# against) measured 0.12-0.15 from the first step. bf16 at real widths was not measured (no GPU):
# 0.1 leaves room for long sequences; lower it once a GPU run has measured a healthy level.
MISMATCH_LIMITS = {"float32": 1e-2, "half": 0.1}


@dataclass(kw_only=True)
class RolloutConfig(Sampling, EngineSettings):
    """The ``rollout`` group: the sampling keys and the engine keys as the rollout package
    declares them (defaults and checks there), and how the trainer uses the engine."""

    weight_bucket_mb: int = 64
    # the engine's sampling log-probs serve as the old (behaviour) log-probs instead of a trainer
    # recomputation; exact only with a float32 engine (the mismatch is still measured at every
    # step, in the update: rollout.max_logprob_mismatch)
    old_logprobs_from_engine: bool = True
    # the job stops when the engine's log-probs differ from the trainer's by more than this
    # (mean |delta log p| per response token, measured every step): the engine is not serving
    # the trained weights. None: by rollout.dtype (MISMATCH_LIMITS); 0: no check
    max_logprob_mismatch: float | None = None

    def __post_init__(self):
        Sampling.__post_init__(self)
        EngineSettings.__post_init__(self)
        if self.temperature <= 0:
            raise SettingError("temperature", f"={self.temperature} must be > 0 for RL (the "
                               "trainer scores the sampling distribution; 0 = greedy is for "
                               "evaluation)")
        if self.weight_bucket_mb < 1:
            raise SettingError("weight_bucket_mb", f"={self.weight_bucket_mb} must be >= 1")
        if self.max_logprob_mismatch is not None and self.max_logprob_mismatch < 0:
            raise SettingError("max_logprob_mismatch", f"={self.max_logprob_mismatch} must be "
                               ">= 0 (0: no check; null: the default of rollout.dtype)")
        if self.old_logprobs_from_engine and self.dtype != "float32":
            raise SettingError("old_logprobs_from_engine", f"=true needs rollout.dtype=float32 "
                               f"(got {self.dtype!r}: a {self.dtype} engine's log-probs differ "
                               "from the trainer's); set it to false")

    def logprob_mismatch_limit(self) -> float:
        """``max_logprob_mismatch``, or the default of this engine dtype (0: no check)."""
        if self.max_logprob_mismatch is not None:
            return self.max_logprob_mismatch
        return MISMATCH_LIMITS["float32" if self.dtype == "float32" else "half"]

    def sampling(self, seed: int | None, n: int | None = None) -> SamplingConfig:
        """One generate call's sampling with these keys (``n``: another sample count, e.g. k
        of an avg@k evaluation)."""
        return SamplingConfig(**{**self.sampling_fields(), "n": self.n if n is None else n}, seed=seed)

    def engine(self, model_path: str, seed: int, max_images_per_prompt: int) -> EngineConfig:
        """The engine of these keys for ``model_path`` (images per prompt resolved by the
        caller when ``max_images_per_prompt`` is null)."""
        fields = {**self.engine_fields(),
                  "max_images_per_prompt": self.max_images_per_prompt or max_images_per_prompt}
        return EngineConfig(model_path, **fields, seed=seed)


@dataclass
class DataSection(DataConfig):
    """The loader's settings (files, columns, prompt template, bad-row budget); empty
    ``train_files``: the synthetic counting task with these sizes."""

    prompt_template: str = "{problem}"
    synthetic_train: int = 4096
    synthetic_val: int = 256
    # the synthetic task's hint variant: the probability that a row's hint is right (null: no
    # hint; data=counting_hint)
    synthetic_hint: float | None = None


@dataclass
class OptimConfig:
    lr: float = 5e-4
    weight_decay: float = 0.0
    clip_grad: float = 1.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    # the vision tower's learning rate = lr x this (its own parameter group; 1: one group)
    vision_lr_mult: float = 1.0


CHECKPOINT_FORMATS = ("fully_reshardable", "dp_reshardable")


@dataclass
class TrainerConfig:
    steps: int = 200
    prompts_per_step: int = 64
    micro_batch_size: int = 512      # samples per forward/backward (same update for any value)
    # each micro-batch's samples packed into one row (THD, cu_seqlens): no compute on padding,
    # the same update (rl/packing.py)
    packing: bool = True
    # > 0 (needs packing): micro-batches by tokens, bin-packed under this budget, instead of
    # micro_batch_size samples; memory then depends on the budget, not on the longest response
    max_tokens_per_micro_batch: int = 0
    # with packing: a micro-batch's samples of one prompt (GRPO's n) run the prompt once, each
    # response attending to it and to itself only (rl/packing.py; local spec): the same update
    share_prompts: bool = True
    mini_batch_size: int = 0         # samples per optimizer step and DP rank (0: from below)
    # when mini_batch_size is 0 (authors: 3); 4 halves the tiny default job's wait before it
    # learns (docs/experiments.md)
    optimizer_steps_per_rollout: int = 4
    seed: int = 0
    eval_every: int = 10
    eval_prompts: int = 256
    eval_k: int = EVAL_K
    # stop once a held-out evaluation (every eval_every steps; none when eval_every is 0) reaches
    # this avg@eval_k accuracy (null: run all `steps`); the checkpoint, final metrics and HF export
    # are written as at the end
    stop_at_accuracy: float | None = 0.9
    output_dir: str = "outputs/run"
    export_hf: bool = True
    # Format warm start: supervised steps on "<think> </think> \\boxed{k}" with RANDOM labels k
    # (drawn from the training answers), so that outputs parse while RL does all the learning.
    warmup_steps: int = 30
    warmup_target: str = "<think> </think> \\boxed{{{answer}}}"
    # evaluate the initial weights before the warm start too (RL's starting point, the evaluation
    # after the warm start, always runs; without a warm start the initial evaluation always runs)
    eval_before_warm_start: bool = False
    # checkpoints (train/checkpoint.py): every save_every steps and at the end (0: none)
    save_every: int = 50
    keep_last: int = 2
    checkpoint_dir: str | None = None     # default <output_dir>/checkpoints
    # the distributed optimizer's state on disk (train/checkpoint.py): fully_reshardable resumes
    # at any TP/PP/DP but gathers a copy of the fp32 weights and both Adam moments on every rank
    # while it saves (+12 B per parameter of the rank's shard); dp_reshardable (Megatron-LM's own
    # default) writes the buffers as they are, no copy, and resumes at the same TP/PP (any DP)
    checkpoint_format: str = "fully_reshardable"
    resume: str = "auto"             # auto: the newest complete checkpoint, if any | none | a path
    # take the run folder's lock even from a job that seems alive (megatron_papo/runlock.py)
    force_unlock: bool = False
    # a collective that waits longer (a rank hung or died) ends the job, naming that rank
    collective_timeout_minutes: float = 30.0


@dataclass
class LoggingConfig:
    jsonl: bool = True               # <output_dir>/metrics.jsonl (always readable by the tools)
    tensorboard: bool = True         # <output_dir>/tensorboard when the package is installed
    wandb_project: str | None = None  # log to Weights & Biases (needs `pip install wandb`)
    wandb_run_name: str | None = None
    progress_bars: bool = True       # vLLM's bar on rank 0 for rollouts of >= 1M tokens


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def batch_sizes(self, dp: int) -> tuple[int, int, int]:
        """(samples per DP rank and rollout, samples per optimizer step and DP rank, samples per
        forward/backward)."""
        t = self.trainer
        local = t.prompts_per_step // dp * self.rollout.n
        mini = t.mini_batch_size or local // t.optimizer_steps_per_rollout
        return local, mini, min(t.micro_batch_size, mini)


def algorithm_preset(name: str, **loss) -> AlgorithmConfig:
    """The algorithm option ``name`` as the main job reads it (``configs/algorithm/<name>.yaml``),
    ``loss`` fields overridden: for tools and tests that need an algorithm's numbers."""
    if name not in algorithm_names():
        raise ConfigError(f"algorithm.name={name!r}: choose one of {algorithm_names()}")
    with open(os.path.join(CONFIG_DIR, "algorithm", f"{name}.yaml")) as f:
        raw = yaml.safe_load(f)
    raw["loss"].update(loss)
    return _section(AlgorithmConfig, raw, "algorithm")


def _check_type(value, annotation, key: str):
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return value
        for option in options:
            if option is type(None):
                continue
            try:
                return _check_type(value, option, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}={value!r} has the wrong type: expected {annotation}")
    base = origin or annotation
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if base in (int, float) and isinstance(value, bool):
        raise ConfigError(f"{key}={value!r} has the wrong type: expected {base.__name__}")
    if isinstance(base, type) and not isinstance(value, base):
        raise ConfigError(f"{key}={value!r} has the wrong type: expected {base.__name__}")
    return value


def _section(cls, raw, prefix: str):
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix or 'the config'} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(raw) - set(names))
    if unknown:
        where = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise ConfigError(f"{where} is not a setting; allowed: {names}")
    values = {}
    for name in names:
        if name not in raw:
            continue
        key = f"{prefix}.{name}" if prefix else name
        if dataclasses.is_dataclass(hints[name]):
            values[name] = _section(hints[name], raw[name], key)
        else:
            values[name] = _check_type(raw[name], hints[name], key)
    try:
        return cls(**values)
    except SettingError as err:  # the config's own check, named by its full key
        raise ConfigError(err.under(prefix)) from None


def _positive(config: TrainConfig, keys: list[str]) -> None:
    for key in keys:
        group, name = key.split(".")
        value = getattr(getattr(config, group), name)
        if value < 1:
            raise ConfigError(f"{key}={value} must be >= 1")


def share_prompts_problem(config: TrainConfig) -> str | None:
    """Why trainer.share_prompts cannot run with this model (None: it can)."""
    m, t = config.model, config.trainer
    if t.packing and t.share_prompts and m.layer_spec != "local":
        return (f"trainer.share_prompts=true needs model.layer_spec=local (with "
                f"{m.layer_spec!r}, Transformer Engine's packed attention cannot keep a prompt's "
                "responses apart): set trainer.share_prompts=false")
    return None


# the model settings the precision checks read; at their defaults (the local spec, no FP8, no
# recompute, no fused kernels) the checks pass on any machine (tested), so they are skipped and
# megatron-core is not imported: the command that starts the ranks checks layouts without it
PRECISION_FIELDS = ("layer_spec", "fp8", "fp8_recipe", "fp8_amax_history_len",
                    "fp8_bf16_first_layers", "fp8_bf16_last_layers", "fp8_vision",
                    "recompute_granularity", "recompute_method", "recompute_num_layers",
                    "gradient_accumulation_fusion", "apply_rope_fusion")


def _check_gpu_settings(config: TrainConfig) -> None:
    """The layer spec, FP8, recompute and GPU-only settings can run on this machine."""
    m, p = config.model, config.parallel
    if m.params_dtype not in DTYPES:
        raise ConfigError(f"model.params_dtype={m.params_dtype!r}: choose float32, bfloat16 or "
                          "float16")
    defaults = ModelConfig()
    if all(getattr(m, name) == getattr(defaults, name) for name in PRECISION_FIELDS):
        problem = None
    else:
        problem = _precision_problem(m)
    if problem:
        raise ConfigError(problem)
    # after the checks above: where TE is missing, that is the cause to name first
    problem = share_prompts_problem(config)
    if problem:
        raise ConfigError(problem)
    if m.fp8_vision and not m.fp8:
        raise ConfigError("model.fp8_vision=true needs model.fp8 (hybrid or e4m3)")
    if p.overlap_param_gather and not p.overlap_grad_reduce:
        raise ConfigError("parallel.overlap_param_gather=true needs "
                          "parallel.overlap_grad_reduce=true")


def _precision_problem(m: ModelConfig) -> str | None:
    from megatron_papo.models.qwen2_5_vl import precision  # megatron-core: not at import (as above)

    return (precision.layer_spec_problem(m.layer_spec)
            or precision.fp8_problem(m.fp8, m.fp8_recipe, m.layer_spec, m.params_dtype,
                                     m.fp8_bf16_first_layers, m.fp8_bf16_last_layers)
            or precision.recompute_problem(m.recompute_granularity, m.recompute_method,
                                           m.recompute_num_layers)
            or precision.gpu_only_problem({f"model.{name}": getattr(m, name)
                                           for name in precision.GPU_ONLY}))


AUTO_PROCESSES_MAX = 4   # parallel.processes=auto never starts more (each rank: model + engine)


def check_processes(value):
    """``parallel.processes``: a number >= 1 or auto."""
    if isinstance(value, bool) or not (value == "auto" or (isinstance(value, int) and value >= 1)):
        raise ConfigError(f"parallel.processes={value!r}: a number >= 1, or auto (one per core "
                          f"on a CPU machine, at most {AUTO_PROCESSES_MAX})")
    return value


def build_config(raw: dict, world_size: int = 1) -> TrainConfig:
    """The validated configuration of a run on ``world_size`` processes."""
    config = _section(TrainConfig, {k: v for k, v in raw.items() if k != "hydra"}, "")
    _positive(config, ["trainer.steps", "trainer.prompts_per_step", "trainer.micro_batch_size",
                       "trainer.eval_k",
                       "trainer.optimizer_steps_per_rollout",
                       "parallel.tensor_model_parallel_size",
                       "parallel.pipeline_model_parallel_size"])
    if config.algorithm.name not in algorithm_names():
        raise ConfigError(f"algorithm.name={config.algorithm.name!r}: choose one of "
                          f"{algorithm_names()}")
    if config.logging.wandb_project:
        if importlib.util.find_spec("wandb") is None:
            raise ConfigError(f"logging.wandb_project={config.logging.wandb_project!r} is set but "
                              "wandb is not installed: pip install wandb, or unset it")
    if config.model.tiny_tokenizer not in ("words", "bpe"):
        raise ConfigError(f"model.tiny_tokenizer={config.model.tiny_tokenizer!r}: choose words "
                          "or bpe")
    _check_gpu_settings(config)
    if config.algorithm.masked_branch not in ("frozen", "live"):
        raise ConfigError(f"algorithm.masked_branch={config.algorithm.masked_branch!r}: choose "
                          "frozen or live")
    if config.algorithm.masked_logprobs not in ("engine", "trainer"):
        raise ConfigError(f"algorithm.masked_logprobs={config.algorithm.masked_logprobs!r}: "
                          "choose engine or trainer")
    loss = config.algorithm.loss
    if (loss.entropy_estimator == "exact" and loss.entropy_eta_masked > 0
            and config.algorithm.masked_branch == "frozen"):
        raise ConfigError(
            "algorithm.loss.entropy_estimator=exact with entropy_eta_masked > 0 needs "
            "algorithm.masked_branch=live: the frozen branch keeps only the sampled tokens' "
            "masked log-probs, not the masked distribution (or use entropy_estimator=sampled)")
    if not 0 <= config.algorithm.mask_ratio <= 1:
        raise ConfigError(f"algorithm.mask_ratio={config.algorithm.mask_ratio} must be in [0, 1]")
    if config.trainer.warmup_steps < 0:
        raise ConfigError(f"trainer.warmup_steps={config.trainer.warmup_steps} must be >= 0")
    if config.trainer.checkpoint_format not in CHECKPOINT_FORMATS:
        raise ConfigError(f"trainer.checkpoint_format={config.trainer.checkpoint_format!r}: "
                          f"choose {' or '.join(CHECKPOINT_FORMATS)}")
    for key in ("save_every", "keep_last"):
        if getattr(config.trainer, key) < 0:
            raise ConfigError(f"trainer.{key}={getattr(config.trainer, key)} must be >= 0")
    a = config.algorithm
    if a.max_sampling_rounds < 1:
        raise ConfigError(f"algorithm.max_sampling_rounds={a.max_sampling_rounds} must be >= 1")
    if not 0 <= a.overlong_buffer_ratio < 1:
        raise ConfigError(f"algorithm.overlong_buffer_ratio={a.overlong_buffer_ratio} must be in "
                          "[0, 1) (DAPO: 4096 / 20480 = 0.2)")
    if not config.trainer.collective_timeout_minutes > 0:
        raise ConfigError(f"trainer.collective_timeout_minutes="
                          f"{config.trainer.collective_timeout_minutes} must be > 0")
    if not config.optim.vision_lr_mult > 0:
        raise ConfigError(f"optim.vision_lr_mult={config.optim.vision_lr_mult} must be > 0")
    hint = config.data.synthetic_hint
    if hint is not None and not 0 <= hint <= 1:
        raise ConfigError(f"data.synthetic_hint={hint} must be in [0, 1] (the probability that "
                          "a row's hint is right; null: no hint)")
    target = config.trainer.stop_at_accuracy
    if target is not None:
        if not 0 < target <= 1:
            raise ConfigError(f"trainer.stop_at_accuracy={target} must be in (0, 1] (null: off)")
    if "{answer}" not in config.trainer.warmup_target:
        raise ConfigError("trainer.warmup_target must contain '{answer}'")
    t = config.trainer
    if t.max_tokens_per_micro_batch:
        if not t.packing:
            raise ConfigError("trainer.max_tokens_per_micro_batch needs trainer.packing=true")
        live = (config.algorithm.masked_branch == "live"
                and config.algorithm.loss.needs_masked_branch)
        longest = config.rollout.max_model_len * (2 if live else 1)
        if t.max_tokens_per_micro_batch < longest:
            raise ConfigError(
                f"trainer.max_tokens_per_micro_batch={t.max_tokens_per_micro_batch} is below "
                f"the longest possible sample, rollout.max_model_len={config.rollout.max_model_len}"
                + (" x 2 (the live masked branch runs each sample with its masked copy)"
                   if live else "") + f": raise it to at least {longest}")
    elif t.max_tokens_per_micro_batch < 0:
        raise ConfigError(f"trainer.max_tokens_per_micro_batch={t.max_tokens_per_micro_batch} "
                          "must be >= 0 (0: micro_batch_size samples)")
    p = config.parallel
    check_processes(p.processes)
    model_parallel = p.tensor_model_parallel_size * p.pipeline_model_parallel_size
    if world_size % model_parallel:
        raise ConfigError(
            f"parallel.tensor_model_parallel_size x pipeline_model_parallel_size = "
            f"{model_parallel} does not divide the {world_size} processes")
    if world_size % config.rollout.tensor_parallel_size:
        raise ConfigError(f"rollout.tensor_parallel_size={config.rollout.tensor_parallel_size} "
                          f"does not divide the {world_size} processes")
    dp = world_size // model_parallel
    t = config.trainer
    if t.prompts_per_step % dp:
        raise ConfigError(f"trainer.prompts_per_step={t.prompts_per_step} is not divisible by "
                          f"the data-parallel size {dp}")
    local, mini, micro = config.batch_sizes(dp)
    if not t.mini_batch_size and local % t.optimizer_steps_per_rollout:
        # whole prompts per mini-batch keep a group's samples in one optimizer step
        prompts = local // config.rollout.n
        choices = [k for k in range(1, prompts + 1) if prompts % k == 0][:8]
        raise ConfigError(
            f"trainer.optimizer_steps_per_rollout={t.optimizer_steps_per_rollout} does not divide "
            f"the {local} samples per data-parallel rank (prompts_per_step / DP x rollout.n); "
            f"choose one of {choices}, or change trainer.prompts_per_step")
    if local % mini or mini % micro:
        raise ConfigError(
            f"trainer.mini_batch_size={mini} must divide the {local} samples per data-parallel "
            f"rank (prompts_per_step / DP x rollout.n) and be a multiple of "
            f"trainer.micro_batch_size={t.micro_batch_size}")
    return config

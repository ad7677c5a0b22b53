"""Memory per GPU of a Qwen2.5-VL PAPO job (trainer + colocated vLLM engine) for a layout, and the
layouts of a cluster that fit, fastest first.

The model is stated here so that a reader can check it (docs/benchmarks.md prints its tables):

* parameters per pipeline stage: :func:`stages.stage_costs` (the one count; the vision tower and
  the embedding on stage 0, the output layer on the last), divided by TP (every matrix is split;
  the norms and biases that are not are < 0.1 % and counted split too);
* trainer state per parameter: bf16 weights (2 B) + fp32 gradient buffer (4 B: megatron-core DDP
  with ``grad_reduce_in_fp32``, as ``provider.build_model_chunks`` sets it) + the distributed
  optimizer's fp32 master copy and Adam moments (12 B), sharded over DP; the frozen reference
  model (``kl_beta > 0``) adds 2 B per parameter;
* activations of one micro-batch of ``tokens`` tokens per decoder layer (bf16, SDPA/flash
  attention: no tokens x tokens tensor): the layer input and the two norm inputs/outputs
  (4 h, divided by TP with sequence parallelism), Q/K/V, the rotated Q/K and the attention output
  (3 heads + 3 KV heads) x head_dim, the MLP's fc1 output, SwiGLU output (3 ffn); all divided by
  TP. FP8 stores the four linear inputs in 1 byte. Full recompute keeps only each layer's input
  plus one layer's activations; selective recompute is counted as none (it recomputes the core
  attention, which stores no tokens x tokens tensor with flash attention). The live masked branch
  doubles every micro-batch (original + masked image);
* stage 0 also holds the vision tower's activations for the micro-batch's images (4 patches per
  image token, the same per-layer count at the ViT's widths, not sequence parallel), the last
  stage the logits: tokens x vocabulary / TP x 14 B (bf16 logits, their fp32 log-softmax and its
  gradient, the exact entropy's probabilities); the output layer's weight gradient (and on a
  first stage of its own the embedding's) exists whole before it joins the gradient buffer
  (``model.gradient_accumulation_fusion`` off, as in every preset): vocabulary x hidden / TP once;
* the 1F1B pipeline schedule keeps ``min(PP - stage, micro-batches)`` micro-batches in flight on
  each stage (stage 0 the most);
* the colocated engine: its weights (2 B per parameter / rollout TP; a tied head once, although
  the trainer's last pipeline stage holds a copy) and the KV cache of the
  sequences it runs at once (2 x layers x KV heads x head_dim x 2 B per token; KV heads divided
  by rollout TP); with sleep mode (``rollout.sleep_while_training``) both are released while the
  trainer's activations exist, so the peak is the larger of the two phases, else their sum;
* the weight push after each update, while the engine's weights are awake and the trainer's
  state is on the GPU: the largest HF tensor (the embedding / output head, vocabulary x hidden)
  whole in the engine's dtype on the trainer side (vLLM's loader takes full tensors) plus the
  engine's shard of it (vLLM's layer-wise reload materialises a layer before copying it in);
  measured on CPU at 3B widths (``tools/rehearse.py``: +1.74 GiB with a bf16 engine, this term
  and the CPU engine's re-packing of the tied head);
* a fixed 3 GiB per GPU for the CUDA context, NCCL buffers and allocator slack.

``device("cpu")`` states what this project holds on a CPU instead (:func:`device` lists it: fp32
storage, unfused activations with the attention scores, vLLM-CPU's packed head, torch's unfused
Adam temporaries, the engine never asleep, the process instead of the CUDA overhead); that
variant is checked against measured runs (``tools/rehearse.py --memory``; docs/benchmarks.md).

The speed order of :func:`suggest` is a model too: the training step's time is the slowest
stage's FLOPs for one optimizer step's sequences (3 x forward, 4 x with full recompute) / TP /
TP efficiency (1, 0.9, 0.8, 0.7 at TP 1, 2, 4, 8: its all-reduces inside a node) x the pipeline
bubble (1 + (PP - 1) / micro-batches), at the GPU's dense bf16 peak. Rollout time (memory-bound
decoding) is left out of the order: it is the same engine at any training layout.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace

from .config import ModelConfigError, check_parallel_layout, text_spec_from_hf
from .stages import _shapes, stage_costs

GIB = 1024 ** 3
GPUS = {"h100": 79.6, "h200": 140.4}  # GiB that nvidia-smi reports (81,559 / 143,771 MiB)
OVERHEAD_GIB = 3.0
TP_EFFICIENCY = {1: 1.0, 2: 0.9, 4: 0.8, 8: 0.7}
PEAK_TFLOPS = {"h100": 989.0, "h200": 989.0}  # dense bf16 (the same SXM compute)


@dataclass(frozen=True)
class Device:
    """How a rank of a device holds the job: bytes per element of each kind of state and what
    its software stack adds. The GPUs: the bf16 training of the module docstring. ``cpu``: what
    this project runs on a CPU (fp32 training; the local spec; vLLM-CPU), so that the planner
    can be checked against measured runs (``tools/rehearse.py --memory``)."""

    name: str
    capacity: float            # GiB per rank
    weight_bytes: int = 2      # trainer weights (model.params_dtype)
    optimizer_bytes: int = 12  # distributed optimizer per parameter: fp32 master + 2 moments
    activation_bytes: int = 2  # per stored activation element
    logit_bytes: int = 14      # per logit of a micro-batch on the last stage
    score_bytes: int = 0       # per head and token pair kept by core attention (0: flash)
    unfused: bool = False      # the local spec's per-layer activations (_layer_activation_bytes)
    overhead: float = OVERHEAD_GIB  # GiB per rank: CUDA context + NCCL + slack / the process
    engine_runtime: float = 0.0     # GiB the engine adds beyond its weights and KV cache
    packed_head: int = 0       # bytes per element of a second, packed copy of the engine's head
    packs_bf16: bool = True    # the packed copy exists in a bf16 engine too (CPU: oneDNN's bf16
    #                            matmul needs AVX-512; without it vLLM falls back to torch.linear)
    sleeps: bool = True        # the engine can release its memory while the trainer works
    optimizer_temporaries: int = 0  # fp32 copies of a parameter shard the optimizer step makes
    #                                 at once (0: a fused Adam, Transformer Engine's or Apex's)


# Measured on this project's 2-core CPU machine (tools/rehearse.py --memory at toy widths, where
# the model's own bytes are negligible, 2026-12-03): a rank's process before the model (python,
# torch, megatron-core, transformers, vLLM imported; process groups) holds 0.47 GiB; the vLLM-CPU
# engine adds 0.92 GiB beyond its weights and KV cache (its model runner, the processor, oneDNN).
CPU_PROCESS_GIB = 0.47
CPU_ENGINE_RUNTIME_GIB = 0.92


def cpu_packs_bf16() -> bool:
    """Whether vLLM-CPU packs a bf16 engine's linear weights on this machine: it builds a oneDNN
    bf16 matmul, which oneDNN offers only with AVX-512 (torch's check of the same); on an AVX2
    CPU vLLM logs "Failed to create oneDNN linear, fallback to torch linear" and keeps the
    weights as they are (seen on this project's AMD EPYC machine, 2026-12-03)."""
    import torch

    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def device(name: str, memory_gib: float | None = None, ranks: int = 1,
           packs_bf16: bool | None = None) -> Device:
    """``h100`` / ``h200``, or ``cpu`` (``memory_gib``: the machine's memory, shared by its
    ``ranks``; ``packs_bf16``: whether vLLM packs a bf16 engine's head on that CPU, default
    this machine's :func:`cpu_packs_bf16`)."""
    if name in GPUS:
        return Device(name, GPUS[name])
    if name != "cpu":
        raise ModelConfigError(f"--gpu {name!r}: choose one of {sorted(GPUS) + ['cpu']}")
    if memory_gib is None:
        memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    if packs_bf16 is None:
        packs_bf16 = cpu_packs_bf16()
    # fp32 weights and gradients, Adam's two fp32 moments (fp32 parameters need no master
    # copy); fp32 activations; the last stage's fp32 logits: the logits, the sampling
    # distribution's copy (suppressed ids), the cross entropy's softmax, the exact entropy's
    # shifted logits and exponentials (20 B); megatron-core's local core attention keeps the
    # scores, the softmax and its dropout output (3 x 4 B per head and token pair); vLLM-CPU
    # keeps the head's weights for the lookup and a oneDNN-packed copy for the logits, which
    # measured fp32-sized in a bf16 engine on an AVX-512 CPU (3B widths, one process: 2.98 GiB
    # for 0.97 GiB of bf16 weights; 0.58 GiB beyond weights + a bf16 packed copy + buffers + KV
    # cache) and absent on an AVX2 CPU (1.91 GiB: weights + runtime + KV cache); torch's
    # Adam (no fused kernel without TE/Apex) computes exp_avg_sq.sqrt() / bias_correction: two
    # temporaries of a parameter shard at once (measured: 2 x the head's fp32 size above the
    # persistent state on both PP 2 stages and at TP 1 / TP 2, rehearse --memory)
    return Device("cpu", memory_gib / ranks, weight_bytes=4, optimizer_bytes=8,
                  activation_bytes=4, logit_bytes=20, score_bytes=12, unfused=True,
                  overhead=CPU_PROCESS_GIB, engine_runtime=CPU_ENGINE_RUNTIME_GIB,
                  packed_head=4, packs_bf16=packs_bf16, sleeps=False, optimizer_temporaries=2)


@dataclass
class Job:
    """What one training step works on (per GPU quantities follow from the layout)."""

    response_len: int = 1024
    image_tokens: int = 256          # per image (448 x 448 px -> 256)
    images_per_prompt: int = 1
    prompt_text_tokens: int = 200
    max_tokens_per_micro_batch: int = 4096
    sequences_per_update: int = 640  # per optimizer step (the authors' presets: 128 prompts x 5)
    engine_sequences: int = 256      # sequences the engine decodes at once (vLLM max_num_seqs)
    engine_bytes: int = 2            # rollout.dtype (bfloat16)
    kv_cache_gib: float | None = None  # per engine rank when sized explicitly (rollout.kv_cache_mb
    #                                    on CPU); None: the engine_sequences' full length
    reference_model: bool = True     # kl_beta > 0
    live_masked_branch: bool = False

    @property
    def sequence_len(self) -> int:
        return (self.prompt_text_tokens + self.images_per_prompt * self.image_tokens
                + self.response_len)


@dataclass
class Layout:
    tp: int = 1
    pp: int = 1
    dp: int = 1
    rollout_tp: int | None = None    # default: tp
    recompute: str = "none"          # none | selective | full
    fp8: bool = False
    sleep: bool = True               # rollout.sleep_while_training

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.dp


@dataclass
class Plan:
    layout: Layout
    gpu: str
    stage: int                       # the stage with the highest peak
    parts: dict = field(default_factory=dict)   # GiB per GPU on that stage
    train_peak: float = 0.0
    rollout_peak: float = 0.0
    peak: float = 0.0
    capacity: float = 0.0
    step_time: float = 0.0           # seconds of the training step by the stated model
    micro_batches: int = 0
    stages: list = field(default_factory=list)  # every pipeline stage's plan (stage 0 first)

    @property
    def fits(self) -> bool:
        return self.peak <= self.capacity


def _layer_activation_bytes(h: int, ffn: int, heads: int, kv: int, d: int, tokens: int, tp: int,
                            sp: bool, fp8: bool, dev: Device | None = None,
                            sequences: tuple = ()) -> float:
    """Bytes one decoder layer keeps for the backward pass of ``tokens`` tokens. The GPU specs:
    the norms' inputs/outputs, Q/K/V, rotated Q/K, the attention output, fc1's output and the
    SwiGLU output. The local spec (``dev.unfused``): the norms' inputs/outputs, the rotated Q, K
    and V repeated to every head (grouped-query attention unrolled), the attention output and
    its reshaped copy, fc1's two halves, the SiLU and the product; plus ``dev.score_bytes`` per
    head and token pair of each of ``sequences`` (lengths)."""
    dev = dev or Device("h100", GPUS["h100"])
    t_sp = tp if sp else 1
    if dev.unfused:
        elements = 4 * h / t_sp + 5 * heads * d / tp + 4 * ffn / tp
        scores = dev.score_bytes * heads / tp * sum(n * n for n in sequences)
        return tokens * dev.activation_bytes * elements + scores
    elements = (4 * h / t_sp + (3 * heads + 3 * kv) * d / tp + 3 * ffn / tp)
    saved = (2 * h / t_sp + heads * d / tp + ffn / tp) if fp8 else 0.0  # 4 linear inputs: 1 B
    return tokens * (dev.activation_bytes * elements - saved)


def _vision_shapes(hf: dict) -> dict:
    v = hf["vision_config"]
    heads = v["num_heads"]
    return dict(h=v["hidden_size"], f=v["intermediate_size"], heads=heads, kv=heads,
                d=v["hidden_size"] // heads, depth=v["depth"],
                merge=v.get("spatial_merge_size", 2) ** 2)


def plan(hf: dict, layout: Layout, job: Job, gpu: str | Device = "h100") -> Plan:
    """Memory per GPU (per rank: ``gpu`` a :class:`Device`) of ``layout`` for ``job``; refuses a
    layout the model cannot be split into (ModelConfigError naming the numbers)."""
    dev = gpu if isinstance(gpu, Device) else device(gpu)
    if layout.recompute not in ("none", "selective", "full"):
        raise ModelConfigError(f"recompute={layout.recompute!r}: none, selective or full")
    spec = text_spec_from_hf(hf)
    v = hf.get("vision_config") or {}
    check_parallel_layout(spec, layout.tp, layout.pp, vision_heads=v.get("num_heads"))
    rollout_tp = layout.rollout_tp or layout.tp
    s = _shapes(hf)
    tp, sp = layout.tp, layout.tp > 1
    seq = job.sequence_len
    if job.max_tokens_per_micro_batch < seq:
        raise ModelConfigError(
            f"--max-tokens-per-micro-batch {job.max_tokens_per_micro_batch} is below one "
            f"sequence ({seq} tokens: prompt {job.prompt_text_tokens} + images "
            f"{job.images_per_prompt} x {job.image_tokens} + response {job.response_len}); "
            "raise it or shorten the response")
    per_micro = job.max_tokens_per_micro_batch // seq           # whole sequences per micro-batch
    tokens = per_micro * seq * (2 if job.live_masked_branch else 1)
    sequences = (seq,) * (tokens // seq)
    local_sequences = math.ceil(job.sequences_per_update / layout.dp)
    micro_batches = max(1, math.ceil(local_sequences / per_micro))
    costs = stage_costs(hf, layout.pp, seq_len=seq, images=job.images_per_prompt,
                        image_pixels=job.image_tokens * 4 * (v.get("patch_size", 14) ** 2))
    total_params = sum(c.params for c in costs)

    # the engine's parameters: a tied head once (stage_costs gives a tied head's last stage its
    # own copy; the engine has one); vLLM-CPU keeps the head's weights and a packed copy, the
    # other linears only packed
    model_params = total_params - (s["vocab"] * s["h"] if s["tied"] and layout.pp > 1 else 0)
    packed_head = dev.packed_head if dev.packs_bf16 or job.engine_bytes == 4 else 0
    engine_weights = ((job.engine_bytes * model_params + packed_head * s["vocab"] * s["h"])
                      / rollout_tp / GIB + dev.engine_runtime)
    kv_heads = max(1, s["kv"] // rollout_tp)
    kv_per_token = 2 * s["layers"] * kv_heads * s["d"] * job.engine_bytes
    kv_cache = (job.kv_cache_gib if job.kv_cache_gib is not None
                else kv_per_token * seq * job.engine_sequences / GIB)
    # the push: the largest tensor (the head) whole on the trainer side + vLLM's reloaded shard
    # of it; vLLM-CPU then packs the pushed head again beside the old packed copy
    push = job.engine_bytes * s["vocab"] * s["h"] * (
        1 + (2 if packed_head else 1) / rollout_tp) / GIB

    best, stages = None, []
    for stage, cost in enumerate(costs):
        params = cost.params / tp
        weights = dev.weight_bytes * params / GIB
        grads = 4 * params / GIB
        optimizer = dev.optimizer_bytes * params / layout.dp / GIB
        reference = dev.weight_bytes * params / GIB if job.reference_model else 0.0
        layer = _layer_activation_bytes(s["h"], s["f"], s["heads"], s["kv"], s["d"], tokens, tp,
                                        sp, layout.fp8, dev, sequences)
        if layout.recompute == "full":
            per_micro_bytes = cost.layers * tokens * dev.activation_bytes * s["h"] / (
                tp if sp else 1)
            extra_once = layer  # one layer's activations while it is recomputed
        else:
            per_micro_bytes, extra_once = cost.layers * layer, 0.0
        if stage == 0 and v:
            vs = _vision_shapes(hf)
            patches = tokens // seq * job.images_per_prompt * job.image_tokens * vs["merge"]
            vision = replace(dev, score_bytes=0)  # segment attention: SDPA, no scores kept
            per_micro_bytes += vs["depth"] * _layer_activation_bytes(
                vs["h"], vs["f"], vs["heads"], vs["kv"], vs["d"], patches, tp, False, False,
                vision)
        # the output layer's / the embedding's weight gradient exists whole before it is added
        # into the gradient buffer (model.gradient_accumulation_fusion off)
        wgrad = dev.weight_bytes * s["vocab"] * s["h"] / tp
        if stage == len(costs) - 1:
            per_micro_bytes += tokens * s["vocab"] / tp * dev.logit_bytes
            extra_once += wgrad  # at the start of the backward pass: everything still lives
        elif stage == 0:  # the embedding's, at the end of each micro-batch's backward pass
            extra_once += wgrad
        in_flight = min(layout.pp - stage, micro_batches)
        activations = in_flight * per_micro_bytes + extra_once
        if dev.optimizer_temporaries:
            # after the backward pass, the optimizer step: torch's unfused Adam makes
            # temporaries the size of each parameter shard in turn; the largest is the
            # embedding / output layer on the first / last stage, else fc1
            largest = (s["vocab"] * s["h"] if stage in (0, len(costs) - 1)
                       else 2 * s["f"] * s["h"]) / tp / layout.dp
            activations = max(activations, dev.optimizer_temporaries * 4 * largest)
        activations /= GIB
        persistent = weights + grads + optimizer + reference + dev.overhead
        engine = engine_weights + kv_cache
        asleep = layout.sleep and dev.sleeps
        train_peak = persistent + activations + (0.0 if asleep else engine)
        rollout_peak = persistent + engine + push
        peak = max(train_peak, rollout_peak)
        parts = {"weights": weights, "gradients": grads, "optimizer": optimizer,
                 "reference": reference, "activations": activations,
                 "engine weights": engine_weights, "KV cache": kv_cache,
                 "weight push": push, "overhead": dev.overhead}
        candidate = Plan(layout, dev.name, stage, parts, train_peak, rollout_peak, peak,
                         dev.capacity, micro_batches=micro_batches)
        stages.append(candidate)
        if best is None or peak > best.peak:
            best = candidate
    best.stages = stages
    slowest = max(c.flops for c in costs) * local_sequences
    passes = 4 if layout.recompute == "full" else 3
    if job.live_masked_branch:
        slowest *= 2
    bubble = 1 + (layout.pp - 1) / micro_batches
    best.step_time = (passes * slowest / tp / TP_EFFICIENCY.get(tp, 0.6)
                      / (PEAK_TFLOPS.get(dev.name, 1.0) * 1e12) * bubble)
    return best


def advice(p: Plan) -> str:
    """What to turn when ``p`` does not fit (or 'fits')."""
    if p.fits:
        return f"fits ({p.capacity - p.peak:.1f} GiB free)"
    parts, over, lay = p.parts, p.peak - p.capacity, p.layout
    persistent = sum(parts[k] for k in ("weights", "gradients", "optimizer", "reference",
                                        "overhead"))
    if persistent >= p.capacity:
        knob = ("more TP or PP (weights and gradients are split over them) or DP (the "
                "optimizer state is sharded over it)")
    elif p.train_peak >= p.rollout_peak:
        knob = ("model.recompute_granularity=full or a smaller trainer.max_tokens_per_micro_batch"
                if lay.recompute != "full" else "a smaller trainer.max_tokens_per_micro_batch")
    elif parts["KV cache"] > over:
        knob = "fewer sequences decoded at once (rollout.max_num_seqs: a smaller KV cache)"
    else:
        knob = "a larger rollout TP (the engine's weights and KV cache are split over it)"
    return f"does not fit: {over:.1f} GiB over; {knob}"


def suggest(hf: dict, gpus: int, job: Job, gpu: str = "h100", recompute=("none", "full"),
            fp8: bool = False, sleep: bool = True) -> list[Plan]:
    """Every TP x PP x DP = ``gpus`` layout the model can be split into that fits, fastest first
    (TP <= 8: one node's NVLink)."""
    out = []
    for tp in (1, 2, 4, 8):
        for pp in range(1, gpus // tp + 1):
            if gpus % (tp * pp):
                continue
            for rc in recompute:
                layout = Layout(tp=tp, pp=pp, dp=gpus // (tp * pp), recompute=rc, fp8=fp8,
                                sleep=sleep)
                try:
                    p = plan(hf, layout, job, gpu)
                except ModelConfigError:
                    continue
                if p.fits:
                    out.append(p)
    return sorted(out, key=lambda p: (p.step_time, p.peak))

"""The main job's per-step metrics: assembled from what a step produced (:func:`step_record`),
watched (:func:`watch`: the engine/trainer log-prob gap, the paper's KL_prcp-hacking symptoms;
:func:`stop_on_mismatch`) and written (:class:`Metrics`: JSONL, TensorBoard, W&B; the phase
timer)."""

from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager

import torch
import torch.distributed as dist

from megatron_papo.parallel import heartbeat
from megatron_papo.rl.step import mean_over_data_parallel

from .launch import COMMAND_STARTED_ENV  # set by the launcher for its ranks

MISMATCH_WARN = 1e-3  # mean |log p| per token, engine vs trainer (fp32: ~1e-6)


def log(message: str) -> None:
    """Print on rank 0 only."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(message, flush=True)


def process_seconds() -> float:
    """Seconds since the command started (the main job's process; for the ranks it starts
    itself, the command that started them; under torchrun, this worker): what a user waits for,
    imports and start-up included."""
    import psutil  # (a dependency of the package; imported here: metrics is imported early)

    started = os.environ.get(COMMAND_STARTED_ENV)
    return time.time() - (float(started) if started else psutil.Process().create_time())


def reset_peak_memory() -> None:
    """Start a new peak: the GPU allocator's (CUDA) or the process's resident-set high-water
    mark (Linux: ``/proc/self/clear_refs``; the colocated engine lives in this process)."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _status_gib(field: str) -> float | None:
    """A kB field of ``/proc/self/status`` in GiB (None where it cannot be read)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        return None
    return None


def peak_memory_gib() -> float | None:
    """The peak since :func:`reset_peak_memory`: GPU memory allocated by torch, or this
    process's resident set (VmHWM); None where neither can be read."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return _status_gib("VmHWM")


def memory_in_use_gib() -> float | None:
    """What this process holds now: GPU memory allocated by torch, or the resident set
    (``VmRSS``: the colocated engine lives in this process); None where neither can be read."""
    if torch.cuda.is_available():
        return torch.cuda.memory_allocated() / 2**30
    return _status_gib("VmRSS")


class MemoryLedger:
    """Where a rank's memory goes, measured: the growth of :func:`memory_in_use_gib` across each
    builder of the job's setup (:meth:`mark`), and for the first steps each phase's memory at
    its start and its peak (:meth:`phase`, fed by :class:`Metrics`). :meth:`parts` turns that
    into the planner's parts (``tools/rehearse.py --memory`` sets them side by side)."""

    STEPS = 2  # step 1 creates the optimizer state; step 2 is a steady one

    def __init__(self):
        self.setup: dict[str, float] = {}
        self.phases: dict[int, dict[str, list[float]]] = {}  # step -> phase -> [start, peak]
        self.last = memory_in_use_gib()
        if self.last is not None:
            self.setup["process"] = self.last

    def mark(self, part: str) -> None:
        """``part`` is what was built since the last mark."""
        now = memory_in_use_gib()
        if now is not None and self.last is not None:
            self.setup[part] = self.setup.get(part, 0.0) + now - self.last
        self.last = now

    def phase(self, step: int | None, name: str, start: float | None, peak: float | None):
        if step is None or step > self.STEPS or start is None or peak is None:
            return
        seen = self.phases.setdefault(step, {}).setdefault(name, [start, peak])
        seen[1] = max(seen[1], peak)

    def parts(self) -> dict[str, float] | None:
        """GiB: the setup's parts; ``optimizer state`` (what step 1 left: Adam's moments appear
        at the first optimizer step), ``activations`` (step 2's update peak over its start),
        ``log-prob pass`` (the same for the trainer's log-prob forwards), ``weight push``,
        ``rollout`` (the engine's decoding), and ``peak`` (the highest phase peak of the
        steps). None before step 2."""
        if self.STEPS not in self.phases or 1 not in self.phases:
            return None
        one, two = self.phases[1], self.phases[self.STEPS]
        first = next(iter(one.values()))[0]
        second = next(iter(two.values()))[0]
        out = dict(self.setup)

        def rise(name):
            return max(0.0, two[name][1] - two[name][0]) if name in two else 0.0
        out.update({"optimizer state": second - first, "activations": rise("update"),
                    "log-prob pass": rise("logprobs"), "weight push": rise("sync"),
                    "rollout": rise("rollout"),
                    "peak": max(p for step in self.phases.values() for _, p in step.values())})
        return out


def mallinfo2(libc=None):
    """glibc's ``mallinfo2()``: arena bytes in use (``uordblks``), free in the heap
    (``fordblks``), mmapped (``hblkhd``)..."""
    import ctypes

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
            "uordblks", "fordblks", "keepcost")]

    libc = libc or ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    return libc.mallinfo2()


def return_free_memory(threshold: int = 256 * 2**20) -> None:
    """CPU: hand the heap memory freed by a phase back to the operating system (glibc
    ``malloc_trim``). glibc keeps freed blocks below its mmap threshold (up to 32 MB each) in the
    process: after the update's activations are freed the resident set stays ~1.5 GiB higher at
    3B widths, and the weight push that follows allocates new pages on top (the rehearsal's
    two-rank job was OOM-killed there). Only when at least ``threshold`` bytes lie free in the
    heap (the tiny default job frees little: trimming it every step costs page faults in the
    next rollout). A no-op where CUDA runs or without glibc."""
    if torch.cuda.is_available():
        return
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        if mallinfo2(libc).fordblks >= threshold:
            libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


class EngineMismatchError(RuntimeError):
    """The rollout engine's log-probs left the trainer's: it samples from other weights."""


def step_record(step: int, first_round: list, everything: list, batch, updates: list[dict],
                sampling_stats: dict, phases: dict, seconds: float, dp_size: int) -> dict:
    """One step's metrics, the same on every rank: what the policy did (every group drawn,
    averaged over data parallelism), what the update measured (its loss terms, clip fractions,
    entropies and gradient norm as the mean over the step's mini-batches, i.e. its optimizer
    steps; the first mini-batch's engine-vs-trainer gap, taken before any weight changed) and
    the phase times."""
    scored = [s for g in everything for s in g.scored]
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
    record["logprob_mismatch"] = updates[0]["check/logprob_mismatch"]
    record["tokens"] *= dp_size
    measured = [k for k in updates[0]  # shared by every rank
                if (k.startswith(("loss/", "clip/", "entropy/")) or k == "grad_norm")
                and all(k in u for u in updates)]
    record.update({k: sum(float(u[k]) for u in updates) / len(updates) for k in measured})
    record.update({f"time/{k}": v for k, v in phases.items()})
    record.update(step=step, seconds=seconds, tokens_per_s=record["tokens"] / seconds)
    return record


def watch(record: dict, rollout, monitor) -> None:
    """Warn (one line) when the engine's old log-probs drift from the trainer's below the stop
    line; flag the paper's KL_prcp-hacking symptoms (``alert/perception_hacking`` = 1)."""
    mismatch = record["logprob_mismatch"]
    if (rollout.old_logprobs_from_engine   # (above the limit: stop_on_mismatch)
            and MISMATCH_WARN < mismatch <= rollout.logprob_mismatch_limit()):
        log(f"[train] warning: engine vs trainer log-probs differ by {mismatch:.2e} per "
             "token; the importance ratios are off: set rollout.old_logprobs_from_engine=false")
    if monitor.check(record):  # the paper's KL_prcp-hacking symptoms, together
        record["alert/perception_hacking"] = 1.0
        log(f"[train] ALERT step {record['step']}: perception-KL hacking suspected (KL_prcp "
             "jumped while both entropies rose): lower the perception "
             "weight (algorithm.loss.prcp_gamma=...) or turn on the double entropy loss "
             "(algorithm.loss.entropy_eta_original=0.03 algorithm.loss."
             "entropy_eta_masked=0.03)")


def stop_on_mismatch(record: dict, rollout) -> None:
    """Stop (one line) when the engine's log-probs left the trainer's: training on would
    sample from, and take old log-probs from, a policy that is not the trained one."""
    limit = rollout.logprob_mismatch_limit()
    value = record.get("logprob_mismatch", 0.0)
    if limit and not value <= limit:  # NaN stops too
        raise EngineMismatchError(
            f"step {record['step']}: the rollout engine's log-probs differ from the trainer's "
            f"by {value:.3g} per response token (limit {limit:g} for a {rollout.dtype} engine, "
            "rollout.max_logprob_mismatch); the engine is not serving the trained weights. "
            "Likely causes: weights not pushed after the update, an output head tied to the "
            "embedding not refreshed by the engine, engine and trainer dtypes or processors "
            "that differ (rollout.dtype, model.params_dtype, rollout.min/max_pixels). The "
            "metrics up to this step are in metrics.jsonl; raise the limit or set it to 0 "
            "only if this level is expected")


class Metrics:
    """Per-step metrics on rank 0: JSONL always, TensorBoard when installed, W&B when
    configured; plus the per-phase timer."""

    def __init__(self, folder: str, config, run_config: dict | None = None):
        self.path = os.path.join(folder, "metrics.jsonl")
        self.rank0 = not dist.is_initialized() or dist.get_rank() == 0
        self.jsonl = config.jsonl and self.rank0
        self.phases: dict[str, float] = {}
        self.memory: dict[str, float] = {}  # GiB: each phase's peak (mem/<phase>)
        self.step: int | None = None  # the step being run (for heartbeats)
        self.ledger: MemoryLedger | None = None  # the setup's and first steps' memory parts
        self.tensorboard = self.wandb = None
        if not self.rank0:
            return
        if config.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter  # optional (tensorboard)

                self.tensorboard = SummaryWriter(os.path.join(folder, "tensorboard"))
            except ImportError:
                log("[train] TensorBoard is not installed (pip install tensorboard): metrics go "
                     f"to {self.path} only")
        if config.wandb_project:
            import wandb  # optional: pip install wandb (build_config checks it is there)

            self.wandb = wandb.init(project=config.wandb_project, name=config.wandb_run_name,
                                    dir=folder, config=run_config)

    @contextmanager
    def phase(self, name: str):
        heartbeat(name, self.step)  # what this rank is doing, should a peer wait for it in vain
        reset_peak_memory()
        held = memory_in_use_gib() if self.ledger is not None else None
        start = time.perf_counter()
        yield
        self.phases[name] = self.phases.get(name, 0.0) + time.perf_counter() - start
        peak = peak_memory_gib()
        if self.ledger is not None:
            self.ledger.phase(self.step, name, held, peak)
        if peak is not None:
            self.memory[name] = max(self.memory.get(name, 0.0), peak)
            if self.step == 1:  # the first step's, as each phase ends (an OOM shows where)
                log(f"[train] memory: {name} of step 1 peaked at {peak:.2f} GiB (rank 0, "
                    f"{'GPU allocated' if torch.cuda.is_available() else 'resident set'})")

    def start_over(self) -> None:
        """A run that starts from step 0 in a folder with a log (a run killed before its first
        checkpoint, or resume=none): the old log is kept beside, the new one starts empty."""
        if self.jsonl and os.path.exists(self.path) and os.path.getsize(self.path):
            kept = f"{self.path[:-len('.jsonl')]}.previous-{time.strftime('%Y%m%d-%H%M%S')}.jsonl"
            os.replace(self.path, kept)
            log(f"[train] starting from step 0: the earlier log of this folder is kept as {kept}")

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

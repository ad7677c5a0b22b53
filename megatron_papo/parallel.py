"""Process-group set-up and parallel-layout checks shared by training, conversion and tests."""

from __future__ import annotations

import datetime
import json
import os
import socket
import time

import torch
import torch.distributed as dist


def all_gather_objects(obj) -> list:
    """``obj`` of every rank of the world, in rank order (``[obj]`` without a process group)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


class ParallelConfigError(ValueError):
    """A parallel layout that cannot work; the message names the setting and the fix."""


ERROR_AGREEMENT_S = 10.0
_ERROR_CHANNEL = None


def init_processes(timeout_minutes: float | None = None) -> None:
    """The default process group: from torchrun's environment (NCCL with CUDA, else gloo), or
    a world of one process on a free local port (NCCL on GPU 0 with CUDA, else gloo). A no-op
    when already initialised.

    With several processes a small gloo group with a short timeout rides along: ranks that fail
    agree there on one error line (:func:`gather_errors`)."""
    global _ERROR_CHANNEL
    if dist.is_initialized():
        return
    _ERROR_CHANNEL = None  # a group of an earlier, destroyed process group
    timeout = {"timeout": datetime.timedelta(minutes=timeout_minutes)} if timeout_minutes else {}
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # torchrun
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", **timeout)
        if dist.get_world_size() > 1:
            _ERROR_CHANNEL = dist.new_group(
                backend="gloo", timeout=datetime.timedelta(seconds=ERROR_AGREEMENT_S))
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # the torchrun variables of a world of one (a colocated vLLM engine reads them too)
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    if torch.cuda.is_available():
        torch.cuda.set_device(0)
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", rank=0,
                            world_size=1, **timeout)


def gather_errors(message: str) -> list[str] | None:
    """Every rank's error line (index = rank) if all ranks reach this within
    ``ERROR_AGREEMENT_S``; None if some did not (only this rank failed, or a peer is busy)."""
    if _ERROR_CHANNEL is None or not dist.is_initialized():
        return None
    gathered = [None] * dist.get_world_size()
    try:
        dist.all_gather_object(gathered, message, group=_ERROR_CHANNEL)
    except Exception:  # noqa: BLE001  (a timeout or a peer that is gone)
        return None
    return gathered


def initialize_model_parallel(tp: int = 1, pp: int = 1, vpp: int | None = None, cp: int = 1,
                              seed: int = 1234, timeout_minutes: float = 30) -> None:
    """Create megatron-core's model-parallel groups on an initialised default process group and
    seed the model-parallel RNG tracker (attention always forks it)."""
    # megatron-core (seconds; after apply_cpu_patches): this module's top is torch.distributed only
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    if not dist.is_initialized():
        raise ParallelConfigError(
            "torch.distributed is not initialised: launch with torchrun (or call "
            "torch.distributed.init_process_group) before building the model")
    world = dist.get_world_size()
    if world % (tp * pp * cp) != 0:
        raise ParallelConfigError(
            f"world size {world} is not divisible by tensor_model_parallel_size ({tp}) x "
            f"pipeline_model_parallel_size ({pp}) x context_parallel_size ({cp}); change the "
            "parallel sizes or the number of processes")
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp, context_parallel_size=cp,
        distributed_timeout_minutes=timeout_minutes)
    model_parallel_cuda_manual_seed(seed)


def model_device() -> torch.device:
    """Where the trainer's model, its inputs and its collectives live: this process's GPU, else
    the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def pipeline_backend() -> str:
    from megatron.core import parallel_state  # megatron-core: as in initialize_model_parallel

    group = parallel_state.get_pipeline_model_parallel_group()
    return dist.get_backend(group)


def _gloo_interleaved(config) -> bool:
    vpp = getattr(config, "virtual_pipeline_model_parallel_size", None)
    return bool(vpp) and config.pipeline_model_parallel_size > 1 and pipeline_backend() == "gloo"


def default_batch_p2p_comm(config) -> bool:
    """The ``batch_p2p_comm`` to use when the user did not choose: False for interleaved
    pipelining on gloo (see :func:`check_pipeline_communication`), megatron's True otherwise."""
    return not _gloo_interleaved(config)


def check_pipeline_communication(config) -> None:
    """Refuse interleaved pipelining with batched p2p on gloo.

    With virtual pipeline stages megatron-core posts the send to the next stage and the receive
    from the previous one as one batched ``batch_isend_irecv``. On gloo at PP=2 the previous and
    next stage are the same rank and the batched operations are matched in the wrong order: the
    results are silently wrong. Unbatched p2p (``batch_p2p_comm=False``) is exact.
    """
    if _gloo_interleaved(config) and config.batch_p2p_comm:
        raise ParallelConfigError(
            "batch_p2p_comm=True with virtual pipeline stages (virtual_pipeline_model_parallel_size="
            f"{config.virtual_pipeline_model_parallel_size}) gives wrong results on the gloo "
            "backend: set model.batch_p2p_comm=false (exact on gloo) or run on NCCL")


# --------------------------------------------------------------------------- peers that fail

HEARTBEAT_KEY = "megatron_papo/heartbeat/"
_COLLECTIVE_FAILURE = ("timed out", "connection closed", "connection reset", "broken pipe",
                       "connection refused", "nccl error", "watchdog")
_PEER_CLOSED = ("reset by peer", "closed by peer", "broken pipe")  # the peer ended or is ending
_EXIT_GRACE_S = 5.0


def _store():
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:  # noqa: BLE001  (no default group, or a torch without the helper)
        return None


def heartbeat(phase: str, step: int | None = None) -> None:
    """Record on the rendezvous store (not the process group: it outlives a hung or dead
    peer) what this rank is doing now; :func:`diagnose_collective_failure` reads it back."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    store = _store()
    if store is None:
        return
    beat = {"time": time.time(), "host": socket.gethostname(), "pid": os.getpid(),
            "phase": phase, "step": step}
    try:
        store.set(f"{HEARTBEAT_KEY}{dist.get_rank()}", json.dumps(beat))
    except Exception:  # noqa: BLE001  (the store is gone: the job is ending anyway)
        pass


def is_collective_failure(err: BaseException) -> bool:
    """A collective that timed out or lost a peer (as gloo, NCCL or the store report it)."""
    if isinstance(err, getattr(dist, "DistError", ())):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and any(key in text for key in _COLLECTIVE_FAILURE)


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` (on this host) still runs: a zombie (dead, not yet reaped by
    torchrun) counts as gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def describe_peer(rank: int, beat: dict, error: str) -> str:
    """What became of peer ``rank`` given its last heartbeat ``beat`` and the failed collective's
    ``error`` text: died (process gone), hangs (process there), or, on another host, its last
    report."""
    age = time.time() - beat["time"]
    where = f"'{beat['phase']}'" + (f" of step {beat['step']}" if beat["step"] is not None else "")
    here = beat["host"] == socket.gethostname()
    if here and any(k in error.lower() for k in _PEER_CLOSED):
        # A killed peer's sockets close while the kernel is still tearing the process down (its
        # /proc entry shows it running for a moment): give it a few seconds to become a zombie.
        deadline = time.monotonic() + _EXIT_GRACE_S
        while process_alive(beat["pid"]) and time.monotonic() < deadline:
            time.sleep(0.05)
    if here and not process_alive(beat["pid"]):
        what = f"rank {rank} died (its process {beat['pid']} is gone) in {where}"
    elif here:
        what = (f"rank {rank} hangs: in {where} for {age:.0f} s, its process {beat['pid']} "
                "still there")
    else:
        what = f"rank {rank} on {beat['host']} last reported {where}, {age:.0f} s ago"
    return what


def diagnose_collective_failure(err: BaseException) -> str:
    """One line for a collective that failed: which peer stopped (the rank whose heartbeat is
    oldest: the others moved on to the collective it never reached), in which phase and step,
    how long ago, and whether its process is gone."""
    rank, world = dist.get_rank(), dist.get_world_size()
    first = (str(err).strip().splitlines() or [type(err).__name__])[0]
    first = first.split("] ", 1)[-1].split(". ", 1)[0][:200]  # gloo's location and advice off
    beats = {}
    store = _store()
    for peer in range(world):
        if store is None:
            break
        try:
            key = f"{HEARTBEAT_KEY}{peer}"
            if store.check([key]):
                beats[peer] = json.loads(store.get(key))
        except Exception:  # noqa: BLE001
            break
    line = f"rank {rank}: a collective operation failed ({first})"
    peers = {p: b for p, b in beats.items() if p != rank}
    if not peers:
        return line + "; a peer rank hung or died (see its own output)"
    culprit = min(peers, key=lambda p: peers[p]["time"])
    beat = peers[culprit]
    what = describe_peer(culprit, beat, first)
    return (f"{line}: {what}; the job stops (a phase that legitimately takes longer needs a "
            "larger trainer.collective_timeout_minutes)")

"""The main job's own processes when it is started as one: ``python -m megatron_papo.train``.

``parallel.processes`` decides how many: ``auto`` (the default) is, for the embedded tiny model on
a CPU machine, one per core, at most :data:`AUTO_MAX`, rounded to a layout the configuration
accepts (TP x PP x DP with DP dividing the prompts per step); one process for a real checkpoint
(``model.hf_dir``: each DP rank would hold a replica; its layouts are torchrun's, sized by
tools/memory_plan.py) and where CUDA is present (GPU jobs are launched by torchrun or
``scripts/train.sh``, one rank per GPU); a number asks for exactly that many. Under
torchrun (``RANK`` and ``WORLD_SIZE`` set) nothing is started: torchrun decided.

Why: one process of the tiny default job keeps ~1.1 of a machine's cores busy (small tensors,
Python-bound rollout and update), and the update is data-parallel invariant (tested), so a
second data-parallel rank on a 2-core machine runs the same math in 0.64x the step time
(docs/benchmarks.md).

The processes are this module's children, each told to die with it (``PR_SET_PDEATHSIG``): a
``kill -9`` of the command leaves nothing behind. SIGTERM and SIGUSR1 are passed on (every rank
saves a checkpoint and stops); Ctrl-C reaches the ranks from the terminal. When a rank fails,
the others get :data:`GRACE_S` seconds to report, then are stopped; the command exits with the
first failure's code."""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time

import psutil

from .config import AUTO_PROCESSES_MAX as AUTO_MAX
from .config import ConfigError, build_config, check_processes

GRACE_S = 20.0      # a failed rank's peers get this long to print their own line
# the command's start time (epoch seconds) for the ranks' val/elapsed (train/metrics.py)
COMMAND_STARTED_ENV = "MEGATRON_PAPO_COMMAND_STARTED"


def under_launcher() -> bool:
    """True when torchrun (or this module) started this process as one rank of several."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def processes_to_start(raw: dict, cores: int | None = None, cuda: bool | None = None) -> int:
    """How many processes ``python -m megatron_papo.train`` runs for this configuration (1: this
    one, nothing started). ``cores``/``cuda``: this machine's unless given (tests)."""
    if under_launcher():
        return 1
    value = check_processes((raw.get("parallel") or {}).get("processes", "auto"))
    if value != "auto":
        return value
    if (raw.get("model") or {}).get("hf_dir"):
        return 1   # a real checkpoint: every DP rank holds a replica; layouts: torchrun
    if cuda if cuda is not None else _cuda_available():
        return 1
    p = raw.get("parallel") or {}
    model_parallel = (p.get("tensor_model_parallel_size", 1)
                      * p.get("pipeline_model_parallel_size", 1))
    cores = cores if cores is not None else _usable_cores()
    most = max(min(cores, AUTO_MAX) // model_parallel, 1)
    for dp in range(most, 0, -1):
        with contextlib.suppress(ConfigError):
            build_config(raw, dp * model_parallel)
            return dp * model_parallel
    return 1   # no layout fits: one process, whose own check names the setting


def _cuda_available() -> bool:
    """torch.cuda.is_available(), without importing torch (~1.6 s) where the installed build has
    no GPU support at all (torch/version.py names the CUDA/HIP/XPU version the build has)."""
    spec = importlib.util.find_spec("torch")
    version = os.path.join(os.path.dirname(spec.origin), "version.py") if spec and spec.origin \
        else None
    if version and os.path.exists(version):
        built = {}
        with open(version) as f:
            for line in f:
                name, _, value = line.partition("=")
                built[name.split(":")[0].strip()] = value.strip()
        if all(built.get(k, "None") == "None" for k in ("cuda", "hip", "xpu")):
            return False
    import torch

    return torch.cuda.is_available()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent(parent: int):
    """preexec_fn: the child is killed when this process dies, whatever kills it."""
    def set_death_signal():
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL("libc.so.6", use_errno=True)
            libc.prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG
        if os.getppid() != parent:          # the parent died before the call above
            os._exit(1)
    return set_death_signal


def _exit_code(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


def spawn(processes: int, argv: list[str], run_dir: str | None) -> int:
    """Runs ``python -m megatron_papo.train *argv`` as ``processes`` ranks on this machine and
    waits for them; returns the command's exit code."""
    args = [a for a in argv if not a.startswith(("hydra.run.dir=", "++hydra.run.dir="))]
    if run_dir:
        args.append(f"hydra.run.dir={run_dir}")   # one Hydra folder, not one per rank
    base = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
                WORLD_SIZE=str(processes), LOCAL_WORLD_SIZE=str(processes),
                GROUP_RANK="0", GROUP_WORLD_SIZE="1", ROLE_WORLD_SIZE=str(processes),
                # the ranks time the command (val/elapsed), not themselves
                **{COMMAND_STARTED_ENV: str(psutil.Process().create_time())})
    ranks: list[subprocess.Popen] = []

    def forward(signum, _frame):
        for rank in ranks:
            with contextlib.suppress(ProcessLookupError):
                rank.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGUSR1)}
    # Ctrl-C reaches every rank from the terminal; this process waits for them (a Python
    # handler, not SIG_IGN: an ignored signal would stay ignored in the ranks)
    previous[signal.SIGINT] = signal.signal(signal.SIGINT, lambda *_: None)
    try:
        for rank in range(processes):
            env = dict(base, RANK=str(rank), LOCAL_RANK=str(rank), ROLE_RANK=str(rank))
            ranks.append(subprocess.Popen([sys.executable, "-m", "megatron_papo.train", *args],
                                          env=env, preexec_fn=_die_with_parent(os.getpid())))
        return _wait(ranks)
    finally:
        for rank in ranks:
            if rank.returncode is None:
                rank.kill()
                rank.wait()
        for s, handler in previous.items():
            signal.signal(s, handler)


def _wait(ranks: list[subprocess.Popen]) -> int:
    """The first non-zero exit code (the others get GRACE_S to end, then are killed), else 0."""
    alive = list(ranks)
    while alive:
        pid, status = os.wait()
        done = next((r for r in alive if r.pid == pid), None)
        if done is None:
            continue
        done.returncode = os.waitstatus_to_exitcode(status)
        alive.remove(done)
        if done.returncode != 0:
            deadline = time.monotonic() + GRACE_S
            for rank in alive:
                try:
                    rank.wait(timeout=max(deadline - time.monotonic(), 0.0))
                except subprocess.TimeoutExpired:
                    rank.kill()
                    rank.wait()
            return _exit_code(done.returncode)
    return 0

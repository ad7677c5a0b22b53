"""Run a function on N ranks of a real ``torch.distributed`` world (gloo on CPU, NCCL on GPU).

``run_distributed(fn, world_size, *args, **kwargs)`` calls ``fn(*args, **kwargs)`` on every rank
and returns the list of per-rank results (rank order). ``fn`` must be importable by reference (a
module-level function of a test module or of the package).

Fast: the worker processes are spawned once per world size and reused by later calls. Each worker
imports torch and megatron-core and applies the CPU patches once (~5 s); a call then costs only the
function's own time. After every call the worker resets megatron-core's global state (model-parallel
groups, RNG tracker, micro-batch calculator, default dtype) so calls do not leak into each other.

Readable failures: a rank that raises has its traceback in the ``DistributedTestError`` message; a
rank that dies is reported with its exit code; ranks still running when another failed, or when the
hard ``timeout`` expires, are reported with a dump of their Python stacks (``faulthandler``), so a
hung collective fails its test in seconds and shows where each rank was waiting. After any failure
the pool is discarded and the next call starts fresh workers.
"""

from __future__ import annotations

import atexit
import datetime
import faulthandler
import multiprocessing
import multiprocessing.connection
import os
import pickle
import signal
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

# Grace period after the first failing rank: the others get this long to finish or fail on their
# own before they are reported as blocked and the pool is killed. Not a sleep: we wait on pipes.
FAILURE_GRACE_S = 3.0
DEFAULT_TIMEOUT_S = 120.0
STARTUP_TIMEOUT_S = 180.0


class DistributedTestError(AssertionError):
    """One or more ranks failed; the message holds every rank's traceback or stack dump."""


class DistributedTestTimeout(DistributedTestError):
    """The call did not finish on every rank within its timeout."""


# --------------------------------------------------------------------------------------------
# worker side
# --------------------------------------------------------------------------------------------


def _reset_global_state() -> None:
    """Undo what a test may have set in megatron-core's and torch's globals."""
    import torch  # not at the top: see _worker_main

    try:
        from megatron.core import parallel_state  # after the worker's apply_cpu_patches

        parallel_state.destroy_model_parallel()
    except Exception:  # noqa: BLE001 - best effort; a broken state is caught by the next test
        pass
    try:
        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker  # as above

        get_cuda_rng_tracker().reset()
    except Exception:  # noqa: BLE001
        pass
    try:
        # megatron-core: as above
        from megatron.core.num_microbatches_calculator import destroy_num_microbatches_calculator

        destroy_num_microbatches_calculator()
    except Exception:  # noqa: BLE001
        pass
    torch.set_default_dtype(torch.float32)
    _close_vllm()
    _destroy_subgroups()


def _destroy_subgroups() -> None:
    """Every process group but the default one. megatron-core's ``destroy_model_parallel`` only
    forgets its groups and a vLLM engine makes a dozen more: in a worker reused by many tests the
    gloo groups (two polling threads per peer each) piled up to ~900 threads per process and
    slowed every later test."""
    # not at the top: see _worker_main
    import torch.distributed as dist
    from torch.distributed import distributed_c10d as c10d

    if not dist.is_initialized():
        return
    default = c10d._get_default_group()
    for group in list(c10d._world.pg_map):
        if group is not default:
            try:
                dist.destroy_process_group(group)
            except Exception:  # noqa: BLE001 - best effort
                pass


def _close_vllm() -> None:
    """Engines a failed test left open, and vLLM's own groups (the default group stays)."""
    engine = sys.modules.get("megatron_papo.rollout.engine")
    if engine is not None:
        try:
            engine.close_all_engines()
        except Exception:  # noqa: BLE001
            pass
    vps = sys.modules.get("vllm.distributed.parallel_state")
    if vps is not None and vps._WORLD is not None:
        from megatron_papo.compat.vllm import engine_shutdown_keeps_process_group  # imports torch

        try:
            with engine_shutdown_keeps_process_group():
                vps.destroy_model_parallel()
                vps.destroy_distributed_environment()
        except Exception:  # noqa: BLE001
            pass


def _worker_main(rank: int, world_size: int, store_port: int, conn, dump_path: str, threads: int):
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(store_port),
    )
    # A process group of its own: what the worker starts (dist_checkpointing's multiprocessing
    # Manager, ...) is killed with it and never outlives the pool.
    os.setpgid(0, 0)
    dump_file = open(dump_path, "w")  # noqa: SIM115 - lives as long as the worker
    faulthandler.register(signal.SIGUSR1, file=dump_file, all_threads=True)
    try:
        # torch and the CPU patches only here: after the worker's environment, process group
        # and stack-dump handler (this module is imported first, to unpickle the target)
        import torch
        import torch.distributed as dist
        from megatron_papo.compat import apply_cpu_patches

        torch.set_num_threads(threads)
        apply_cpu_patches()
        use_cuda = torch.cuda.is_available()
        if use_cuda:
            torch.cuda.set_device(rank % torch.cuda.device_count())
        store = dist.TCPStore("127.0.0.1", store_port, world_size, is_master=False,
                              timeout=datetime.timedelta(seconds=STARTUP_TIMEOUT_S))
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo", store=store, rank=rank,
            world_size=world_size, timeout=datetime.timedelta(seconds=STARTUP_TIMEOUT_S),
        )
        conn.send_bytes(pickle.dumps(("ready", None)))
    except BaseException:  # noqa: BLE001
        conn.send_bytes(pickle.dumps(("error", traceback.format_exc())))
        return
    while True:
        try:
            message = conn.recv_bytes()
        except EOFError:
            return
        task = pickle.loads(message)
        if task is None:
            break
        fn, args, kwargs = task
        try:
            result = fn(*args, **kwargs)
            payload = pickle.dumps(("ok", result))
        except BaseException:  # noqa: BLE001 - every failure goes back to the parent
            payload = pickle.dumps(("error", traceback.format_exc()))
        finally:
            _reset_global_state()
        conn.send_bytes(payload)
    try:
        torch.distributed.destroy_process_group()
    except Exception:  # noqa: BLE001
        pass


# --------------------------------------------------------------------------------------------
# parent side
# --------------------------------------------------------------------------------------------


@dataclass
class _Pool:
    world_size: int
    processes: list = field(default_factory=list)
    conns: list = field(default_factory=list)
    dump_paths: list = field(default_factory=list)
    store: Any = None
    tmpdir: Any = None

    def alive(self) -> bool:
        return all(p.is_alive() for p in self.processes)

    def stack_dumps(self, ranks) -> dict[int, str]:
        """Ask each listed rank for a faulthandler dump of its Python stacks."""
        dumps = {}
        for rank in ranks:
            proc = self.processes[rank]
            if not proc.is_alive():
                continue
            before = os.path.getsize(self.dump_paths[rank])
            os.kill(proc.pid, signal.SIGUSR1)
            deadline = time.monotonic() + 2.0
            # faulthandler writes from the signal handler; poll the file until it grows.
            while time.monotonic() < deadline and os.path.getsize(self.dump_paths[rank]) == before:
                multiprocessing.connection.wait([proc.sentinel], timeout=0.05)
            with open(self.dump_paths[rank]) as f:
                f.seek(before)
                dumps[rank] = f.read().strip() or "(no stack dump received)"
        return dumps

    def kill(self) -> None:
        """Kill every worker and everything it started (its process group)."""
        for proc in self.processes:
            if proc.pid is None:
                continue
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            if proc.is_alive():
                proc.kill()
        for proc in self.processes:
            proc.join(timeout=10)
        for conn in self.conns:
            conn.close()
        if self.tmpdir is not None:
            self.tmpdir.cleanup()
            self.tmpdir = None

    def close(self) -> None:
        for conn in self.conns:
            try:
                conn.send_bytes(pickle.dumps(None))
            except (OSError, ValueError):
                pass
        multiprocessing.connection.wait([p.sentinel for p in self.processes], timeout=10)
        self.kill()


_POOLS: dict[int, _Pool] = {}


def _threads_per_rank(world_size: int) -> int:
    return max(1, (os.cpu_count() or 1) // world_size)


def _start_pool(world_size: int) -> _Pool:
    import torch.distributed as dist  # not at the top: see _worker_main

    ctx = multiprocessing.get_context("spawn")
    pool = _Pool(world_size=world_size, tmpdir=tempfile.TemporaryDirectory(prefix="mp_harness_"))
    # The parent owns the rendezvous store on a port the OS chose: no free-port race.
    pool.store = dist.TCPStore("127.0.0.1", 0, world_size, is_master=True, wait_for_workers=False,
                               timeout=datetime.timedelta(seconds=STARTUP_TIMEOUT_S))
    for rank in range(world_size):
        parent_conn, child_conn = ctx.Pipe(duplex=True)
        dump_path = os.path.join(pool.tmpdir.name, f"rank{rank}.stack")
        proc = ctx.Process(
            target=_worker_main,
            args=(rank, world_size, pool.store.port, child_conn, dump_path,
                  _threads_per_rank(world_size)),
            name=f"mp-harness-rank{rank}",
            daemon=False,  # dist_checkpointing.save starts a multiprocessing Manager (a child)
        )
        proc.start()
        child_conn.close()
        pool.processes.append(proc)
        pool.conns.append(parent_conn)
        pool.dump_paths.append(dump_path)
    replies = _collect(pool, time.monotonic() + STARTUP_TIMEOUT_S, what="worker start-up")
    failed = {r: v for r, v in replies.items() if v[0] != "ready"}
    if failed or len(replies) < world_size:
        report = _format_report(pool, replies, "starting the workers", STARTUP_TIMEOUT_S)
        pool.kill()
        raise DistributedTestError(report)
    return pool


def _collect(pool: _Pool, deadline: float, what: str) -> dict[int, tuple]:
    """Wait for one reply per rank; stop early FAILURE_GRACE_S after the first failure."""
    replies: dict[int, tuple] = {}
    pending = {conn: rank for rank, conn in enumerate(pool.conns)}
    sentinels = {pool.processes[rank].sentinel: rank for rank in range(pool.world_size)}
    while pending:
        now = time.monotonic()
        if now >= deadline:
            break
        ready = multiprocessing.connection.wait(
            list(pending) + [s for s, r in sentinels.items() if r in pending.values()],
            timeout=deadline - now,
        )
        for obj in ready:
            if obj in pending:
                rank = pending.pop(obj)
                try:
                    replies[rank] = pickle.loads(obj.recv_bytes())
                except (EOFError, OSError):  # the pipe closed: the process is exiting
                    pool.processes[rank].join(timeout=10)
                    replies[rank] = ("died", pool.processes[rank].exitcode)
            elif obj in sentinels and sentinels[obj] in pending.values():
                rank = sentinels[obj]
                conn = pool.conns[rank]
                if conn.poll():  # it answered just before exiting
                    continue
                pending.pop(conn)
                pool.processes[rank].join(timeout=10)
                replies[rank] = ("died", pool.processes[rank].exitcode)
        if any(v[0] in ("error", "died") for v in replies.values()):
            deadline = min(deadline, time.monotonic() + FAILURE_GRACE_S)
    return replies


def _format_report(pool: _Pool, replies: dict, what: str, timeout: float) -> str:
    lines = [f"{what} failed on a world of {pool.world_size} ranks:"]
    missing = [r for r in range(pool.world_size) if r not in replies]
    another_failed = any(v[0] in ("error", "died") for v in replies.values())
    why = (f"still running {FAILURE_GRACE_S:.0f} s after another rank failed" if another_failed
           else f"blocked or too slow: hard timeout {timeout:.0f} s")
    dumps = pool.stack_dumps(missing)
    for rank in range(pool.world_size):
        status = replies.get(rank)
        if status is None:
            lines.append(f"\n===== rank {rank}: did not finish ({why}). Its Python stacks:\n"
                         f"{dumps.get(rank, '(dead)')}")
        elif status[0] == "error":
            lines.append(f"\n===== rank {rank}: raised\n{status[1]}")
        elif status[0] == "died":
            lines.append(f"\n===== rank {rank}: process died (exit code {status[1]}); its stdout/"
                         "stderr are in the captured output")
        else:
            lines.append(f"\n===== rank {rank}: finished")
    return "\n".join(lines)


def run_distributed(fn: Callable, world_size: int, *args, timeout: float = DEFAULT_TIMEOUT_S,
                    **kwargs) -> list:
    """Run ``fn(*args, **kwargs)`` on ``world_size`` ranks and return their results in rank order.

    Raises :class:`DistributedTestError` (an ``AssertionError``, so pytest shows it as a test
    failure) if any rank raises or dies, and :class:`DistributedTestTimeout` if some rank has not
    finished after ``timeout`` seconds. The message holds every rank's traceback or stack dump.
    """
    pool = _POOLS.get(world_size)
    if pool is None or not pool.alive():
        if pool is not None:
            pool.kill()
        pool = _POOLS[world_size] = _start_pool(world_size)
    task = pickle.dumps((fn, args, kwargs))
    for conn in pool.conns:
        conn.send_bytes(task)
    replies = _collect(pool, time.monotonic() + timeout, what=fn.__qualname__)
    if len(replies) == world_size and all(v[0] == "ok" for v in replies.values()):
        return [replies[r][1] for r in range(world_size)]
    name = f"{fn.__module__}.{fn.__qualname__}"
    report = _format_report(pool, replies, name, timeout)
    pool.kill()
    del _POOLS[world_size]
    timed_out = len(replies) < world_size and not any(
        v[0] in ("error", "died") for v in replies.values())
    raise (DistributedTestTimeout if timed_out else DistributedTestError)(report)


def shutdown_worker_pools() -> None:
    """Stop every worker process (called at interpreter exit)."""
    for pool in list(_POOLS.values()):
        pool.close()
    _POOLS.clear()


atexit.register(shutdown_worker_pools)

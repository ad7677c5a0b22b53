"""The multi-process harness itself: results, readable failures, hard timeouts, reuse."""

import os

import pytest
import torch
import torch.distributed as dist

from megatron_papo.testing import DistributedTestError, DistributedTestTimeout, run_distributed


def _rank_and_allreduce(value):
    t = torch.tensor([float(dist.get_rank() + value)])
    dist.all_reduce(t)
    return dist.get_rank(), dist.get_world_size(), t.item(), os.getpid()


def _rank1_raises():
    if dist.get_rank() == 1:
        raise ValueError("rank one is broken on purpose")
    dist.barrier()  # rank 0 blocks here: it must be reported as blocked, not hang the test


def _rank1_hangs():
    if dist.get_rank() == 1:
        dist.barrier()  # the other rank never joins
    return "rank0 done"


def _rank0_dies():
    if dist.get_rank() == 0:
        os._exit(7)
    return "survivor"


def test_results_in_rank_order_and_pool_reused():
    first = run_distributed(_rank_and_allreduce, 2, 10)
    assert [r[:3] for r in first] == [(0, 2, 21.0), (1, 2, 21.0)]
    second = run_distributed(_rank_and_allreduce, 2, value=0)
    assert [r[2] for r in second] == [1.0, 1.0]
    # the same worker processes served both calls
    assert [r[3] for r in first] == [r[3] for r in second]


def test_raising_rank_traceback_is_reported():
    """Catches: a rank's exception lost, or the other (blocked) rank hanging the test."""
    with pytest.raises(DistributedTestError) as info:
        run_distributed(_rank1_raises, 2, timeout=60)
    message = str(info.value)
    assert "rank 1: raised" in message
    assert "ValueError: rank one is broken on purpose" in message
    assert "rank 0: did not finish" in message and "_rank1_raises" in message


def test_hung_rank_fails_within_timeout_with_its_stack():
    """Catches: a hung collective that would hang CI instead of failing this test."""
    with pytest.raises(DistributedTestTimeout) as info:
        run_distributed(_rank1_hangs, 2, timeout=4)
    message = str(info.value)
    assert "rank 0: finished" in message
    assert "rank 1: did not finish" in message
    assert "_rank1_hangs" in message  # the stack dump shows where it was blocked


def test_dying_rank_is_reported_and_pool_recovers():
    with pytest.raises(DistributedTestError) as info:
        run_distributed(_rank0_dies, 2, timeout=60)
    assert "rank 0: process died (exit code 7)" in str(info.value)
    assert [r[2] for r in run_distributed(_rank_and_allreduce, 2, 1)] == [3.0, 3.0]


def _make_groups_and_count_threads():
    from megatron_papo.parallel import initialize_model_parallel

    initialize_model_parallel(1, 2)
    return len(os.listdir("/proc/self/task"))


def test_process_groups_of_a_call_do_not_outlive_it():
    """Each call builds megatron-core's groups; without the harness destroying them between calls
    a reused worker gained ~50 gloo threads per call (900 after a full suite, slowing it down)."""
    counts = [run_distributed(_make_groups_and_count_threads, 2)[0] for _ in range(4)]
    assert counts[-1] <= counts[0] + 2, counts


def _start_a_child():
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    return child.pid


def test_what_a_worker_starts_does_not_outlive_the_pool():
    """A worker's own child (as dist_checkpointing's multiprocessing Manager is) used to survive
    the pool's shutdown as an orphan; workers now lead a process group that is killed with them."""
    from megatron_papo.testing.distributed import shutdown_worker_pools

    import time

    def running(pid):
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is gone
        except FileNotFoundError:
            return False

    pids = run_distributed(_start_a_child, 2)
    assert all(running(pid) for pid in pids)
    shutdown_worker_pools()
    deadline = time.monotonic() + 10  # a killed process takes a moment to leave /proc
    while any(running(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(running(pid) for pid in pids), "a child outlived its worker"

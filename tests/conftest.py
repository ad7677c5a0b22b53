"""Applies the CPU patches once in the pytest process (workers apply them themselves), and fails
the run if any process it started outlives it.

Every process of a test run inherits a marker in its environment; at the end of the session the
worker pools are shut down, processes still carrying the marker get 15 s to exit, and any left
after that are killed and named, and the session fails: an orphaned worker, vLLM engine or
dist-checkpoint writer is a bug (it holds memory and cores on a CI machine)."""

import os
import uuid

import pytest

from megatron_papo.compat import apply_cpu_patches

apply_cpu_patches()

RUN_MARKER = "MEGATRON_PAPO_TEST_RUN"
GRACE_S = 15.0


@pytest.fixture(scope="session")
def single_run(tmp_path_factory):
    """The small main job on one process, once per session: (its output folder, the completed
    process). It leaves a training checkpoint (checkpoints/step_00000002), metrics and an HF
    export (hf/): the artifacts users hand to evaluate, perception_map, publish, the converter."""
    from train_utils import SMALL, run_main_job

    out = str(tmp_path_factory.mktemp("train") / "run")
    return out, run_main_job(SMALL, out)


# The files that take longest (minutes: main jobs, the fitted counting model), longest first: the
# two workers (pyproject's addopts) start with them instead of ending on one of them alone.
LONGEST_FIRST = ("test_train.py", "test_checkpoint.py", "test_perception.py", "test_rehearse.py",
                 "test_rollout.py",
                 "test_evaluate.py", "test_conversion.py")


def pytest_collection_modifyitems(session, config, items):
    def rank(item):
        name = os.path.basename(str(item.fspath))
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)
    items.sort(key=rank)  # stable: the order inside a file and among the others stays


def pytest_configure(config):
    os.environ[RUN_MARKER] = uuid.uuid4().hex  # a nested run watches its own processes


def _run_processes():
    """Processes of this test run other than pytest itself (and its multiprocessing resource
    tracker, which exits with it)."""
    import psutil

    marker, me = os.environ.get(RUN_MARKER), os.getpid()
    found = []
    for process in psutil.process_iter():
        try:
            if process.pid == me or process.environ().get(RUN_MARKER) != marker:
                continue
            if process.ppid() == me and "resource_tracker" in " ".join(process.cmdline()):
                continue
            found.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


@pytest.hookimpl(trylast=True)  # after pytest-xdist has shut its workers down
def pytest_sessionfinish(session, exitstatus):
    import psutil

    from megatron_papo.testing.distributed import shutdown_worker_pools

    shutdown_worker_pools()
    _, alive = psutil.wait_procs(_run_processes(), timeout=GRACE_S)
    if not alive:
        return
    names = []
    for process in alive:
        try:
            names.append(f"pid {process.pid}: {' '.join(process.cmdline())[:160]}")
            process.kill()
        except psutil.Error:
            continue
    if names:
        print(f"\nERROR: {len(names)} process(es) started by the tests outlived them (killed "
              "now):\n  " + "\n  ".join(names))
        session.exitstatus = 1

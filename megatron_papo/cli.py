"""What the command-line entry points share: input the user has to fix ends in one line on
stderr and exit code 2, never a traceback, and under torchrun that line is printed once."""

from __future__ import annotations

import errno
import logging
import os
import sys
import tempfile
import traceback

# the error types (by name: importing them all would pull in every subsystem) that name the
# user's file, key, column or tensor and the fix
USER_ERRORS = frozenset({
    "ConfigError", "DataError", "RolloutInputError", "RewardError", "ModelConfigError",
    "ParallelConfigError", "MappingError", "HFCheckpointError", "ConversionError",
    "OutputExistsError", "OutputWriteError", "EvaluationError", "PerceptionError",
    "BenchmarkError", "PublishError", "EngineMismatchError", "ModelPathError",
    "FolderLockedError",
})

_OS_HINTS = {
    errno.ENOSPC: "the disk is full: free space there or choose another location",
    errno.EDQUOT: "the disk quota is exceeded: free space or choose another location",
    errno.EFBIG: "a file outgrew the size limit (ulimit -f or the file system's): raise it or "
                 "choose another location",
    errno.EACCES: "fix its permissions or choose another path",
    errno.EPERM: "fix its permissions or choose another path",
    errno.EROFS: "the file system is read-only: choose another path",
    errno.ENOENT: "check the path",
    errno.ENOTDIR: "a part of the path is a file, not a folder: check the path",
    errno.EISDIR: "a folder stands where a file is expected: check the path",
}


def quiet_redundant_logs() -> None:
    """dist_checkpointing logs a failed write before raising it; the raised error is reported
    (one line, naming the output), so the log line would only say it twice. megatron-core's INFO
    lines (its FSDP module's import notes, the DDP and optimizer configurations, every parameter
    of every gradient bucket: ~100 lines per rank before the first step) bury the job's own
    output; its warnings and errors still show. Call it before megatron-core is imported."""
    logging.getLogger("megatron.core").setLevel(logging.WARNING)
    logging.getLogger("megatron.core.dist_checkpointing.strategies.filesystem_async").setLevel(
        logging.CRITICAL)


def is_user_error(err: BaseException) -> bool:
    """An error the user fixes (bad input; a named file that is missing, unreadable or on a
    full disk), reported in one line."""
    return type(err).__name__ in USER_ERRORS or (isinstance(err, OSError)
                                                 and err.filename is not None)


def describe(err: BaseException) -> str:
    """The one line for a user error: an OSError names its file, the cause and the fix."""
    if isinstance(err, OSError) and type(err).__name__ not in USER_ERRORS:
        cause = err.strerror or str(err)
        where = err.filename or "a file"
        if err.filename2:
            where = f"{err.filename} -> {err.filename2}"
        hint = _OS_HINTS.get(err.errno)
        return f"{where}: {cause}" + (f" ({hint})" if hint else "")
    return str(err)


def _rank_and_world() -> tuple[int, int]:
    import torch.distributed as dist  # torch: this module stays torch-free (instant --help)

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), 1


def report(err: BaseException | str) -> None:
    """Print the error line once for the whole job.

    Under torchrun the ranks that hit the same error at the same point (every rank validating
    the same input) agree through a side channel of the process group (:func:`parallel.gather_errors`)
    and rank 0 prints it once; a rank whose peers do not join within a few seconds (only it hit
    the error) prints its own line, prefixed with its rank."""
    message = err if isinstance(err, str) else describe(err)
    rank, world = _rank_and_world()
    if world > 1:
        from megatron_papo.parallel import gather_errors  # imports torch (see _rank_and_world)

        messages = gather_errors(message)
        if messages is not None:
            if rank == 0:
                distinct = sorted(set(messages), key=messages.index)
                for text in distinct:
                    ranks = [r for r, m in enumerate(messages) if m == text]
                    who = "" if len(distinct) == 1 else f"ranks {ranks}: "
                    print(f"error: {who}{text}", file=sys.stderr, flush=True)
            return
        message = f"rank {rank}: {message}"
    print(f"error: {message}", file=sys.stderr, flush=True)


def internal_error(err: BaseException, prog: str, log_dir: str | None = None) -> int:
    """An exception that no user-error handling caught (a bug, or a failure nobody foresaw): the
    traceback goes to a log file (``log_dir``, e.g. the run folder, else the temp folder), the
    terminal gets one line with the cause and that file. Returns the exit code (1)."""
    rank, world = _rank_and_world()
    folder = log_dir if log_dir and os.path.isdir(log_dir) else tempfile.gettempdir()
    name = f"{prog}-error" + (f"-rank{rank}" if world > 1 else "") + f"-{os.getpid()}.log"
    path = os.path.join(folder, name)
    text = "".join(traceback.format_exception(type(err), err, err.__traceback__))
    try:
        with open(path, "w") as f:
            f.write(text)
        where = f"the traceback is in {path}"
    except OSError:
        where = "the traceback could not be written: " + text.strip().splitlines()[-1]
    cause = (str(err).strip().splitlines() or [""])[0][:300]
    who = f"rank {rank}: " if world > 1 else ""
    print(f"error: {who}{prog} failed unexpectedly ({type(err).__name__}: {cause}); {where}. "
          "This is a bug: please report it with that file.", file=sys.stderr, flush=True)
    return 1


def fail(err: BaseException | str) -> None:
    """Print the one-line error (once per job) and exit with code 2."""
    report(err)
    sys.exit(2)


def run_main(run, args, prog: str = "megatron_papo") -> int:
    """A command-line entry point: the process group (torchrun's or a world of one), ``run(args)``,
    a user error as one line and exit 2, any other exception as one line naming the log file
    that holds its traceback (exit 1), and the process group torn down in every case."""
    # torch: this module stays torch-free (instant --help and argument errors)
    import torch.distributed as dist
    from megatron_papo.parallel import init_processes

    init_processes()
    try:
        run(args)
    except Exception as err:  # noqa: BLE001
        if not is_user_error(err):
            sys.exit(internal_error(err, prog))
        fail(err)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0

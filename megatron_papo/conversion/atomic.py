"""Write a checkpoint folder so that a crash never leaves one that looks complete.

Every rank writes into ``<out>.incomplete-<id>`` next to the target; after all ranks finished,
rank 0 moves it to ``<out>`` in one rename (the old folder, with ``force``, is first renamed to
``<out>.replaced-<id>`` and removed after). On failure the temporary folder is removed and
``<out>`` is untouched. A run killed outright cannot clean up: the next write to the same
``<out>`` finds those folders, says so, and removes the ones whose writer is gone (a marker file
inside names its host and process)."""

from __future__ import annotations

import contextlib
import errno
import glob
import os
import shutil
import socket
import tempfile
import uuid

import torch.distributed as dist

from megatron_papo.parallel import process_alive

OWNER_FILE = ".megatron_papo_writer"
INCOMPLETE = ".incomplete-"
REPLACED = ".replaced-"


class OutputExistsError(FileExistsError):
    pass


class OutputWriteError(OSError):
    """Writing the output failed (full disk, quota, permissions); names the output, the cause
    and the fix. Whatever was there before is intact."""

    def __str__(self) -> str:
        return self.args[0]


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _broadcast(value):
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def overlapping_input(out: str, inputs) -> str | None:
    """The first of ``inputs`` that ``out`` is, contains or lies inside (None if none): writing
    there, with ``--force`` above all, would destroy the source."""
    target = os.path.realpath(out)
    for path in inputs:
        if not path:
            continue
        source = os.path.realpath(path)
        if os.path.commonpath([target, source]) in (target, source):
            return path
    return None


def _check_writable(out: str) -> None:
    """Create (and remove) a folder where ``out`` will go, before any heavy work."""
    parent = os.path.dirname(os.path.abspath(out))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise OutputWriteError(f"cannot write {out}: {parent} is a file, not a folder; choose "
                               "another output path")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".megatron_papo-write-test-", dir=parent))
    except OSError as err:
        raise OutputWriteError(f"cannot write {out}: creating a folder in {parent} failed "
                               f"({err.strerror}); choose another output path or fix the "
                               "permissions") from None


def check_output(out: str, force: bool, inputs=()) -> None:
    clash = overlapping_input(out, inputs)
    if clash is not None:
        raise OutputExistsError(
            f"output {out} overlaps the input {clash} (the same folder, inside it or containing "
            "it): writing there would destroy the source; choose an output outside it")
    if os.path.exists(out) and not force:
        raise OutputExistsError(f"output {out} already exists: choose another path or pass "
                                "--force to replace it")
    _check_writable(out)


def _owner(path: str) -> tuple[str, int] | None:
    try:
        with open(os.path.join(path, OWNER_FILE)) as f:
            host, pid = f.read().split()
        return host, int(pid)
    except (OSError, ValueError):
        return None


def _size(path: str) -> int:
    total = 0
    for folder, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.path.getsize(os.path.join(folder, name))
    return total


def clean_leftovers(out: str, log=print) -> list[str]:
    """Remove ``<out>.incomplete-*`` and ``<out>.replaced-*`` folders left by killed runs
    (those whose writer, by the marker inside, is no longer running on this host), saying what
    was found; returns the removed paths. A folder another live process is writing is left."""
    out = os.path.abspath(out)
    removed = []
    for path in sorted(glob.glob(glob.escape(out) + INCOMPLETE + "*")
                       + glob.glob(glob.escape(out) + REPLACED + "*")):
        owner = _owner(path)
        if owner is not None and (owner[0] != socket.gethostname()
                                  or process_alive(owner[1])):
            log(f"[output] {path} is being written by process {owner[1]} on {owner[0]}: left "
                "alone (remove it yourself if that run is over)")
            continue
        size = _size(path)
        shutil.rmtree(path, ignore_errors=True)
        log(f"[output] removed {path} ({size / 2**20:.1f} MiB), left behind by an interrupted "
            "earlier run")
        removed.append(path)
    return removed


def _write_failure(err: BaseException) -> str | None:
    """The cause, if ``err`` is a failed write (an OSError, or torch's serializer reporting a
    short write as 'unexpected pos', possibly wrapped in dist_checkpointing's
    CheckpointException), else None."""
    if isinstance(err, (OutputWriteError, KeyboardInterrupt, SystemExit, GeneratorExit)):
        return None
    if isinstance(err, OSError):
        return err.strerror or str(err)
    lines = [line for line in str(err).splitlines() if "unexpected pos" in line
             or "inline_container" in line or "write failed" in line.lower()]
    if lines:
        return "a write stopped short (" + lines[-1].strip()[:160] + ")"
    return None


def _hint(out: str, err: BaseException) -> str:
    parent = os.path.dirname(os.path.abspath(out))
    try:
        free = shutil.disk_usage(parent).free
    except OSError:
        return ""
    if isinstance(err, OSError) and err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "; fix the permissions or choose another output path"
    return (f"; {free / 2**30:.2f} GiB free on the disk of {parent}: free space (or raise the "
            "file-size limit) or choose another output path")


@contextlib.contextmanager
def atomic_output_dir(out: str, force: bool = False, inputs=(), log=print):
    """Yields the temporary folder to write into (the same on every rank).

    On success every rank meets at a barrier and rank 0 publishes the folder with one rename.
    On an exception the rank re-raises at once without further collectives (a peer blocked in a
    collective is then ended by torchrun or the timeout); rank 0 removes the temporary folder,
    and in any case nothing appears at ``out``. A failed write (full disk, quota, permissions)
    is re-raised as :class:`OutputWriteError` naming ``out`` and the cause."""
    check_output(out, force, inputs)
    out = os.path.abspath(out)
    if _rank() == 0:
        clean_leftovers(out, log)
    tmp = _broadcast(f"{out}{INCOMPLETE}{uuid.uuid4().hex[:8]}" if _rank() == 0 else None)
    if _rank() == 0:
        os.makedirs(tmp)
        with open(os.path.join(tmp, OWNER_FILE), "w") as f:
            f.write(f"{socket.gethostname()} {os.getpid()}\n")
    _barrier()
    try:
        yield tmp
    except BaseException as err:
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        cause = _write_failure(err)
        if cause is not None:
            raise OutputWriteError(f"writing {out} failed: {cause}{_hint(out, err)}. Nothing "
                                   "was written there; what was there before is intact") from err
        raise
    _barrier()
    if _rank() == 0:
        os.remove(os.path.join(tmp, OWNER_FILE))
        old = None
        if os.path.exists(out):
            old = f"{out}{REPLACED}{uuid.uuid4().hex[:8]}"
            os.rename(out, old)
        os.rename(tmp, out)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()

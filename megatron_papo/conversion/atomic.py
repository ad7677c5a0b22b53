"""Write a checkpoint folder so that a crash never leaves one that looks complete.

Every rank writes into ``<out>.incomplete-<id>`` next to the target; after all ranks finished,
rank 0 moves it to ``<out>`` in one rename (the old folder, with ``force``, is removed only
after). On failure the temporary folder is removed and ``<out>`` is untouched."""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid

import torch.distributed as dist


class OutputExistsError(FileExistsError):
    pass


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


def check_output(out: str, force: bool, inputs=()) -> None:
    clash = overlapping_input(out, inputs)
    if clash is not None:
        raise OutputExistsError(
            f"output {out} overlaps the input {clash} (the same folder, inside it or containing "
            "it): writing there would destroy the source; choose an output outside it")
    if os.path.exists(out) and not force:
        raise OutputExistsError(f"output {out} already exists: choose another path or pass "
                                "--force to replace it")


@contextlib.contextmanager
def atomic_output_dir(out: str, force: bool = False, inputs=()):
    """Yields the temporary folder to write into (the same on every rank).

    On success every rank meets at a barrier and rank 0 publishes the folder with one rename.
    On an exception the rank re-raises at once without further collectives (a peer blocked in a
    collective is then ended by torchrun or the timeout); rank 0 removes the temporary folder,
    and in any case nothing appears at ``out``."""
    check_output(out, force, inputs)
    out = os.path.abspath(out)
    tmp = _broadcast(f"{out}.incomplete-{uuid.uuid4().hex[:8]}" if _rank() == 0 else None)
    if _rank() == 0:
        os.makedirs(tmp)
    _barrier()
    try:
        yield tmp
    except BaseException:
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    _barrier()
    if _rank() == 0:
        old = None
        if os.path.exists(out):
            old = f"{out}.replaced-{uuid.uuid4().hex[:8]}"
            os.rename(out, old)
        os.rename(tmp, out)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()

"""One job per output folder.

A job takes the lock of its output folder before it writes anything there and holds it until it
ends: a second job on the same folder is refused at once, in one line naming the folder and the
holder, having written nothing. The lock is a small JSON file (host, pid, the process's start
time, SLURM job id, start date) whose modification time is the holder's heartbeat (touched every
``HEARTBEAT_S`` seconds by a daemon thread).

A lock whose holder is gone is taken over with a one-line notice: on the same host when its
process no longer runs (kill -9, a crash, a lost node's requeue on the same machine); on another
host when its heartbeat is older than ``STALE_AFTER_S``; a SLURM requeue of the SAME job id takes
over its own lock. ``force`` (``trainer.force_unlock=true``) takes any lock, for the user who
knows its holder is gone.

Where the lock lives: a run folder holds its own (``<folder>/.megatron_papo.lock``); an output
that is replaced as a whole (the converter's ``--out``, ``publish --out``) is locked beside it
(``<out>.lock``).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid

import psutil
import torch.distributed as dist

from megatron_papo.parallel import process_alive

LOCK_FILE = ".megatron_papo.lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0   # another host's holder whose heartbeat is older is taken to be gone


class FolderLockedError(RuntimeError):
    """Another live job holds the folder; the message names it and the way out."""


def _start_time(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def _identity() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "process_start": _start_time(os.getpid()),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"), "token": uuid.uuid4().hex}


def _describe(holder: dict, age: float) -> str:
    job = f", SLURM job {holder['slurm_job_id']}" if holder.get("slurm_job_id") else ""
    return (f"pid {holder.get('pid')} on {holder.get('host')}{job}, started "
            f"{holder.get('started')}, last heartbeat {age:.0f}s ago")


class FolderLock:
    """The lock file ``path`` guarding the folder the user named as ``label`` (e.g.
    ``trainer.output_dir=outputs/run``); ``force_hint``: how the user forces it."""

    def __init__(self, path: str, label: str, force_hint: str, create_folder: bool = True):
        self.path = os.path.abspath(path)
        self.label = label
        self.force_hint = force_hint
        # False (an output beside which the lock lies): a folder that does not exist or cannot
        # take the lock file is left to the command's own checks (their one-line errors), unlocked
        self.create_folder = create_folder
        self.me = _identity()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None  # runs while the lock is held

    # ------------------------------------------------------------------ taking it
    def _read(self) -> tuple[dict | None, float | None]:
        """(the holder, the age of its heartbeat in s); (None, None) if there is no lock."""
        try:
            age = time.time() - os.path.getmtime(self.path)
        except OSError:  # none there (or no folder to hold one)
            return None, None
        try:
            with open(self.path) as f:
                return json.load(f), age
        except FileNotFoundError:
            return None, None
        except (OSError, ValueError):
            return {}, age  # being written, or damaged: judged by its heartbeat alone

    def _why_stale(self, holder: dict, age: float) -> str | None:
        """Why the holder is gone (None: it may be running)."""
        if holder.get("slurm_job_id") and holder["slurm_job_id"] == self.me["slurm_job_id"]:
            return f"SLURM job {holder['slurm_job_id']} requeued takes over its own lock"
        if holder.get("host") == self.me["host"] and holder.get("pid"):
            pid = int(holder["pid"])
            start = _start_time(pid) if process_alive(pid) else None  # a zombie is gone too
            if start is None or (holder.get("process_start") is not None
                                 and abs(start - holder["process_start"]) > 1):  # pid reused
                return f"its process {pid} on this host is gone"
            return None
        if age > STALE_AFTER_S:
            return f"its heartbeat is {age:.0f}s old (> {STALE_AFTER_S:.0f}s)"
        return None

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(self.me, f)
        return True

    def acquire(self, force: bool = False, log=print) -> None:
        folder = os.path.dirname(self.path)
        if self.create_folder:
            os.makedirs(folder, exist_ok=True)
        elif not os.path.isdir(folder):
            return
        for _ in range(5):  # a lost race with another starter: look again
            try:
                if self._create():
                    break
            except OSError:
                if self.create_folder:
                    raise
                return
            holder, age = self._read()
            if holder is None:
                continue
            reason = self._why_stale(holder, age)
            if reason is None and not force:
                raise FolderLockedError(
                    f"{self.label} is in use by another job ({_describe(holder, age)}; lock "
                    f"{self.path}): wait for it to end or choose another folder; if that job is "
                    f"gone, {self.force_hint}")
            # move the stale lock aside under a name of our own: of several starters that judged
            # it stale, one moves it; the others find no file and race on creating a new one
            aside = f"{self.path}.taken-{self.me['token']}"
            try:
                os.rename(self.path, aside)
            except FileNotFoundError:
                continue
            with contextlib.suppress(OSError, ValueError), open(aside) as f:
                moved = json.load(f)
                if moved.get("token") != holder.get("token"):  # a fresh lock, not the stale one
                    os.rename(aside, self.path)
                    continue
            with contextlib.suppress(OSError):
                os.remove(aside)
            log(f"[lock] {self.label}: took over the lock of {_describe(holder, age)}: "
                + (reason or "forced"))
        else:
            raise FolderLockedError(f"{self.label}: could not take the lock {self.path} (other "
                                    "jobs keep starting on this folder)")
        self._thread = threading.Thread(target=self._beat, name="megatron_papo-lock",
                                        daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            with contextlib.suppress(OSError):
                os.utime(self.path)

    # ------------------------------------------------------------------ letting go
    def release(self) -> None:
        if self._thread is None:  # never taken (another rank's object, or an unlockable output)
            return
        self._stop.set()
        holder, _ = self._read()
        if holder and holder.get("token") == self.me["token"]:
            with contextlib.suppress(OSError):
                os.remove(self.path)


def folder_lock(folder: str, label: str, force_hint: str) -> FolderLock:
    """The lock a run folder holds inside itself."""
    return FolderLock(os.path.join(folder, LOCK_FILE), label, force_hint)


def output_lock(out: str, label: str, force_hint: str) -> FolderLock:
    """The lock beside an output folder that is written (and replaced) as a whole (none where
    that folder's parent does not exist or cannot take it: the command's checks report it)."""
    return FolderLock(os.path.abspath(out).rstrip(os.sep) + ".lock", label, force_hint,
                      create_folder=False)


def acquire_on_rank0(locks: list[FolderLock], force: bool = False, log=print) -> None:
    """Rank 0 takes ``locks``; every rank raises the same :class:`FolderLockedError` when one is
    held elsewhere (no rank is left waiting in a collective)."""
    error = None
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    if rank0:
        taken = []
        try:
            for lock in locks:
                lock.acquire(force, log)
                taken.append(lock)
        except FolderLockedError as err:
            for lock in taken:
                lock.release()
            error = str(err)
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error:
        raise FolderLockedError(error)


def release_all(locks: list[FolderLock]) -> None:
    for lock in locks:
        lock.release()

"""What a model path is: the one decision every entry point that takes a model makes here.

* a Megatron checkpoint: ``megatron_papo.json`` (a converter output, or a training checkpoint
  ``<run>/checkpoints/step_N``, which also holds the run's ``config.json``: the Megatron marker
  wins over it);
* an HF folder: ``config.json`` of a transformers model (``model_type``), no Megatron marker;
* a run folder (``trainer.output_dir``): its newest COMPLETE training checkpoint under
  ``checkpoints/`` (what ``checkpoints/latest`` names, skipping incomplete ones), else its HF
  export ``hf/``.

Anything else is one line naming the path and what was looked for. Also here: which training
checkpoints under a folder are complete (:func:`find_resumable`, :func:`why_incomplete`), what
resuming and every entry point agree on.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from .checkpoint import META_FILE, WEIGHTS_DIR, dist_checkpoint_problem

# the files that make a training checkpoint <checkpoint_dir>/step_00000050/ (train/checkpoint.py)
STATE_FILE = "trainer_state.json"   # step, warm start done, sampler RNG, monitor history
RNG_DIR = "rng"                     # per-rank RNG states
PREFIX = "step_"


class ModelPathError(ValueError):
    """A model path that is none of the accepted kinds; the message names it and the fix."""


@dataclass(frozen=True)
class ModelPath:
    kind: str        # "hf" | "megatron" (converter output) | "training" (training checkpoint)
    path: str        # the folder holding the weights
    given: str       # what the user passed

    @property
    def is_megatron(self) -> bool:
        return self.kind in ("megatron", "training")

    def describe(self) -> str:
        what = {"hf": "HF folder", "megatron": "Megatron checkpoint",
                "training": "training checkpoint"}[self.kind]
        return what + ("" if self.path == self.given else f" {self.path}")


def _megatron_kind(folder: str) -> str:
    try:
        with open(os.path.join(folder, META_FILE)) as f:
            kind = json.load(f).get("kind")
    except (OSError, ValueError):
        kind = None  # unreadable: the loader names the problem
    return "training" if kind == "training" else "megatron"


def _is_hf(folder: str) -> bool:
    try:
        with open(os.path.join(folder, "config.json")) as f:
            return "model_type" in json.load(f)
    except (OSError, ValueError):
        return False


def resolve_model_path(path: str, option: str = "--model") -> ModelPath:
    """Classify ``path`` (see the module docstring); ``option`` names the argument in errors."""
    if not os.path.isdir(path):
        raise ModelPathError(f"{option} {path!r} is not a folder: give an HF folder, a Megatron "
                             "checkpoint or a run folder (trainer.output_dir)")
    if os.path.exists(os.path.join(path, META_FILE)):
        return ModelPath(_megatron_kind(path), path, path)
    if _is_hf(path):
        return ModelPath("hf", path, path)
    checkpoints = os.path.join(path, "checkpoints")
    if os.path.isdir(checkpoints):
        newest = find_resumable(checkpoints, log=lambda message: None)
        if newest is not None:
            return ModelPath(_megatron_kind(newest), newest, path)
    export = os.path.join(path, "hf")
    if _is_hf(export):
        return ModelPath("hf", export, path)
    raise ModelPathError(
        f"{option} {path!r} is none of: an HF folder (config.json with a model_type), a Megatron "
        f"checkpoint ({META_FILE}), a run folder with a complete checkpoint under checkpoints/ "
        "or an HF export under hf/")


def step_dirs(root: str) -> list[str]:
    """The step_N folders under ``root`` (complete or not)."""
    if not os.path.isdir(root):
        return []
    return [os.path.join(root, d) for d in os.listdir(root)
            if d.startswith(PREFIX) and d[len(PREFIX):].isdigit()]


def why_incomplete(path: str) -> str | None:
    """None if ``path`` holds a complete training checkpoint, else the reason it does not."""
    for name in (META_FILE, STATE_FILE, RNG_DIR):
        if not os.path.exists(os.path.join(path, name)):
            return f"{name} is missing"
    try:
        with open(os.path.join(path, STATE_FILE)) as f:
            state = json.load(f)
        with open(os.path.join(path, META_FILE)) as f:
            meta = json.load(f)
    except (OSError, ValueError) as err:
        return f"unreadable state ({err})"
    if meta.get("kind") != "training" or "step" not in state:
        return "not a training checkpoint"
    problem = dist_checkpoint_problem(os.path.join(path, WEIGHTS_DIR))
    if problem:
        return problem.replace(path + os.sep, "")  # relative to the checkpoint
    return None


def find_resumable(root: str, log=print) -> str | None:
    """The newest complete checkpoint under ``root`` (None if there is none); each skipped
    folder gets a line saying why."""
    for path in sorted(step_dirs(root), reverse=True):
        reason = why_incomplete(path)
        if reason is None:
            return path
        log(f"[train] skipping checkpoint {path}: {reason}")
    return None

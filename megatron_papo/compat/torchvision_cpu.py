"""Lets the CUDA build of torchvision import on a CPU-only torch.

PyPI has no CPU build of torchvision for torch 2.13; the CUDA build's C++ extension cannot load
(``libc10_cuda.so`` is missing), and ``torchvision._meta_registrations`` then fails at import with
``RuntimeError: operator torchvision::nms does not exist`` because it registers fake kernels for
``nms``/``qnms`` without checking that the extension loaded. transformers' Qwen2.5-VL image
processor needs ``torchvision.transforms.v2``, so the whole VL stack stops there.

Fix (no file in site-packages is edited): declare the schemas of those two operators before
torchvision is imported, so that the registrations succeed. Their kernels stay absent: the
detection ops (``torchvision.ops.nms``) still raise if called; the image transforms work.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import sys

import torch

_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_LIBRARY = None  # keeps the torch.library.Library alive (it unregisters on deletion)


def _extension_loads() -> bool:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return True  # torchvision absent: nothing to fix
    folder = list(spec.submodule_search_locations)[0]
    candidates = [f for f in os.listdir(folder) if f.startswith("_C") and f.endswith(".so")]
    if not candidates:
        return False
    try:
        ctypes.CDLL(os.path.join(folder, candidates[0]))
    except OSError:
        return False
    return True


def patch_torchvision_meta_registrations() -> bool:
    """Declare ``torchvision::nms``/``qnms`` when torchvision's extension cannot load.

    Returns True if the schemas were declared (now or by an earlier call). Must run before the first
    ``import torchvision``; later it does nothing.
    """
    global _LIBRARY
    if _LIBRARY is not None:
        return True
    if "torchvision" in sys.modules or _extension_loads():
        return False
    try:
        torch.ops.torchvision.nms  # declared already (by another library)?
        return False
    except (AttributeError, RuntimeError):
        pass
    lib = torch.library.Library("torchvision", "FRAGMENT")
    for schema in _SCHEMAS.values():
        lib.define(schema)
    _LIBRARY = lib
    return True

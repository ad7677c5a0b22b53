"""CPU (gloo) patches for megatron-core.

megatron-core is written for CUDA. On a CPU-only torch a handful of its code paths call CUDA APIs
that raise ("Torch not compiled with CUDA enabled") or silently do nothing. Each function below fixes
one such failure; its docstring names the failure. Rules every patch follows:

* it is applied only when CUDA is absent (``apply_cpu_patches`` checks ``torch.cuda.is_available()``),
  so nothing changes on a GPU machine;
* it only replaces calls that would otherwise raise or be a silent no-op on CPU: code that worked
  keeps working the same way;
* it is scoped to megatron-core: torch's own modules are never modified globally (the one
  exception, ``Tensor.type``/``Tensor.cuda``, is swapped only for the duration of the named
  megatron-core functions);
* it is idempotent: applying it twice is the same as once (a marker attribute records it).

Every failure was re-checked on megatron-core 0.16.1 (the cp311 wheel); where 0.19.x differs the
docstring says so.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import inspect
import logging
import sys
import types
from typing import Any, Callable, Iterator

import torch

_MARK = "_megatron_papo_cpu_patched"


def _is_cuda_device(device: Any) -> bool:
    if device is None:
        return False
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.split(":")[0] == "cuda"
    if isinstance(device, int):  # torch.cuda.current_device() results, passed as `device=`
        return True
    return False


def _to_cpu_kwargs(kwargs: dict) -> dict:
    if "device" in kwargs and _is_cuda_device(kwargs["device"]):
        kwargs = dict(kwargs, device="cpu")
    if kwargs.get("pin_memory"):
        kwargs = dict(kwargs, pin_memory=False)
    return kwargs


def _redirect_factory(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def factory(*args, **kwargs):
        return fn(*args, **_to_cpu_kwargs(kwargs))

    return factory


class _CpuStream:
    """Stand-in for ``torch.cuda.Stream``/``Event``: CPU work is synchronous, so all are no-ops."""

    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def record_event(self, *args, **kwargs):
        return _CpuStream()

    def record(self, *args, **kwargs):
        pass

    def wait(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


class _CpuCudaNamespace(types.ModuleType):
    """``torch.cuda`` as seen from a megatron-core module when CUDA is absent.

    Calls that would raise on a CPU-only torch are answered for the CPU; everything else is
    forwarded to the real ``torch.cuda`` (so ``is_available()`` still says False).
    """

    def __init__(self):
        super().__init__("torch.cuda")

    def __getattr__(self, name):
        return getattr(torch.cuda, name)

    # device queries
    @staticmethod
    def current_device():
        return "cpu"

    @staticmethod
    def device_count():
        return 0

    @staticmethod
    def synchronize(*args, **kwargs):
        return None

    @staticmethod
    def empty_cache():
        return None

    # streams and events
    Stream = _CpuStream
    Event = _CpuStream
    ExternalStream = _CpuStream

    @staticmethod
    def current_stream(*args, **kwargs):
        return _CpuStream()

    @staticmethod
    def default_stream(*args, **kwargs):
        return _CpuStream()

    @staticmethod
    def stream(*args, **kwargs):
        return contextlib.nullcontext()

    # random state: the "CUDA" generator is the CPU generator
    @staticmethod
    def get_rng_state(*args, **kwargs):
        return torch.get_rng_state()

    @staticmethod
    def set_rng_state(state, *args, **kwargs):
        torch.set_rng_state(state)

    @staticmethod
    def manual_seed(seed):
        torch.manual_seed(seed)

    @staticmethod
    def memory_allocated(*args, **kwargs):
        return 0

    @staticmethod
    def max_memory_allocated(*args, **kwargs):
        return 0

    @staticmethod
    def memory_stats(*args, **kwargs):
        return {}


_FACTORIES = (
    "tensor", "as_tensor", "zeros", "ones", "empty", "full", "arange", "rand", "randn", "randint",
    "zeros_like", "ones_like", "empty_like", "full_like", "linspace", "eye",
)


class _CpuTorch(types.ModuleType):
    """The ``torch`` module as seen from one megatron-core module when CUDA is absent.

    Tensor factories map ``device="cuda"`` (or a CUDA index) to the CPU and drop ``pin_memory``;
    ``torch.cuda`` is :class:`_CpuCudaNamespace`. Everything else is the real torch object, so
    ``isinstance`` checks, dtypes and ``torch.distributed`` are untouched.
    """

    def __init__(self):
        super().__init__("torch")
        for name in _FACTORIES:
            setattr(self, name, _redirect_factory(getattr(torch, name)))
        self.cuda = _CpuCudaNamespace()

    def __getattr__(self, name):
        return getattr(torch, name)


_CPU_TORCH: _CpuTorch | None = None


def _cpu_torch() -> _CpuTorch:
    global _CPU_TORCH
    if _CPU_TORCH is None:
        _CPU_TORCH = _CpuTorch()
    return _CPU_TORCH


def _redirect_module(module: types.ModuleType) -> None:
    if getattr(module, "torch", None) is torch:
        module.torch = _cpu_torch()


# megatron-core modules replaced by a placeholder when a dependency is missing on CPU:
# module name -> (missing dependency, function that fills the placeholder module).
_PLACEHOLDERS: dict[str, tuple[str, Callable[[types.ModuleType], None]]] = {}


class _PlaceholderLoader(importlib.abc.Loader):
    def __init__(self, fill):
        self._fill = fill

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        self._fill(module)


class _MegatronImportHook(importlib.abc.MetaPathFinder):
    """Redirects ``torch`` in megatron-core modules imported after the patch was applied, and
    serves registered placeholders for modules whose dependency is missing."""

    def find_spec(self, fullname, path, target=None):
        if not fullname.startswith("megatron.core"):
            return None
        if fullname in _PLACEHOLDERS:
            dependency, fill = _PLACEHOLDERS[fullname]
            if importlib.util.find_spec(dependency) is None:
                return importlib.util.spec_from_loader(fullname, _PlaceholderLoader(fill))
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        original_exec = loader.exec_module

        def exec_module(module, _exec=original_exec):
            _exec(module)
            _redirect_module(module)

        spec.loader = _WrappedLoader(loader, exec_module)
        return spec


class _WrappedLoader(importlib.abc.Loader):
    def __init__(self, loader, exec_module):
        self._loader = loader
        self._exec_module = exec_module

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._exec_module(module)

    def __getattr__(self, name):
        return getattr(self._loader, name)


def patch_megatron_cuda_calls() -> None:
    """Failures 2, 4, 5 (and 6 on 0.19.x): megatron-core calls CUDA APIs unconditionally.

    ``torch.cuda.current_device()`` is used as a tensor device in ~160 places (rotary embeddings,
    the distributed-data-parallel buffers, ...); schedules, optimizer, ``clip_grads``, the grad scaler
    and ``utils.local_multi_tensor_l2_norm`` create tensors with ``device="cuda"``;
    ``p2p_communication`` and the checkpoint writer call ``torch.cuda.synchronize()``; 0.19.x's
    ``param_and_grad_buffer`` uses ``torch.cuda.current_stream/Stream/Event``. On a CPU-only torch
    each of these raises "Torch not compiled with CUDA enabled".

    Fix: every ``megatron.core`` module (already imported, or imported later through a
    ``sys.meta_path`` hook) sees a ``torch`` whose factories map CUDA devices to the CPU and whose
    ``torch.cuda`` answers for the CPU (see :class:`_CpuTorch`). torch itself is not modified.
    """
    for name, module in list(sys.modules.items()):
        if name.startswith("megatron.core") and module is not None:
            _redirect_module(module)
    if not any(isinstance(f, _MegatronImportHook) for f in sys.meta_path):
        sys.meta_path.insert(0, _MegatronImportHook())


def _fill_paged_stash_ops(module: types.ModuleType) -> None:
    def kernel(*args, **kwargs):
        raise RuntimeError("megatron-core's MoE paged-stash kernels need triton and CUDA; they are "
                           "not available on this CPU-only install")

    module.GLOBAL_BLOCK_SIZE = 1024
    module.paged_stash_copy_kernel = kernel
    module.paged_stash_pop_kernel = kernel
    module.__all__ = ["GLOBAL_BLOCK_SIZE", "paged_stash_copy_kernel", "paged_stash_pop_kernel"]


def patch_triton_free_import() -> None:
    """Failure 1 (0.19.x; not 0.16.1): ``import megatron.core`` fails with ``No module named
    'triton'``: ``pipeline_parallel/schedules.py`` imports ``transformer/moe/paged_stash.py``,
    whose ``ops/paged_stash.py`` defines triton kernels at import time. triton is not installed on
    CPU (1 GB, useless there).

    Fix: when triton is absent, the import hook serves that one ops module as a placeholder
    (same names; the kernels raise a clear error if MoE paged stashing is ever used on CPU).
    """
    _PLACEHOLDERS["megatron.core.transformer.moe.ops.paged_stash"] = ("triton",
                                                                       _fill_paged_stash_ops)
    patch_megatron_cuda_calls()  # make sure the hook is installed


def patch_rng_tracker() -> None:
    """Failure 3: the model-parallel RNG tracker reads and writes CUDA generator state.

    ``tensor_parallel.random._get_cuda_rng_state`` indexes ``torch.cuda.default_generators`` and
    ``_set_cuda_rng_state`` queues its work with ``torch.cuda._lazy_call``, which never runs without
    CUDA: forking the tracker (every attention/dropout call does) is silently wrong or raises.

    Fix: both functions use the CPU generator. Seeding through
    ``model_parallel_cuda_manual_seed`` then gives each TP rank its own CPU stream as on GPU.
    ``fork()`` then warns "CPU RNG state changed within GPU RNG context" on every dropout or
    attention call (the "GPU" generator IS the CPU one here); that one message is filtered.
    """
    # patched here: imported after the import hook is installed (patch_megatron_core)
    from megatron.core.tensor_parallel import random as mp_random

    if getattr(mp_random, _MARK, False):
        return

    def _get_cpu_rng_state(device=None, clone=False, graph_safe=False):
        state = torch.get_rng_state()
        return state.clone() if clone else state

    def _set_cpu_rng_state(new_state, device=-1, graph_safe=False):
        torch.set_rng_state(new_state)

    mp_random._get_cuda_rng_state = _get_cpu_rng_state
    mp_random._set_cuda_rng_state = _set_cpu_rng_state
    logging.getLogger(mp_random.__name__).addFilter(
        lambda record: "CPU RNG state changed within GPU RNG context" not in record.getMessage())
    setattr(mp_random, _MARK, True)


@contextlib.contextmanager
def _cpu_tensors_look_like_cuda() -> Iterator[None]:
    """Inside: ``t.type()`` of a CPU tensor says ``torch.cuda.*`` and ``t.cuda()`` returns ``t``."""
    real_type, real_cuda = torch.Tensor.type, torch.Tensor.cuda

    def type_(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and self.device.type == "cpu":
            return real_type(self).replace("torch.", "torch.cuda.", 1)
        return real_type(self, dtype, non_blocking, **kwargs)

    def cuda_(self, *args, **kwargs):
        return self if self.device.type == "cpu" else real_cuda(self, *args, **kwargs)

    torch.Tensor.type, torch.Tensor.cuda = type_, cuda_
    try:
        yield
    finally:
        torch.Tensor.type, torch.Tensor.cuda = real_type, real_cuda


def _wrap_in_cuda_lookalike(owner: Any, name: str) -> None:
    raw = inspect.getattr_static(owner, name)
    kind = type(raw) if isinstance(raw, (staticmethod, classmethod)) else None
    fn = raw.__func__ if kind else raw
    if getattr(fn, _MARK, False):
        return

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _cpu_tensors_look_like_cuda():
            return fn(*args, **kwargs)

    setattr(wrapper, _MARK, True)
    setattr(owner, name, kind(wrapper) if kind else wrapper)


def patch_cuda_tensor_type_checks() -> None:
    """Failures 7 and 8: type checks and ``.cuda()`` calls on parameters.

    * ``DistributedOptimizer._build_model_and_main_param_groups`` and the fp16 optimizer accept a
      parameter only if ``param.type()`` is ``'torch.cuda.FloatTensor'`` (or Half/BFloat16) and
      raise ``TypeError: Wrapped parameters must be one of torch.cuda.FloatTensor`` for CPU ones;
    * ``clip_grads.clip_grad_by_total_norm_fp32`` asserts ``grad.type() == 'torch.cuda.FloatTensor'``;
    * tied embeddings with PP > 1: ``LanguageModule.setup_embeddings_and_output_layer`` calls
      ``weight.data.cuda()``;
    * saving distributed-optimizer state (``fully_reshardable``):
      ``DistributedOptimizer.get_parameter_state_dp_zero`` calls ``send_tensor.cuda()``.

    Fix: only while those functions run, a CPU tensor's ``type()`` reports the CUDA type name and
    ``.cuda()`` returns the tensor itself.
    """
    # patched here: imported after the import hook is installed (patch_megatron_core)
    from megatron.core.models.common.language_module import language_module
    from megatron.core.optimizer import clip_grads, distrib_optimizer, optimizer

    _wrap_in_cuda_lookalike(
        distrib_optimizer.DistributedOptimizer, "_build_model_and_main_param_groups"
    )
    _wrap_in_cuda_lookalike(distrib_optimizer.DistributedOptimizer, "get_parameter_state_dp_zero")
    _wrap_in_cuda_lookalike(optimizer.Float16OptimizerWithFloat16Params, "__init__")
    _wrap_in_cuda_lookalike(clip_grads, "clip_grad_by_total_norm_fp32")
    _wrap_in_cuda_lookalike(language_module.LanguageModule, "setup_embeddings_and_output_layer")
    # the optimizer module imported the function by name
    for mod in (optimizer, distrib_optimizer):
        if hasattr(mod, "clip_grad_by_total_norm_fp32"):
            mod.clip_grad_by_total_norm_fp32 = clip_grads.clip_grad_by_total_norm_fp32


def patch_fresh_optimizer_state_for_loading() -> None:
    """Failure 9: loading distributed-optimizer state into a fresh optimizer (torch AdamW fallback).

    Without TE/Apex, megatron-core's ``DistributedOptimizer`` wraps ``torch.optim.AdamW``, whose
    per-parameter state (``exp_avg``, ``exp_avg_sq`` and the ``step`` tensor) exists only after the
    first step. ``sharded_state_dict(is_loading=True)`` calls ``state_dict()``, which reads
    ``state["step"]`` of every parameter and fails with a bare ``AssertionError`` (0.16.1) or a
    ``KeyError``; the ``init_state_fn`` megatron-core registers creates the moments but no ``step``.

    Then ``_set_main_param_and_optimizer_states`` copies every key of the destination state from
    the loaded tensors, but ``load_parameter_state_from_fully_reshardable`` leaves out ``step``
    (restored separately from the param groups): ``KeyError: 'step'`` (0.16.1; 0.19.x skips absent
    keys).

    Fix: when building the sharded state dict for loading, give every parameter that has no state
    yet zero moments and ``step = 0`` (what AdamW itself would create); the checkpoint's values then
    overwrite them. The copy iterates over the loaded keys, so ``step`` keeps the value restored
    from the param groups. Saving and optimizers with existing state are untouched.

    Last, ``DistributedOptimizer.load_state_dict`` (torch fallback branch) assigns ONE ``step``
    tensor to every parameter; AdamW increments it in place per parameter, so after resuming the
    k-th parameter sees step 1+k: silently wrong bias correction. Fix: each parameter gets its own
    copy after loading. (The state the loader hands over may carry non-tensor entries, the
    ``dp_reshardable`` format's padding flags and ranges: they are skipped, and the copies run
    under ``no_grad`` because that format's loader calls this outside it.)
    """
    # patched here: imported after the import hook is installed (patch_megatron_core)
    from megatron.core.optimizer import distrib_optimizer

    cls = distrib_optimizer.DistributedOptimizer
    original = cls.sharded_state_dict
    if getattr(original, _MARK, False):
        return

    @functools.wraps(original)
    def sharded_state_dict(self, model_sharded_state_dict=None, is_loading=False, *args, **kwargs):
        inner = getattr(self, "optimizer", None)
        if is_loading and isinstance(inner, torch.optim.Optimizer):
            for group in inner.param_groups:
                for param in group["params"]:
                    state = inner.state[param]
                    if len(state) == 0:
                        state["exp_avg"] = torch.zeros_like(param.data)
                        state["exp_avg_sq"] = torch.zeros_like(param.data)
                        state["step"] = torch.tensor(0.0)
        if model_sharded_state_dict is None:
            model_sharded_state_dict = {}
        return original(self, model_sharded_state_dict, is_loading, *args, **kwargs)

    original_set = cls._set_main_param_and_optimizer_states

    @functools.wraps(original_set)
    def _set_main_param_and_optimizer_states(self, model_param, tensors):
        if self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            return original_set(self, model_param, tensors)
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        destination = {"param": main_param, **self.optimizer.state[main_param]}
        with torch.no_grad():  # (dp_reshardable's loader calls this outside no_grad)
            for key, value in tensors.items():
                if not isinstance(value, torch.Tensor):  # dp_reshardable's padding, ranges
                    continue
                destination[key].copy_(value)
        return None

    original_load = cls.load_state_dict

    @functools.wraps(original_load)
    def load_state_dict(self, state_dict):
        result = original_load(self, state_dict)
        inner = getattr(self, "optimizer", None)
        if isinstance(inner, torch.optim.Optimizer):
            for state in inner.state.values():
                if isinstance(state.get("step"), torch.Tensor):
                    state["step"] = state["step"].detach().clone()
        return result

    setattr(sharded_state_dict, _MARK, True)
    cls.sharded_state_dict = sharded_state_dict
    cls._set_main_param_and_optimizer_states = _set_main_param_and_optimizer_states
    cls.load_state_dict = load_state_dict

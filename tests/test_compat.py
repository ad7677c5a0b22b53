"""The CPU compat module: each patch does its job, stays scoped to megatron-core, and is idempotent."""

import os
import subprocess
import sys

import pytest
import torch

from megatron_papo import compat
from megatron_papo.compat import cpu


def test_apply_twice_is_the_same_as_once():
    from megatron.core.optimizer import clip_grads, distrib_optimizer
    from megatron.core.tensor_parallel import random as mp_random

    assert compat.apply_cpu_patches() is True
    snapshot = (distrib_optimizer.DistributedOptimizer.__dict__["_build_model_and_main_param_groups"],
                distrib_optimizer.DistributedOptimizer.sharded_state_dict,
                clip_grads.clip_grad_by_total_norm_fp32, mp_random._set_cuda_rng_state,
                tuple(sys.meta_path))
    assert compat.apply_cpu_patches(force=True) is True
    again = (distrib_optimizer.DistributedOptimizer.__dict__["_build_model_and_main_param_groups"],
             distrib_optimizer.DistributedOptimizer.sharded_state_dict,
             clip_grads.clip_grad_by_total_norm_fp32, mp_random._set_cuda_rng_state,
             tuple(sys.meta_path))
    assert snapshot == again
    assert sum(isinstance(f, cpu._MegatronImportHook) for f in sys.meta_path) == 1


def test_megatron_modules_see_cpu_cuda_but_torch_is_untouched():
    """Catches: a patch leaking into torch itself (it must only change megatron-core's view)."""
    from megatron.core.tensor_parallel import layers

    assert layers.torch.cuda.current_device() == "cpu"
    assert layers.torch.zeros(2, device="cuda").device.type == "cpu"
    assert layers.torch.empty(1, device=layers.torch.cuda.current_device()).device.type == "cpu"
    assert layers.torch.Tensor is torch.Tensor and layers.torch.float32 is torch.float32
    with pytest.raises((AssertionError, RuntimeError)):
        torch.zeros(2, device="cuda")
    assert torch.Tensor.type(torch.zeros(1)) == "torch.FloatTensor"


def test_modules_imported_after_the_patch_are_redirected():
    import importlib

    name = "megatron.core.fusions.fused_bias_gelu"
    old = sys.modules.pop(name, None)
    try:
        module = importlib.import_module(name)  # executed anew, through the import hook
        assert module is not old
        assert isinstance(module.torch, cpu._CpuTorch)
    finally:
        if old is not None:
            sys.modules[name] = old


def test_cuda_lookalike_is_scoped_to_the_call():
    seen = {}

    class Owner:
        @classmethod
        def check(cls, t):
            seen["type"] = t.type()
            return t.cuda() is t

    cpu._wrap_in_cuda_lookalike(Owner, "check")
    assert Owner.check(torch.zeros(1)) is True
    assert seen["type"] == "torch.cuda.FloatTensor"
    assert torch.zeros(1).type() == "torch.FloatTensor"  # restored after the call


def test_rng_tracker_forks_the_cpu_generator():
    """Catches: a tracker whose set-state is a silent no-op (dropout identical on all TP ranks)."""
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    tracker = get_cuda_rng_tracker()
    tracker.reset()
    tracker.add("test-rng", 123)
    torch.manual_seed(0)
    with tracker.fork("test-rng"):
        a = torch.rand(3)
    outside = torch.rand(3)
    torch.manual_seed(0)
    assert torch.equal(torch.rand(3), outside)  # the fork did not consume the default stream
    tracker.reset()
    tracker.add("test-rng", 123)
    with tracker.fork("test-rng"):
        assert torch.equal(torch.rand(3), a)
    tracker.reset()


def test_fresh_interpreter_imports_vllm_megatron_and_the_vl_processor_stack():
    """The install's promise: one call at start-up, then vLLM, megatron-core and torchvision's
    transforms (needed by the Qwen2.5-VL processor) all import on a CPU-only torch."""
    code = (
        "from megatron_papo.compat import apply_cpu_patches; apply_cpu_patches()\n"
        "import torchvision.transforms.v2\n"
        "from vllm import LLM\n"
        "import megatron.core\n"
        "from transformers import Qwen2_5_VLForConditionalGeneration\n"
        "print('IMPORTS-OK')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert "IMPORTS-OK" in out.stdout, out.stderr[-3000:]


def test_startup_hook_fixes_torchvision_in_foreign_interpreters():
    """Processes we do not start ourselves (vLLM's model-inspection subprocess) import
    torchvision without calling apply_cpu_patches: the .pth start-up hook written by the install
    script covers them. Without it the pinned CUDA torchvision fails to import."""
    code = "import torchvision.transforms.v2; print('TV-OK')"
    hooked = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=300)
    assert "TV-OK" in hooked.stdout, hooked.stderr[-2000:]
    unhooked = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=300, env={**os.environ, "MEGATRON_PAPO_NO_STARTUP_HOOK": "1"})
    assert unhooked.returncode != 0 and "torchvision::nms does not exist" in unhooked.stderr
    start = subprocess.run([sys.executable, "-X", "importtime", "-c", "pass"],
                           capture_output=True, text=True, timeout=60)
    assert "megatron_papo._startup" in start.stderr and "torch" not in {
        line.rsplit("|", 1)[-1].strip() for line in start.stderr.splitlines()}


def test_two_jobs_tp_engines_get_their_own_cpu_shared_memory(monkeypatch):
    """vLLM on CPU names a TP group's shared memory after its init method's port, which an engine
    inside a training process (env://) lacks: two jobs' TP-2 engines on one machine collided
    (errno 17; seen with two test workers). After compat.vllm.cpu_shm_names_per_job the name
    carries the job's MASTER_PORT and no '/' (shm_open refuses one inside a name: errno 22)."""
    import types

    from vllm.distributed.device_communicators import cpu_communicator as cc

    from megatron_papo.compat.vllm import cpu_shm_names_per_job

    cpu_shm_names_per_job()
    cpu_shm_names_per_job()  # idempotent: the port is added once
    monkeypatch.setenv("VLLM_DIST_IDENT", "//")  # what vLLM's CPU worker sets for env://
    group = types.SimpleNamespace(unique_name="tp:0", ranks=[0, 1])
    names = {}
    for port in ("29511", "29512"):
        monkeypatch.setenv("MASTER_PORT", port)
        names[port] = cc._CPUSHMDistributed.make_group_name(group)
    assert names["29511"] != names["29512"]
    assert all(n.startswith(p + "-") and "/" not in n and n.count(p) == 1
               for p, n in names.items()), names


def test_packed_rope_in_one_pass_is_bit_identical_to_megatrons_loop():
    """Catches: the one-pass rotary embedding of packed micro-batches changing any value or
    gradient, or taking the one-pass route where megatron-core's per-sequence slicing differs
    (angles per position of the longest sequence, not per token)."""
    from megatron.core.models.common.embeddings import rope_utils

    compat.apply_cpu_patches()
    patched = rope_utils._apply_rotary_pos_emb_thd
    original = patched.original
    assert original is not patched

    class OneRank:
        def size(self):
            return 1

        def rank(self):
            return 0

    gen = torch.Generator().manual_seed(0)
    lengths = [5, 1, 9, 3]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    for rows in (sum(lengths), max(lengths)):   # per token (one pass) | per position (original)
        freqs = torch.randn(rows, 1, 1, 8, generator=gen)
        t = torch.randn(sum(lengths), 2, 8, generator=gen)
        outputs, grads = [], []
        for fn in (patched, original):
            x = t.clone().requires_grad_(True)
            y = fn(x, cu, freqs, cp_group=OneRank())
            (y * torch.arange(y.numel()).reshape(y.shape)).sum().backward()
            outputs.append(y.detach())
            grads.append(x.grad)
        assert torch.equal(outputs[0], outputs[1]) and torch.equal(grads[0], grads[1])
    # through megatron-core's entry point (what attention calls): the patched function is used
    seen = []
    rope_utils._apply_rotary_pos_emb_thd = lambda *a, **k: seen.append(1) or patched(*a, **k)
    try:
        from megatron.core.transformer import TransformerConfig
        config = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=1)
        freqs = torch.randn(sum(lengths), 1, 1, 8, generator=gen)
        t = torch.randn(sum(lengths), 2, 8, generator=gen)
        out = rope_utils.apply_rotary_pos_emb(t, freqs, config, cu_seqlens=cu, cp_group=OneRank())
        assert seen and torch.equal(out, original(t, cu, freqs, cp_group=OneRank()))
    finally:
        rope_utils._apply_rotary_pos_emb_thd = patched

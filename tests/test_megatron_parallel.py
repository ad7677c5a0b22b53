"""megatron-core's parallel machinery on CPU/gloo, proved on a tiny GPT (local spec, fp32).

Every test builds full reference weights at TP=1/PP=1 inside the workers, runs the same data
through the sharded model and compares with the single-process result. Tolerances: fp32, 1e-5.
"""

import pytest
import torch
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

import gpt_utils as G
from megatron_papo.parallel import (
    ParallelConfigError,
    check_pipeline_communication,
    default_batch_p2p_comm,
    initialize_model_parallel,
)
from megatron_papo.testing import run_distributed

TOL = dict(rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- tensor parallel


def _tp_logits_and_grads(tp):
    initialize_model_parallel(1, 1)
    full = G.reference_weights()
    batch = G.make_batches(1)[0]

    def run(model):
        logits = model(batch["tokens"], batch["position_ids"], None)  # [b, s, vocab/tp]
        loss = vocab_parallel_cross_entropy(logits.transpose(0, 1).contiguous(),
                                            batch["labels"].t().contiguous()).mean()
        loss.backward()
        return logits.detach(), loss.detach()

    ref_model = G.build_gpt(G.gpt_config())
    G.load_full_weights(ref_model, full)
    ref_logits, ref_loss = run(ref_model)
    ref_grads = {n: p.grad.clone() for n, p in ref_model.named_parameters()}
    parallel_state.destroy_model_parallel()

    initialize_model_parallel(tp, 1)
    model = G.build_gpt(G.gpt_config(tp=tp))
    G.load_full_weights(model, full)
    logits, loss = run(model)
    return dict(tp_rank=parallel_state.get_tensor_model_parallel_rank(), logits=logits, loss=loss,
                grads=G.shard_records(model), ref_logits=ref_logits, ref_loss=ref_loss,
                ref_grads=ref_grads)


def test_tp2_logits_and_grads_equal_tp1():
    """Catches: wrong column/row-parallel split, missing all-reduce, vocab-parallel CE errors."""
    results = run_distributed(_tp_logits_and_grads, 2, 2)
    ref = results[0]
    logits = torch.cat([r["logits"] for r in sorted(results, key=lambda r: r["tp_rank"])], dim=-1)
    torch.testing.assert_close(logits, ref["ref_logits"], **TOL)
    for r in results:
        torch.testing.assert_close(r["loss"], ref["ref_loss"], **TOL)
    grads = G.assemble([rec for r in results for rec in r["grads"]])
    assert grads.keys() == ref["ref_grads"].keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref["ref_grads"][name], **TOL, msg=name)


# --------------------------------------------------------------------------- pipeline parallel


def _schedule_losses_and_grads(tp, pp, vpp=None, tied=False, num_microbatches=4):
    """Single-process reference with the no-pipelining schedule, then the same data at TP/PP."""
    initialize_model_parallel(1, 1)
    full = G.reference_weights(tied=tied)
    batches = G.make_batches(num_microbatches)
    fwd_bwd = get_forward_backward_func()
    ref_model = G.build_gpt(G.gpt_config(), tied=tied)
    G.load_full_weights(ref_model, full)
    ref_losses = fwd_bwd(forward_step_func=G.forward_step, data_iterator=iter(batches),
                         model=[ref_model], num_microbatches=num_microbatches, seq_length=G.SEQ,
                         micro_batch_size=G.MBS, forward_only=False)
    ref_grads = {n: p.grad.clone() for n, p in ref_model.named_parameters()}
    parallel_state.destroy_model_parallel()

    initialize_model_parallel(tp, pp, vpp)
    config = G.gpt_config(tp=tp, pp=pp, vpp=vpp)
    config.batch_p2p_comm = default_batch_p2p_comm(config)
    check_pipeline_communication(config)
    chunks = [G.build_gpt(config, tied=tied, vp_stage=v if vpp else None) for v in range(vpp or 1)]
    for chunk in chunks:
        G.load_full_weights(chunk, full)
    fwd_bwd = get_forward_backward_func()
    iterators = [iter(batches) for _ in chunks] if vpp else iter(batches)
    losses = fwd_bwd(forward_step_func=G.forward_step, data_iterator=iterators, model=chunks,
                     num_microbatches=num_microbatches, seq_length=G.SEQ, micro_batch_size=G.MBS,
                     forward_only=False)
    records = [rec for chunk in chunks for rec in G.shard_records(chunk)]
    return dict(losses=[d["loss"] for d in losses], grads=records,
                ref_losses=[d["loss"] for d in ref_losses], ref_grads=ref_grads,
                last_stage=parallel_state.is_pipeline_last_stage())


def _check_schedule_results(results, num_microbatches=4):
    ref = results[0]
    last = [r for r in results if r["last_stage"]]
    assert last and all(len(r["losses"]) == num_microbatches for r in last)
    for r in last:
        for got, want in zip(r["losses"], ref["ref_losses"]):
            torch.testing.assert_close(got, want, **TOL)
    for r in results:
        if not r["last_stage"]:
            assert r["losses"] == []
    grads = G.assemble([rec for r in results for rec in r["grads"]])
    assert grads.keys() == ref["ref_grads"].keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref["ref_grads"][name], **TOL, msg=name)


def test_pp2_1f1b_losses_and_grads_equal_single_process():
    """Catches: wrong p2p shapes/order in 1F1B, layers assigned to the wrong stage, lost grads."""
    _check_schedule_results(run_distributed(_schedule_losses_and_grads, 2, tp=1, pp=2))


def test_tp2_pp2_tied_embeddings_on_4_ranks():
    """TP=2 x PP=2 with tied embeddings: the first-stage embedding and last-stage output copy
    must start equal (megatron all-reduces them at build time) and their grads sum to the
    reference grad."""
    _check_schedule_results(run_distributed(_schedule_losses_and_grads, 4, tp=2, pp=2, tied=True))


def test_interleaved_pp2_vpp2_is_exact_on_gloo():
    """Interleaved 1F1B (2 virtual stages per rank) with the p2p mode chosen for gloo is exact."""
    _check_schedule_results(run_distributed(_schedule_losses_and_grads, 2, tp=1, pp=2, vpp=2))


def _interleaved_with_batched_p2p():
    initialize_model_parallel(1, 2, 2)
    config = G.gpt_config(pp=2, vpp=2, batch_p2p_comm=True)
    check_pipeline_communication(config)


def test_interleaved_pp_with_batched_p2p_refused_on_gloo():
    """Catches: silently wrong interleaved results (batched p2p is mis-ordered on gloo)."""
    with pytest.raises(AssertionError) as info:
        run_distributed(_interleaved_with_batched_p2p, 2)
    assert "ParallelConfigError" in str(info.value)
    assert "batch_p2p_comm=false" in str(info.value)


def test_parallel_layout_not_dividing_world_is_refused():
    with pytest.raises(AssertionError) as info:
        run_distributed(initialize_model_parallel, 2, 4, 1)
    assert "world size 2 is not divisible by tensor_model_parallel_size (4)" in str(info.value)
    assert ParallelConfigError.__name__ in str(info.value)


# --------------------------------------------------------------------------- DDP + optimizer

LR = 1e-2
ADAM = dict(betas=(0.9, 0.95), eps=1e-8)


def _megatron_optimizer(model, distributed):
    return get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=LR, weight_decay=0.0, adam_beta1=ADAM["betas"][0],
                        adam_beta2=ADAM["betas"][1], adam_eps=ADAM["eps"], clip_grad=1.0,
                        use_distributed_optimizer=distributed, params_dtype=torch.float32),
        [model])


def _ddp_model(config, full, distributed):
    model = G.build_gpt(config)
    G.load_full_weights(model, full)
    ddp = DistributedDataParallel(
        config, DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                              use_distributed_optimizer=distributed),
        model)
    config.finalize_model_grads_func = finalize_model_grads
    return ddp


def _train_step(ddp, optimizer, batches):
    ddp.zero_grad_buffer()
    optimizer.zero_grad()
    get_forward_backward_func()(
        forward_step_func=G.forward_step, data_iterator=iter(batches), model=[ddp],
        num_microbatches=len(batches), seq_length=G.SEQ, micro_batch_size=G.MBS,
        forward_only=False)
    ok, grad_norm, _ = optimizer.step()
    assert ok
    return grad_norm


def _ddp_distributed_optimizer_step():
    initialize_model_parallel(1, 1)  # 2 ranks -> data-parallel size 2
    full = G.reference_weights()
    batches = G.make_batches(2)
    dp_rank = parallel_state.get_data_parallel_rank()

    # reference: one process, whole global batch, torch AdamW, torch grad clipping
    ref = G.build_gpt(G.gpt_config())
    G.load_full_weights(ref, full)
    opt = torch.optim.AdamW(ref.parameters(), lr=LR, weight_decay=0.0, **ADAM)
    loss = sum(G.forward_step(iter([b]), ref)[0].mean() for b in batches) / len(batches)
    loss.backward()
    ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0).item()
    opt.step()
    ref_after = {n: p.detach().clone() for n, p in ref.named_parameters()}

    ddp = _ddp_model(G.gpt_config(), full, distributed=True)
    optimizer = _megatron_optimizer(ddp, distributed=True)
    grad_norm = _train_step(ddp, optimizer, [batches[dp_rank]])
    after = {n: p.detach().clone() for n, p in ddp.module.named_parameters()}
    return dict(after=after, grad_norm=grad_norm, ref_after=ref_after, ref_norm=ref_norm,
                before=full)


def test_ddp_distributed_optimizer_step_equals_single_process():
    """Catches: wrong DP grad averaging, distributed-optimizer shard/gather errors, grad clipping."""
    results = run_distributed(_ddp_distributed_optimizer_step, 2)
    for r in results:
        assert r["grad_norm"] == pytest.approx(r["ref_norm"], rel=1e-5)
        assert r["after"].keys() == r["ref_after"].keys()
        for name, value in r["after"].items():
            torch.testing.assert_close(value, r["ref_after"][name], **TOL, msg=name)
        # the step really moved every weight
        for name, value in r["after"].items():
            assert not torch.equal(value, r["before"][name]), name


# --------------------------------------------------------------------------- dist_checkpointing

CKPT_META = {"distrib_optim_sharding_type": "fully_reshardable"}


def _checkpoint_state(ddp, optimizer, is_loading):
    model_sd = ddp.module.sharded_state_dict()
    return {"model": model_sd,
            "optimizer": optimizer.sharded_state_dict(model_sd, is_loading=is_loading,
                                                      metadata=CKPT_META)}


def _save_at_tp2_then_step(ckpt_dir):
    initialize_model_parallel(1, 1)
    full = G.reference_weights()
    parallel_state.destroy_model_parallel()
    initialize_model_parallel(2, 1)  # 2 ranks: TP=2, DP=1
    batches = G.make_batches(2, seed=11)
    ddp = _ddp_model(G.gpt_config(tp=2), full, distributed=True)
    optimizer = _megatron_optimizer(ddp, distributed=True)
    _train_step(ddp, optimizer, batches)
    saved = G.shard_records(ddp.module, what="param")
    dist_checkpointing.save(_checkpoint_state(ddp, optimizer, is_loading=False), ckpt_dir)
    _train_step(ddp, optimizer, G.make_batches(2, seed=12))
    return dict(saved=saved, after_next_step=G.shard_records(ddp.module, what="param"))


def _load_at_tp1_then_step(ckpt_dir):
    initialize_model_parallel(1, 1)  # 2 ranks: TP=1, DP=2
    full = G.reference_weights(seed=99)  # different weights: the load must overwrite them
    ddp = _ddp_model(G.gpt_config(), full, distributed=True)
    optimizer = _megatron_optimizer(ddp, distributed=True)
    state = dist_checkpointing.load(_checkpoint_state(ddp, optimizer, is_loading=True), ckpt_dir)
    ddp.module.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    loaded = G.shard_records(ddp.module, what="param")
    batches = G.make_batches(2, seed=12)
    dp = parallel_state.get_data_parallel_world_size()
    _train_step(ddp, optimizer, batches[parallel_state.get_data_parallel_rank()::dp])
    return dict(loaded=loaded, after_next_step=G.shard_records(ddp.module, what="param"))


def test_dist_checkpoint_saved_at_tp2_loads_at_tp1_with_optimizer_state(tmp_path):
    """Model weights load bit-identical across TP; optimizer state (Adam moments and per-param
    step count) is proven restored by the next step: TP=1 after loading matches TP=2 continuing.
    Catches e.g. megatron-core 0.16.1 sharing one AdamW ``step`` tensor across all parameters
    after a load (compat.cpu.patch_fresh_optimizer_state_for_loading)."""
    (tmp_path / "ckpt").mkdir()
    ckpt = str(tmp_path / "ckpt")
    at_tp2 = run_distributed(_save_at_tp2_then_step, 2, ckpt)
    at_tp1 = run_distributed(_load_at_tp1_then_step, 2, ckpt)
    saved = G.assemble([rec for r in at_tp2 for rec in r["saved"]], sum_tied=False)
    for r in at_tp1:
        loaded = G.assemble(r["loaded"], sum_tied=False)
        assert loaded.keys() == saved.keys()
        for name in saved:
            torch.testing.assert_close(loaded[name], saved[name], rtol=0, atol=0, msg=name)
    continued = G.assemble([rec for r in at_tp2 for rec in r["after_next_step"]], sum_tied=False)
    for r in at_tp1:
        resumed = G.assemble(r["after_next_step"], sum_tied=False)
        for name in continued:
            torch.testing.assert_close(resumed[name], continued[name], **TOL, msg=name)

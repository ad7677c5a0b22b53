"""A tiny megatron-core GPT (local spec, fp32) and helpers to load full weights into a TP/PP shard
and to reassemble full tensors from per-rank shards. Used by the foundation's parallel tests."""

from __future__ import annotations

from collections import defaultdict

import torch
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer import TransformerConfig

from megatron_papo.models.mapping.engine import global_megatron_name

VOCAB, SEQ, MBS = 128, 16, 2


def gpt_config(tp=1, pp=1, vpp=None, num_layers=4, batch_p2p_comm=True, **extra):
    return TransformerConfig(
        num_layers=num_layers, hidden_size=64, num_attention_heads=4, num_query_groups=2,
        kv_channels=16, ffn_hidden_size=128, normalization="RMSNorm", add_bias_linear=False,
        hidden_dropout=0.0, attention_dropout=0.0,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp, batch_p2p_comm=batch_p2p_comm,
        use_cpu_initialization=True, params_dtype=torch.float32, pipeline_dtype=torch.float32,
        gradient_accumulation_fusion=False, apply_rope_fusion=False, masked_softmax_fusion=False,
        bias_activation_fusion=False, persist_layer_norm=False, **extra)


def build_gpt(config, tied=False, vp_stage=None):
    virtual = config.virtual_pipeline_model_parallel_size is not None
    pre = parallel_state.is_pipeline_first_stage(ignore_virtual=not virtual, vp_stage=vp_stage)
    post = parallel_state.is_pipeline_last_stage(ignore_virtual=not virtual, vp_stage=vp_stage)
    return GPTModel(config, get_gpt_layer_local_spec(normalization="RMSNorm"), vocab_size=VOCAB,
                    max_sequence_length=SEQ, pre_process=pre, post_process=post,
                    share_embeddings_and_output_weights=tied, position_embedding_type="rope",
                    vp_stage=vp_stage)


def reference_weights(tied=False, seed=1234):
    """Full (TP=1, PP=1) weights, identical on every rank (needs model-parallel groups of size 1)."""
    torch.manual_seed(seed)
    model = build_gpt(gpt_config(), tied=tied)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def global_name(model, local_name: str) -> str:
    """Name of a local parameter in the full TP=1/PP=1 model (the last stage's copy of a tied
    embedding is the embedding)."""
    if local_name == "output_layer.weight" and model.share_embeddings_and_output_weights:
        return "embedding.word_embeddings.weight"
    return global_megatron_name(model, local_name)


def tp_slice(param, full):
    if getattr(param, "tensor_model_parallel", False):
        tp = parallel_state.get_tensor_model_parallel_world_size()
        return full.chunk(tp, dim=param.partition_dim)[
            parallel_state.get_tensor_model_parallel_rank()]
    return full


@torch.no_grad()
def load_full_weights(model, full):
    for name, param in model.named_parameters():
        param.copy_(tp_slice(param, full[global_name(model, name)]))


def shard_records(model, what="grad"):
    """(global name, local name, tp rank, partition dim, tensor) of each local param or grad."""
    out = []
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    for name, param in model.named_parameters():
        tensor = param.detach() if what == "param" else (
            param.main_grad if getattr(param, "main_grad", None) is not None else param.grad)
        dim = param.partition_dim if getattr(param, "tensor_model_parallel", False) else None
        out.append((global_name(model, name), name, tp_rank, dim, tensor.detach().clone()))
    return out


def assemble(records, sum_tied=True):
    """Full tensors from the records of all ranks: TP shards concatenated along their partition
    dim; a tied weight held by two modules (first-stage embedding, last-stage output layer) is
    summed (grads) or checked equal (params, ``sum_tied=False``)."""
    shards = defaultdict(dict)
    dims = {}
    for gname, lname, tp_rank, dim, tensor in records:
        shards[(gname, lname)][tp_rank] = tensor
        dims[(gname, lname)] = dim
    per_module = defaultdict(list)
    for key, by_rank in shards.items():
        parts = [by_rank[r] for r in sorted(by_rank)]
        full = parts[0] if dims[key] is None else torch.cat(parts, dim=dims[key])
        per_module[key[0]].append(full)
    out = {}
    for gname, fulls in per_module.items():
        if sum_tied:
            out[gname] = torch.stack(fulls).sum(0)
        else:
            for other in fulls[1:]:
                torch.testing.assert_close(other, fulls[0], rtol=0, atol=0)
            out[gname] = fulls[0]
    return out


def make_batches(n, seed=7):
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        tokens = torch.randint(0, VOCAB, (MBS, SEQ), generator=g)
        labels = torch.randint(0, VOCAB, (MBS, SEQ), generator=g)
        position_ids = torch.arange(SEQ).unsqueeze(0).expand(MBS, -1)
        batches.append({"tokens": tokens, "labels": labels, "position_ids": position_ids})
    return batches


def loss_func(output_tensor):
    loss = output_tensor.float().mean()
    return loss, {"loss": loss.detach().clone()}


def forward_step(data_iterator, model):
    batch = next(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    return output, loss_func

"""Checkpoint converters HF <-> Megatron: bit-exact round trips at TP=2 x PP=2, resharding,
the CLI (one process and torchrun), and every validation error's message."""

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from megatron.core import parallel_state
from safetensors.torch import load_file, save_file

import qwen_utils as Q
from megatron_papo.conversion import checkpoint as ck
from megatron_papo.conversion.atomic import OutputExistsError, atomic_output_dir
from megatron_papo.conversion.hf_io import HFCheckpointReader
from megatron_papo.models.qwen2_5_vl import ModelConfigError, load_hf_config, text_spec_from_hf
from megatron_papo.models.qwen2_5_vl.provider import forward_logits
from megatron_papo.models.qwen2_5_vl.rope_index import get_rope_index
from megatron_papo.testing import run_distributed
from megatron_papo.models.qwen2_5_vl.tiny import write_tiny_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "convert_checkpoint.py")


def write_hf(folder, tied=False, dtype=torch.bfloat16, max_shard_size="200KB"):
    """A complete tiny HF folder (several weight shards + index, tokenizer, processor)."""
    return write_tiny_checkpoint(folder, tied=tied, dtype=dtype, max_shard_size=max_shard_size)


def hf_tensors(folder):
    reader = HFCheckpointReader(folder)
    return {n: reader.get(n) for n in reader.names()}


def _roundtrip(hf_dir, mc_dir, out_dir, tp, pp):
    ck.hf_to_mcore(hf_dir, mc_dir, tp=tp, pp=pp, dtype="bf16")
    parallel_state.destroy_model_parallel()
    ck.mcore_to_hf(mc_dir, out_dir, tp=tp, pp=pp)


@pytest.mark.parametrize("tied", [False, True])
def test_roundtrip_tp2_pp2_is_bit_exact_and_loads_in_transformers(tmp_path, tied):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    hf_dir, mc, out = (str(tmp_path / n) for n in ("hf", "mc", "out"))
    write_hf(hf_dir, tied)
    run_distributed(_roundtrip, 4, hf_dir, mc, out, 2, 2)
    before, after = hf_tensors(hf_dir), hf_tensors(out)
    assert sorted(after) == sorted(before)
    for name, tensor in before.items():
        assert after[name].dtype == tensor.dtype, name
        assert torch.equal(after[name], tensor), name
    assert len(json.load(open(os.path.join(out, "model.safetensors.index.json")))["weight_map"]) \
        == len(before) or os.path.exists(os.path.join(out, "model.safetensors"))
    # both folders loaded the same way (an in-memory .to(bf16) model also casts its rotary buffers)
    batch = {k: v.to(torch.bfloat16) if k == "pixel_values" else v
             for k, v in Q.vl_batch("one_image").items()}
    with torch.no_grad():
        logits = [AutoModelForImageTextToText.from_pretrained(d, dtype=torch.bfloat16).eval()(
            **batch).logits for d in (hf_dir, out)]
    assert torch.equal(logits[0], logits[1])
    processor = AutoProcessor.from_pretrained(out)  # tokenizer and processor files carried over
    assert processor.tokenizer.convert_tokens_to_ids("<|image_pad|>") == Q.IMAGE_TOKEN
    assert json.load(open(os.path.join(out, "config.json")))["dtype"] == "bfloat16"
    assert os.path.exists(os.path.join(out, "generation_config.json"))


def _logits_from(source, tp, pp, hf_dir=None):
    """Logits at TP/PP of weights loaded from a Megatron checkpoint, or from the HF folder."""
    batch = Q.vl_batch("one_image")
    if hf_dir is None:
        spec, chunks, _ = ck.load_mcore_model(source, tp, pp, params_dtype=torch.float32)
    else:
        from megatron_papo.models.qwen2_5_vl.provider import build_model_chunks
        from megatron_papo.parallel import initialize_model_parallel

        spec = text_spec_from_hf(load_hf_config(hf_dir))
        initialize_model_parallel(tp, pp)
        chunks = build_model_chunks(spec, tp, pp, ddp=False)
        ck.load_hf_folder(chunks, spec, hf_dir)
    positions = get_rope_index(batch["input_ids"], batch["image_grid_thw"], Q.IMAGE_TOKEN)
    return forward_logits(chunks, batch["input_ids"], positions, None, batch["pixel_values"],
                          batch["image_grid_thw"])


def _write_tp2(hf_dir, mc):
    ck.hf_to_mcore(hf_dir, mc, tp=2, pp=1, dtype="fp32")


def test_checkpoint_written_at_tp2_loads_at_pp2_with_identical_logits(tmp_path):
    hf_dir, mc = str(tmp_path / "hf"), str(tmp_path / "mc")
    write_hf(hf_dir, dtype=torch.float32)
    run_distributed(_write_tp2, 2, hf_dir, mc)
    assert json.load(open(os.path.join(mc, "megatron_papo.json")))["written_at"] == {"tp": 2, "pp": 1}
    from_ckpt = run_distributed(_logits_from, 2, mc, 1, 2)
    from_hf = run_distributed(_logits_from, 2, None, 1, 2, hf_dir=hf_dir)
    assert from_ckpt[0] is None and from_hf[0] is None  # first stage
    assert torch.equal(from_ckpt[1], from_hf[1])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli(*args, nproc=None):
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
            "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), TOOL]
           if nproc else [sys.executable, TOOL]) + list(args)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)


def test_cli_converts_with_progress_refuses_an_existing_output_and_has_help(tmp_path):
    """The CLI in one process: progress and peak RSS printed; a second conversion to the same
    --out is one line naming --force. (Under torchrun at TP 2 and PP 2, then `verify` against
    transformers: tests/test_rehearse.py runs those commands.)"""
    hf_dir, mc = str(tmp_path / "hf"), str(tmp_path / "mc")
    write_hf(hf_dir)
    done = _cli("hf-to-mcore", "--hf", hf_dir, "--out", mc)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "done in" in done.stdout and "peak RSS" in done.stdout
    again = _cli("hf-to-mcore", "--hf", hf_dir, "--out", mc)
    assert again.returncode == 2 and "already exists" in again.stderr and "--force" in again.stderr
    assert "Traceback" not in again.stderr
    assert "mcore-to-hf" in _cli("--help").stdout


# --------------------------------------------------------------------------- validation


def test_tp_not_dividing_heads_is_refused_before_writing(tmp_path):
    hf_dir, mc = str(tmp_path / "hf"), str(tmp_path / "mc")
    write_hf(hf_dir)
    with pytest.raises(ModelConfigError, match="num_attention_heads=4 is not divisible by "
                                                "tensor_model_parallel_size=3"):
        ck.hf_to_mcore(hf_dir, mc, tp=3)
    with pytest.raises(ModelConfigError, match="num_hidden_layers=4 is not divisible"):
        ck.hf_to_mcore(hf_dir, mc, pp=3)
    assert not os.path.exists(mc) and os.listdir(tmp_path) == ["hf"]


def test_missing_and_unexpected_tensors_are_listed(tmp_path):
    hf_dir = str(tmp_path / "hf")
    write_hf(hf_dir, max_shard_size="50MB")
    path = os.path.join(hf_dir, "model.safetensors")
    tensors = load_file(path)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    tensors["model.layers.1.mlp.extra.weight"] = torch.zeros(2)
    save_file(tensors, path)
    with pytest.raises(ck.ConversionError) as info:
        ck.hf_to_mcore(hf_dir, str(tmp_path / "mc"))
    message = str(info.value)
    assert "1 tensors missing: model.language_model.layers.1.mlp.up_proj.weight" in message
    assert "1 unexpected tensors: model.language_model.layers.1.mlp.extra.weight" in message


def _convert_mismatched(hf_dir, mc):
    ck.hf_to_mcore(hf_dir, mc)


def test_config_shape_mismatch_names_the_tensor_and_both_shapes(tmp_path):
    hf_dir, mc = str(tmp_path / "hf"), str(tmp_path / "mc")
    write_hf(hf_dir)
    config = json.load(open(os.path.join(hf_dir, "config.json")))
    config["text_config"]["intermediate_size"] = 256  # the weights have 192
    json.dump(config, open(os.path.join(hf_dir, "config.json"), "w"))
    with pytest.raises(AssertionError) as info:
        run_distributed(_convert_mismatched, 1, hf_dir, mc)
    message = str(info.value)
    assert "MappingError: shape mismatch for megatron 'language_model.decoder.layers.0.mlp." \
        "linear_fc1.weight'" in message
    assert "[(192, 128), (192, 128)]" in message and "(512, 128)" in message
    assert not os.path.exists(mc)


def test_refuses_to_overwrite_without_force(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(OutputExistsError, match="--force"):
        ck.mcore_to_hf(str(tmp_path / "no_ckpt"), str(out))
    assert (out / "keep.txt").read_text() == "user data"


def test_crash_while_writing_leaves_no_checkpoint(tmp_path):
    out = str(tmp_path / "ckpt")
    with pytest.raises(RuntimeError, match="disk on fire"):
        with atomic_output_dir(out) as tmp:
            open(os.path.join(tmp, "weights.bin"), "w").write("half")
            raise RuntimeError("disk on fire")
    assert os.listdir(tmp_path) == []  # neither the target nor the temporary folder
    with atomic_output_dir(out) as tmp:
        open(os.path.join(tmp, "done"), "w").write("ok")
    assert os.listdir(out) == ["done"]
    with atomic_output_dir(out, force=True) as tmp:
        open(os.path.join(tmp, "new"), "w").write("ok")
    assert os.listdir(out) == ["new"] and sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_not_a_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(ck.ConversionError, match="not a megatron_papo checkpoint"):
        ck.read_meta(str(tmp_path))
    with pytest.raises(ValueError, match="no model.safetensors or model.safetensors.index.json"):
        HFCheckpointReader(str(tmp_path))


# vLLM loading an HF folder this package wrote (a training checkpoint's export), its log-probs
# equal to transformers' (1e-4, fp32): tests/test_rehearse.py.


def _training_checkpoint(hf_dir, ckpt, out):
    """A checkpoint as training writes it (model AND distributed-optimizer state, TP=2), then
    mcore-to-hf at TP=1 x PP=2: only the model is read, resharded."""
    from megatron.core import dist_checkpointing
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from megatron_papo.models.qwen2_5_vl.provider import build_model_chunks, export_hf_weights
    from megatron_papo.parallel import initialize_model_parallel

    spec = text_spec_from_hf(load_hf_config(hf_dir))
    initialize_model_parallel(2, 1)
    chunks = build_model_chunks(spec, 2, 1, use_distributed_optimizer=True)
    ck.load_hf_folder(chunks, spec, hf_dir)
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=1e-3, use_distributed_optimizer=True,
                        params_dtype=torch.float32), chunks)
    for p in chunks[0].parameters():  # a step so that the optimizer state is not empty
        p.main_grad.fill_(0.01)
    optimizer.step()
    model_sd = chunks[0].module.sharded_state_dict()
    if torch.distributed.get_rank() == 0:
        os.makedirs(os.path.join(ckpt, "weights"))
        shutil.copytree(hf_dir, os.path.join(ckpt, "hf"))
        json.dump({"format": ck.FORMAT, "kind": "training", "dtype": "fp32", "iteration": 1,
                   "written_at": {"tp": 2, "pp": 1}}, open(os.path.join(ckpt, ck.META_FILE), "w"))
    torch.distributed.barrier()
    dist_checkpointing.save(
        {"model": model_sd, "optimizer": optimizer.sharded_state_dict(
            model_sd, metadata={"distrib_optim_sharding_type": "fully_reshardable"})},
        os.path.join(ckpt, "weights"))
    trained = dict(export_hf_weights(chunks, spec))
    parallel_state.destroy_model_parallel()
    ck.mcore_to_hf(ckpt, out, tp=1, pp=2)
    return trained


def test_training_checkpoint_with_optimizer_state_converts_to_hf(tmp_path):
    hf_dir, ckpt, out = (str(tmp_path / n) for n in ("hf", "ckpt", "out"))
    write_hf(hf_dir, dtype=torch.float32)
    trained = run_distributed(_training_checkpoint, 2, hf_dir, ckpt, out)[0]
    exported = hf_tensors(out)
    assert sorted(exported) == sorted(trained)
    for name, tensor in trained.items():
        assert torch.equal(exported[name], tensor), name
    assert not torch.equal(exported["lm_head.weight"], hf_tensors(hf_dir)["lm_head.weight"])

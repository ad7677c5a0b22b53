"""HF <-> Megatron checkpoint conversion for Qwen2.5-VL, at any TP/PP, streaming.

A Megatron checkpoint written here is a folder::

    <ckpt>/megatron_papo.json   format, dtype, the TP/PP it was written at, kind
    <ckpt>/weights/             megatron-core dist_checkpointing (torch_dist): {"model": ...}
                                (training checkpoints add "optimizer", "rng", ... beside it)
    <ckpt>/hf/                  config.json, tokenizer and processor files of the source

The weights are saved from the model's sharded state dict, so training loads them at ANY TP/PP.
Both directions go through the model family's single name table (``models/qwen2_5_vl/bridge.py``)
and read/write one tensor group at a time. Every function here runs on each rank of an
initialised process group (one process, or torchrun with several).
"""

from __future__ import annotations

import json
import os
import resource
import time
import zipfile
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.utils import unwrap_model
from torch.distributed.checkpoint import FileSystemReader

from megatron_papo.compat import save_sharded
from megatron_papo.files import read_json
from megatron_papo.models.qwen2_5_vl import (
    check_parallel_layout,
    load_hf_config,
    mapping_table,
    text_spec_from_hf,
)
from megatron_papo.models.qwen2_5_vl.bridge import expected_hf_names
from megatron_papo.models.qwen2_5_vl.provider import (
    build_model_chunks,
    export_hf_weights,
    forward_logits,
    load_hf_weights,
)
from megatron_papo.models.qwen2_5_vl.rope_index import get_rope_index
from megatron_papo.parallel import initialize_model_parallel

from .atomic import atomic_output_dir, check_output
from .hf_io import (
    HFCheckpointReader,
    ShardedSafetensorsWriter,
    copy_sidecar_files,
    finalize_shards,
)

META_FILE = "megatron_papo.json"
WEIGHTS_DIR = "weights"
HF_DIR = "hf"
FORMAT = "megatron_papo/1"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


class ConversionError(ValueError):
    """Bad input for a conversion; the message names the tensor/file/option and the fix."""


@dataclass
class ConversionStats:
    seconds: float
    peak_rss_bytes: int  # max over ranks
    tensors: int

    def report(self) -> str:
        return (f"done in {self.seconds:.1f} s, {self.tensors} tensors, peak RSS "
                f"{self.peak_rss_bytes / 2**30:.2f} GiB (max over ranks)")


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _log(message: str) -> None:
    if _rank() == 0:
        print(f"[convert] {message}", flush=True)


def _own_peak_rss() -> int:
    """Peak RSS of this process: VmHWM (per address space, so not inherited from a parent that
    forked us, unlike getrusage's ru_maxrss); getrusage where /proc is absent."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_rss_bytes() -> int:
    """This process's peak resident set size, max over ranks."""
    value = torch.tensor([_own_peak_rss()], dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return int(value.item())


def _dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    if name not in DTYPES:
        raise ConversionError(f"--dtype {name!r}: choose one of {sorted(DTYPES)}")
    return DTYPES[name]


def _check_world(tp: int, pp: int) -> None:
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world % (tp * pp):
        raise ConversionError(f"{world} processes cannot hold TP={tp} x PP={pp}: launch a "
                              f"multiple of {tp * pp} processes (torchrun --nproc-per-node)")


def _spec_and_layout(hf_config: dict, tp: int, pp: int, stages: dict):
    spec = text_spec_from_hf(hf_config)
    check_parallel_layout(spec, tp, pp, vision_heads=(spec.vision or {}).get("num_heads"),
                          **stages)
    _check_world(tp, pp)
    return spec


def _stages(first_stage_layers: int | None, last_stage_layers: int | None) -> dict:
    return dict(first_stage_layers=first_stage_layers, last_stage_layers=last_stage_layers)


def _list(names, limit=12) -> str:
    names = sorted(names)
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def validate_hf_tensors(spec, reader: HFCheckpointReader, table) -> dict[str, str]:
    """canonical name -> on-disk name; refuses missing or unexpected tensors, listing them."""
    convention = table.detect_convention(reader.names())
    canonical = {convention.to_canonical(n): n for n in reader.names()}
    expected = set(expected_hf_names(spec))
    optional = {"lm_head.weight"} if spec.tie_word_embeddings else set()
    missing = expected - set(canonical)
    unexpected = set(canonical) - expected - optional
    problems = []
    if missing:
        problems.append(f"{len(missing)} tensors missing: {_list(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensors: {_list(unexpected)}")
    if problems:
        raise ConversionError(
            f"the weights in {reader.folder} do not match its config.json "
            f"(Qwen2.5-VL, {spec.transformer['num_layers']} layers, vision depth "
            f"{(spec.vision or {}).get('depth')}, tie_word_embeddings={spec.tie_word_embeddings}): "
            + "; ".join(problems))
    return canonical


def hf_folder_reader(hf_dir: str, spec) -> tuple[dict[str, str], HFCheckpointReader]:
    """Validated access to an HF folder's tensors: (canonical name -> on-disk name, reader)."""
    reader = HFCheckpointReader(hf_dir)
    return validate_hf_tensors(spec, reader, mapping_table(spec.tie_word_embeddings)), reader


def load_hf_folder(chunks: list, spec, hf_dir: str, on_read=None) -> int:
    """Load an HF folder into this rank's chunks (any TP/PP), reading one tensor group at a time.
    Returns the number of HF tensors in the folder."""
    on_disk, reader = hf_folder_reader(hf_dir, spec)

    def get(name: str) -> torch.Tensor:
        if on_read is not None:
            on_read()
        return reader.get(on_disk[name])

    load_hf_weights(chunks, spec, get)
    return len(on_disk)


def _progress(total: int, what: str):
    state = {"done": 0, "next": 0.1}

    def tick(n: int = 1):
        state["done"] += n
        if total and state["done"] / total >= state["next"]:
            _log(f"{what}: {state['done']}/{total} tensors ({100 * state['done'] // total}%)")
            while state["next"] <= state["done"] / total:
                state["next"] += 0.1
    return tick


# --------------------------------------------------------------------------- HF -> Megatron


def hf_to_mcore(hf_dir: str, out: str, tp: int = 1, pp: int = 1, dtype: str = "bf16",
                force: bool = False, first_stage_layers: int | None = None,
                last_stage_layers: int | None = None) -> ConversionStats:
    """Convert an HF Qwen2.5-VL folder into a Megatron dist checkpoint (loadable at any TP/PP).
    Each rank reads only the HF tensors of its own TP/PP shard, one tensor group at a time.
    ``first_stage_layers`` / ``last_stage_layers``: uneven pipeline stages of the conversion
    (the checkpoint itself is layout-free)."""
    stages = _stages(first_stage_layers, last_stage_layers)
    start = time.time()
    check_output(out, force, [hf_dir])  # before any work
    params_dtype = _dtype(dtype)
    hf_config = load_hf_config(hf_dir)
    spec = _spec_and_layout(hf_config, tp, pp, stages)
    on_disk, _ = hf_folder_reader(hf_dir, spec)  # refuses missing/unexpected tensors up front
    table = mapping_table(spec.tie_word_embeddings)
    _log(f"{hf_dir}: {len(on_disk)} tensors, naming '{table.detect_convention(on_disk.values()).name}'"
         f"; building TP={tp} PP={pp} shards in {dtype}")

    initialize_model_parallel(tp, pp)
    # no random initialisation: every weight is overwritten from the HF tensors
    chunks = build_model_chunks(spec, tp, pp, ddp=False, params_dtype=params_dtype,
                                perform_initialization=False, **stages)
    load_hf_folder(chunks, spec, hf_dir,
                   on_read=_progress(max(len(on_disk) // pp, 1), "read HF tensors (rank 0's shard)"))

    with atomic_output_dir(out, force, [hf_dir]) as tmp:
        weights = os.path.join(tmp, WEIGHTS_DIR)
        if _rank() == 0:
            os.makedirs(weights)
            os.makedirs(os.path.join(tmp, HF_DIR))
            copy_sidecar_files(hf_dir, os.path.join(tmp, HF_DIR))
            with open(os.path.join(tmp, META_FILE), "w") as f:
                json.dump({"format": FORMAT, "kind": "converted", "dtype": dtype,
                           "written_at": {"tp": tp, "pp": pp}, "source": os.path.abspath(hf_dir)},
                          f, indent=2)
        if dist.is_initialized():
            dist.barrier()
        _log(f"writing dist checkpoint to {out}")
        save_sharded({"model": chunks[0].sharded_state_dict()}, weights)
    stats = ConversionStats(time.time() - start, peak_rss_bytes(), len(on_disk))
    _log(stats.report())
    return stats


# --------------------------------------------------------------------------- Megatron -> HF


def read_meta(ckpt: str) -> dict:
    path = os.path.join(ckpt, META_FILE)
    if not os.path.isfile(path):
        raise ConversionError(f"{ckpt} is not a megatron_papo checkpoint (no {META_FILE}); "
                              "convert HF weights with `convert_checkpoint.py hf-to-mcore` first")
    meta = read_json(path, ConversionError)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ConversionError(f"{path} does not describe a {FORMAT} checkpoint: repair it or "
                              "convert the HF weights again")
    return meta


def dist_checkpoint_problem(weights: str) -> str | None:
    """None if ``weights`` holds a complete megatron-core dist checkpoint (torch_dist), else
    what is wrong, naming the file: a missing or unreadable metadata file, a missing data file,
    or one shorter than its metadata says (a copy or a write that was cut off)."""
    for name in ("metadata.json", ".metadata", "common.pt"):
        if not os.path.isfile(os.path.join(weights, name)):
            return f"{os.path.join(weights, name)} is missing"
    try:
        read_json(os.path.join(weights, "metadata.json"), ConversionError)
        metadata = FileSystemReader(weights).read_metadata()
    except ConversionError as err:
        return str(err)
    except Exception as err:  # noqa: BLE001  (unpickling a cut-off file: any error type)
        return f"{os.path.join(weights, '.metadata')} cannot be read ({type(err).__name__}: {err})"
    needed: dict[str, int] = {}
    for info in metadata.storage_data.values():
        end = info.offset + info.length
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), end)
    for file, end in sorted(needed.items()):
        path = os.path.join(weights, file)
        if not os.path.isfile(path):
            return f"{path} is missing"
        size = os.path.getsize(path)
        if size < end:
            return f"{path} is truncated ({size} bytes, the metadata needs {end})"
    if not zipfile.is_zipfile(os.path.join(weights, "common.pt")):
        return f"{os.path.join(weights, 'common.pt')} is truncated or corrupt"
    return None


def check_dist_checkpoint(ckpt: str) -> None:
    """Refuse an incomplete or damaged checkpoint before any rank starts reading it."""
    problem = dist_checkpoint_problem(os.path.join(ckpt, WEIGHTS_DIR))
    if problem:
        raise ConversionError(f"checkpoint {ckpt} is incomplete or damaged: {problem}; use "
                              "another checkpoint (training keeps the previous ones)")


def load_mcore_model(ckpt: str, tp: int, pp: int, params_dtype: torch.dtype | None = None,
                     hf_config_dir: str | None = None, ddp: bool = False,
                     first_stage_layers: int | None = None, last_stage_layers: int | None = None):
    """Build this rank's chunks at TP/PP and load the checkpoint's model weights (resharded by
    dist_checkpointing from whatever layout it was written at). Returns (spec, chunks, meta)."""
    meta = read_meta(ckpt)
    hf_config = load_hf_config(hf_config_dir or os.path.join(ckpt, HF_DIR))
    stages = _stages(first_stage_layers, last_stage_layers)
    spec = _spec_and_layout(hf_config, tp, pp, stages)
    check_dist_checkpoint(ckpt)
    dtype = params_dtype or _dtype(meta.get("dtype", "fp32"))
    initialize_model_parallel(tp, pp)
    chunks = build_model_chunks(spec, tp, pp, ddp=ddp, params_dtype=dtype,
                                perform_initialization=False, **stages)
    model = unwrap_model(chunks[0])
    try:
        state = dist_checkpointing.load({"model": model.sharded_state_dict()},
                                        os.path.join(ckpt, WEIGHTS_DIR))
    except OSError:
        raise  # names its file
    except Exception as err:  # noqa: BLE001  (megatron-core and torch raise many types)
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ConversionError(
            f"the weights of {ckpt} cannot be loaded ({type(err).__name__}: {first[:300]}): is "
            f"{os.path.join(hf_config_dir or os.path.join(ckpt, HF_DIR), 'config.json')} the "
            "config of these weights?") from None
    model.load_state_dict(state["model"])
    return spec, chunks, meta


def mcore_to_hf(ckpt: str, out: str, tp: int = 1, pp: int = 1, dtype: str | None = None,
                naming: str = "hf", max_shard_bytes: int = 5 * 2**30, force: bool = False,
                hf_config_dir: str | None = None, first_stage_layers: int | None = None,
                last_stage_layers: int | None = None) -> ConversionStats:
    """Write an HF folder (sharded safetensors + index, config.json, generation config, tokenizer
    and processor files) from a Megatron checkpoint (converted or training)."""
    start = time.time()
    check_output(out, force, [ckpt, hf_config_dir])
    out_dtype = _dtype(dtype)
    spec, chunks, meta = load_mcore_model(ckpt, tp, pp, hf_config_dir=hf_config_dir,
                                          first_stage_layers=first_stage_layers,
                                          last_stage_layers=last_stage_layers)
    write_hf_folder(chunks, spec, out, hf_config_dir or os.path.join(ckpt, HF_DIR),
                    out_dtype or _dtype(meta.get("dtype", "fp32")), out_dtype, naming,
                    max_shard_bytes, force)
    stats = ConversionStats(time.time() - start, peak_rss_bytes(), len(expected_hf_names(spec)))
    _log(stats.report())
    return stats


def write_hf_folder(chunks: list, spec, out: str, sidecar_dir: str, config_dtype: torch.dtype,
                    out_dtype: torch.dtype | None = None, naming: str = "hf",
                    max_shard_bytes: int = 5 * 2**30, force: bool = False) -> None:
    """Write model chunks (any TP/PP; every rank calls it) as an HF folder: sharded safetensors
    + index, config, generation config, tokenizer and processor files copied from
    ``sidecar_dir``. The folder appears atomically."""
    table = mapping_table(spec.tie_word_embeddings)
    table.convention(naming)  # refuse an unknown naming before writing
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    writer_rank = (parallel_state.get_tensor_model_parallel_rank() == 0
                   and parallel_state.get_data_parallel_rank() == 0)
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    total = len(expected_hf_names(spec))
    tick = _progress(total // max(pp, 1), "export (rank 0's stage)")
    with atomic_output_dir(out, force, [sidecar_dir]) as tmp:
        writer = ShardedSafetensorsWriter(tmp, f"part-pp{pp_rank:04d}", max_shard_bytes,
                                          out_dtype)
        for name, tensor in export_hf_weights(chunks, spec, naming):
            tick()
            if writer_rank:
                writer.add(name, tensor)
        if writer_rank:
            writer.flush()
        parts = [writer.written if writer_rank else []]
        if dist.is_initialized():
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, parts[0])
            parts = gathered
        if _rank() == 0:
            flat = [p for rank_parts in parts for p in rank_parts]
            index = finalize_shards(tmp, flat)
            copy_sidecar_files(sidecar_dir, tmp)
            _write_configs(tmp, config_dtype)
            n = len(index["weight_map"])
            if n != total:
                raise ConversionError(f"exported {n} tensors but the config needs {total}")


def _write_configs(folder: str, dtype: torch.dtype) -> None:
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        config = json.load(f)
    config["dtype"] = DTYPE_NAMES[dtype]
    config["torch_dtype"] = DTYPE_NAMES[dtype]
    config.setdefault("architectures", ["Qwen2_5_VLForConditionalGeneration"])
    with open(path, "w") as f:
        json.dump(config, f, indent=2)
    generation = os.path.join(folder, "generation_config.json")
    if not os.path.exists(generation):
        text = config.get("text_config", config)
        with open(generation, "w") as f:
            json.dump({k: v for k, v in {"bos_token_id": text.get("bos_token_id"),
                                         "eos_token_id": text.get("eos_token_id"),
                                         "pad_token_id": text.get("pad_token_id")}.items()
                       if v is not None}, f, indent=2)


# --------------------------------------------------------------------------- verification


def sample_inputs(spec, seed: int = 0, image_patches: tuple[int, int] = (8, 12)) -> dict:
    """A text + image sample in the config's vocabulary: text, <vision_start>, image pads,
    <vision_end>, text; random pixel values for one image of ``image_patches`` patches."""
    g = torch.Generator().manual_seed(seed)
    merge = int((spec.vision or {}).get("spatial_merge_size", 2))
    h, w = image_patches
    special = {spec.image_token_id, spec.video_token_id, spec.vision_start_token_id,
               spec.vision_end_token_id}
    high = min([spec.vocab_size] + [t for t in special if t > 0])

    def text(n):
        return torch.randint(0, high, (n,), generator=g).tolist()

    ids = text(6)
    grid = None
    pixel_values = None
    if spec.vision:
        ids += ([spec.vision_start_token_id] + [spec.image_token_id] * (h * w // merge ** 2)
                + [spec.vision_end_token_id])
        patch = int(spec.vision.get("patch_size", 14))
        dim = 3 * int(spec.vision.get("temporal_patch_size", 2)) * patch * patch
        pixel_values = torch.randn(h * w, dim, generator=g)
        grid = torch.tensor([[1, h, w]])
    ids += text(6)
    input_ids = torch.tensor([ids])
    return {"input_ids": input_ids, "pixel_values": pixel_values, "image_grid_thw": grid,
            "mm_token_type_ids": (input_ids == spec.image_token_id).int()}


def verify_conversion(hf_dir: str, ckpt: str, tp: int = 1, pp: int = 1, seed: int = 0,
                      first_stage_layers: int | None = None,
                      last_stage_layers: int | None = None) -> float:
    """Max abs logit difference between transformers on ``hf_dir`` and our model on ``ckpt``
    (at TP/PP), both fp32, on a text+image sample. The same value is returned on every rank."""
    from transformers import AutoModelForImageTextToText  # seconds: only verification needs it

    text_spec_from_hf(load_hf_config(hf_dir))  # the reference exists and is Qwen2.5-VL
    HFCheckpointReader(hf_dir)
    spec, chunks, _ = load_mcore_model(ckpt, tp, pp, params_dtype=torch.float32,
                                       first_stage_layers=first_stage_layers,
                                       last_stage_layers=last_stage_layers)
    sample = sample_inputs(spec, seed)
    merge = int((spec.vision or {}).get("spatial_merge_size", 2))
    positions = get_rope_index(sample["input_ids"], sample["image_grid_thw"],
                               spec.image_token_id, merge)
    logits = forward_logits(chunks, sample["input_ids"], positions, None,
                            sample["pixel_values"], sample["image_grid_thw"])
    diff = torch.zeros(1, dtype=torch.float64)
    if logits is not None and parallel_state.get_tensor_model_parallel_rank() == 0:
        reference = AutoModelForImageTextToText.from_pretrained(hf_dir, dtype=torch.float32).eval()
        inputs = {k: v for k, v in sample.items() if v is not None}
        with torch.no_grad():
            ref_logits = reference(**inputs).logits
        diff[0] = (logits.float() - ref_logits.float()).abs().max().item()
    if dist.is_initialized():
        dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    return float(diff.item())

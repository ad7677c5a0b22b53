"""Qwen2.5-VL vision tower from megatron-core layers.

patch embedding (the Conv3d with kernel = stride = (2, 14, 14) is a linear map of each flattened
patch) -> window reordering -> ``depth`` megatron-core ``TransformerLayer`` blocks (bidirectional
attention confined to each window, or to each image at ``fullatt_block_indexes``; 2-D rotary
embedding; RMSNorm; gated SiLU MLP with bias) -> patch merger (RMSNorm, 2x2 spatial merge, MLP with
GELU) -> original order. Attention and MLPs are tensor-parallel like the language model's; the
tower is not pipelined (it lives on the first stage) and runs without sequence parallelism.

Variable-length attention segments (windows, or whole images at full-attention layers) travel as
``PackedSeqParams`` with batch 1 and per-patch rotary angles:
* local spec: ``qkv_format="sbhd"``: megatron-core applies the rotary embedding to the whole
  sequence and :class:`SegmentAttention` runs SDPA per segment (CPU and GPU);
* TE spec: ``qkv_format="thd"``: TE's packed (cuDNN/flash) kernel with ``cu_seqlens``; megatron-core
  (>= 0.16) maps rotary angles given for every token exactly ("freqs.size(0) == cu_seqlens[-1]").
  Written against megatron-core's ``TEDotProductAttention``; NOT yet exercised on a GPU.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.utils import sharded_state_dict_default

from .config import ModelConfigError
from .specs import RMSNorm, language_layer_spec


# --------------------------------------------------------------------------- index helpers


def vision_cu_seqlens(grid_thw: torch.Tensor) -> torch.Tensor:
    """[0, cumulative patches per image frame]: full attention is confined to each frame."""
    per_frame = torch.repeat_interleave(grid_thw[:, 1] * grid_thw[:, 2], grid_thw[:, 0])
    return F.pad(per_frame.cumsum(0), (1, 0)).to(torch.int32)


def vision_rope_positions(grid_thw: torch.Tensor, merge: int) -> torch.Tensor:
    """(h, w) of every patch, in the patch order of pixel_values: row-major over merge x merge
    blocks, row-major inside a block. Returns [n_patches, 2]."""
    out = []
    for t, h, w in grid_thw.tolist():
        hpos = torch.arange(h).view(h, 1).expand(h, w)
        wpos = torch.arange(w).view(1, w).expand(h, w)
        shape = (h // merge, merge, w // merge, merge)
        hpos = hpos.reshape(shape).transpose(1, 2).flatten()
        wpos = wpos.reshape(shape).transpose(1, 2).flatten()
        out.append(torch.stack([hpos, wpos], dim=-1).repeat(t, 1))
    return torch.cat(out)


def vision_window_index(grid_thw: torch.Tensor, merge: int, window_size: int, patch_size: int,
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Order of merge units (2x2 patch groups) that makes every attention window contiguous, and
    the window boundaries in patches. Windows are ``window_size`` pixels square; images whose
    merged grid does not divide into windows get smaller windows at the right/bottom edge."""
    side = window_size // merge // patch_size  # window side in merge units
    unit = merge * merge
    order, bounds, offset = [], [0], 0
    for t, h, w in grid_thw.tolist():
        gh, gw = h // merge, w // merge
        index = torch.arange(t * gh * gw).view(t, gh, gw)
        nh, nw = -(-gh // side), -(-gw // side)
        padded = F.pad(index, (0, nw * side - gw, 0, nh * side - gh), value=-1)
        windows = padded.view(t, nh, side, nw, side).permute(0, 1, 3, 2, 4).reshape(t * nh * nw, -1)
        sizes = (windows >= 0).sum(1)
        order.append(windows[windows >= 0] + offset)
        for size in sizes.tolist():
            if size:
                bounds.append(bounds[-1] + size * unit)
        offset += t * gh * gw
    return torch.cat(order), torch.tensor(bounds, dtype=torch.int32)


def consecutive_duplicates(pixel_values: torch.Tensor, grid_thw: torch.Tensor, merge_units: int = 4):
    """Images equal to the image before them (same grid, equal pixels), as in a rollout batch
    where the n samples of a prompt carry its image. Returns None if there are none, else
    ((distinct pixel_values, distinct grid_thw), index) where ``features_of_distinct[index]``
    are the features of every image in the original order. Same features, same gradients (the
    repeated uses sum into the one encoding), a fraction of the work."""
    if len(grid_thw) < 2:
        return None
    if bool((grid_thw == grid_thw[0]).all()):  # one grid (the usual batch): one comparison
        images = pixel_values.reshape(len(grid_thw), int(grid_thw[0].prod()), -1)
        repeated = (images[1:] == images[:-1]).flatten(1).all(-1)
    else:
        ends = grid_thw.prod(-1).cumsum(0).tolist()
        starts = [0] + ends[:-1]
        repeated = torch.tensor([
            torch.equal(grid_thw[i], grid_thw[i - 1]) and torch.equal(
                pixel_values[starts[i]:ends[i]], pixel_values[starts[i - 1]:ends[i - 1]])
            for i in range(1, len(grid_thw))])
    repeated = repeated.to(grid_thw.device)  # the pixel comparison ran on pixel_values' device
    return _runs(pixel_values, grid_thw,
                 torch.cat([torch.ones(1, dtype=torch.bool, device=grid_thw.device), ~repeated]),
                 merge_units)


def keyed_duplicates(pixel_values: torch.Tensor, grid_thw: torch.Tensor, keys: torch.Tensor,
                     merge_units: int = 4):
    """:func:`consecutive_duplicates` from keys [images] (equal keys in a row = equal images)
    instead of comparing pixels."""
    keys = keys.to("cpu")
    if len(keys) != len(grid_thw):
        raise ValueError(f"{len(keys)} image keys for {len(grid_thw)} images")
    if len(keys) < 2:
        return None
    new = torch.cat([torch.ones(1, dtype=torch.bool), keys[1:] != keys[:-1]])
    return _runs(pixel_values, grid_thw, new.to(grid_thw.device), merge_units)


def _runs(pixel_values: torch.Tensor, grid_thw: torch.Tensor, new: torch.Tensor,
          merge_units: int):
    """The result of :func:`consecutive_duplicates` given ``new`` [images] (True: the image
    starts a run of equal images); None when every image starts one."""
    if bool(new.all()):
        return None
    patches = grid_thw.prod(-1)
    owner = new.cumsum(0) - 1
    kept_features = patches[new] // merge_units
    offsets = kept_features.cumsum(0) - kept_features
    index = torch.repeat_interleave(offsets[owner], kept_features[owner]) + _ranges(
        kept_features[owner])
    starts = patches.cumsum(0) - patches
    rows = torch.repeat_interleave(starts[new], patches[new]) + _ranges(patches[new])
    return (pixel_values[rows.to(pixel_values.device)], grid_thw[new]), index


def _ranges(lengths: torch.Tensor) -> torch.Tensor:
    """0..n-1 for each n in ``lengths``, concatenated."""
    starts = torch.repeat_interleave(lengths.cumsum(0) - lengths, lengths)
    return torch.arange(int(lengths.sum())) - starts


# --------------------------------------------------------------------------- attention


class SegmentAttention(MegatronModule):
    """Bidirectional core attention confined to segments (``packed_seq_params.cu_seqlens_q``),
    computed with torch SDPA one segment at a time. Input q/k/v: [s, 1, heads/TP, head_dim];
    output [s, 1, heads/TP * head_dim]. Runs on CPU and GPU (the TE spec uses TE's packed
    kernel instead)."""

    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type: AttnMaskType,
                 attention_type: str, attention_dropout: float | None = None,
                 softmax_scale: float | None = None, cp_comm_type: str | None = None,
                 pg_collection=None):
        super().__init__(config=config)
        self.softmax_scale = softmax_scale

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None,
                attention_bias=None, packed_seq_params: PackedSeqParams | None = None):
        s, b, heads, dim = query.shape
        if key.shape[2] != heads:  # grouped-query attention
            repeat = heads // key.shape[2]
            key = key.repeat_interleave(repeat, dim=2)
            value = value.repeat_interleave(repeat, dim=2)
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))  # [b, heads, s, dim]
        bounds = [0, s] if packed_seq_params is None else packed_seq_params.cu_seqlens_q.tolist()
        out = torch.empty_like(q)
        # segments of one length run as one batched SDPA (a batch of same-size images has a few
        # distinct window lengths; one call per segment costs ~0.1 ms each on CPU)
        by_length: dict[int, list[int]] = {}
        for a, e in zip(bounds[:-1], bounds[1:]):
            by_length.setdefault(e - a, []).append(a)
        for length, starts in by_length.items():
            if len(starts) == 1:
                a = starts[0]
                out[:, :, a:a + length] = F.scaled_dot_product_attention(
                    q[:, :, a:a + length], k[:, :, a:a + length], v[:, :, a:a + length],
                    scale=self.softmax_scale)
                continue
            index = (torch.tensor(starts)[:, None] + torch.arange(length)).flatten().to(q.device)

            def gather(x):
                return x.index_select(2, index).unflatten(2, (len(starts), length))
            result = F.scaled_dot_product_attention(gather(q), gather(k), gather(v),
                                                    scale=self.softmax_scale)
            out.index_copy_(2, index, result.flatten(2, 3))
        return out.permute(2, 0, 1, 3).reshape(s, b, heads * dim)


def vision_layer_spec(name: str = "local") -> ModuleSpec:
    """The vision block: the GPT layer spec with bidirectional, segment-confined attention
    (local: :class:`SegmentAttention`; te: TE's attention on the packed THD layout, where
    megatron-core turns ``no_mask`` into TE's ``padding`` mask over ``cu_seqlens``)."""
    spec = copy.deepcopy(language_layer_spec(name))
    attention = spec.submodules.self_attention
    attention.params = {**attention.params, "attn_mask_type": AttnMaskType.no_mask}
    if name == "local":
        attention.submodules.core_attention = SegmentAttention
    return spec


PACKED_FORMAT = {"local": "sbhd", "te": "thd"}


def segments(bounds: torch.Tensor, qkv_format: str, device) -> PackedSeqParams:
    """Attention segments [bounds[i], bounds[i+1]) of one packed sequence."""
    bounds = bounds.to(device=device, dtype=torch.int32)
    longest = int((bounds[1:] - bounds[:-1]).max()) if bounds.numel() > 1 else 0
    return PackedSeqParams(qkv_format=qkv_format, cu_seqlens_q=bounds, cu_seqlens_kv=bounds,
                           max_seqlen_q=longest, max_seqlen_kv=longest)


def vision_transformer_config(vision: dict, tp: int = 1, params_dtype=torch.float32,
                              **overrides) -> TransformerConfig:
    """TransformerConfig of the vision blocks from the HF ``vision_config``."""
    heads = int(vision["num_heads"])
    if heads % tp:
        raise ModelConfigError(f"vision_config.num_heads={heads} is not divisible by "
                               f"tensor_model_parallel_size={tp}")
    hidden = int(vision["hidden_size"])
    fields = dict(
        num_layers=int(vision["depth"]), hidden_size=hidden, num_attention_heads=heads,
        num_query_groups=heads, kv_channels=hidden // heads,
        ffn_hidden_size=int(vision["intermediate_size"]), normalization="RMSNorm",
        layernorm_epsilon=1e-6, gated_linear_unit=True, activation_func=F.silu,
        add_bias_linear=True, add_qkv_bias=True, hidden_dropout=0.0, attention_dropout=0.0,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=1, sequence_parallel=False,
        params_dtype=params_dtype, pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16, fp16=params_dtype == torch.float16,
        use_cpu_initialization=not torch.cuda.is_available(), bias_activation_fusion=False,
        masked_softmax_fusion=False, persist_layer_norm=False, apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
    )
    fields.update(overrides)
    return TransformerConfig(**fields)


# --------------------------------------------------------------------------- the tower


class PatchMerger(MegatronModule):
    """RMSNorm per patch, concatenate each 2x2 merge unit, Linear -> GELU -> Linear to the
    language model's hidden size (column- then row-parallel)."""

    def __init__(self, config: TransformerConfig, merge: int, out_hidden: int, layer_norm):
        super().__init__(config=config)
        width = config.hidden_size * merge * merge
        self.ln_q = build_module(layer_norm, config=config, hidden_size=config.hidden_size,
                                 eps=1e-6)
        init = config.init_method
        self.linear_fc1 = tensor_parallel.ColumnParallelLinear(
            width, width, config=config, init_method=init, bias=True, gather_output=False)
        self.linear_fc2 = tensor_parallel.RowParallelLinear(
            width, out_hidden, config=config, init_method=config.output_layer_init_method,
            bias=True, input_is_parallel=True, skip_bias_add=False)
        self.width = width

    def forward(self, x):
        x = self.ln_q(x).reshape(-1, self.width)
        x, _ = self.linear_fc1(x)
        x = F.gelu(x)
        x, _ = self.linear_fc2(x)
        return x


class Qwen25VisionModel(MegatronModule):
    """forward(pixel_values [n_patches, C*T*P*P], grid_thw [n_images, 3]) ->
    features [n_patches / merge^2, out_hidden] in image order."""

    def __init__(self, config: TransformerConfig, vision: dict, layer_spec: str = "local"):
        super().__init__(config=config)
        self.merge = int(vision.get("spatial_merge_size", 2))
        self.patch_size = int(vision.get("patch_size", 14))
        self.window_size = int(vision.get("window_size", 112))
        self.fullatt = set(int(i) for i in vision.get("fullatt_block_indexes", []))
        patch_dim = (int(vision.get("in_channels", 3)) * int(vision.get("temporal_patch_size", 2))
                     * self.patch_size ** 2)
        self.patch_embed = torch.nn.Linear(patch_dim, config.hidden_size, bias=False,
                                           dtype=config.params_dtype)
        head_dim = config.kv_channels
        quarter = head_dim // 2
        inv_freq = 1.0 / (10000.0 ** (torch.arange(0, quarter, 2, dtype=torch.float) / quarter))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        spec = vision_layer_spec(layer_spec)
        self.packed_format = PACKED_FORMAT[layer_spec]
        self.decoder = torch.nn.Module()
        self.decoder.layers = torch.nn.ModuleList(
            [build_module(spec, config=config, layer_number=i + 1)
             for i in range(config.num_layers)])
        # our RMSNorm in both specs: the TE spec's input_layernorm is fused into linear_qkv
        self.merger = PatchMerger(config, self.merge, int(vision["out_hidden_size"]), RMSNorm)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (),
                           metadata: dict | None = None) -> dict:
        """Per-layer keys with each layer's own TP sharding (the default handler would treat the
        plain layer container as TP-replicated and save only one TP rank's shards)."""
        out = {}
        for i, layer in enumerate(self.decoder.layers):
            out.update(layer.sharded_state_dict(prefix=f"{prefix}decoder.layers.{i}.",
                                                sharded_offsets=sharded_offsets,
                                                metadata=metadata))
        # the TP group must be passed: without it megatron-core's default handler gives every TP
        # rank replica id 0 for replicated tensors ("Invalid access pattern" on save)
        tp_group = parallel_state.get_tensor_model_parallel_group()
        out.update(sharded_state_dict_default(self.patch_embed, f"{prefix}patch_embed.",
                                              sharded_offsets, metadata, tp_group=tp_group))
        out.update(self.merger.sharded_state_dict(f"{prefix}merger.", sharded_offsets, metadata))
        return out

    def rotary(self, grid_thw: torch.Tensor) -> torch.Tensor:
        """Per-patch rotary angles [n_patches, head_dim]: (h * inv_freq, w * inv_freq), twice."""
        pos = vision_rope_positions(grid_thw, self.merge).to(self.inv_freq.device)
        angles = (pos[..., None].float() * self.inv_freq).flatten(1)  # [n, head_dim / 2]
        return torch.cat([angles, angles], dim=-1)

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor,
                image_keys: torch.Tensor | None = None) -> torch.Tensor:
        """Features [image tokens, out hidden] of the images in order. ``image_keys`` [images]:
        equal keys in a row mark equal images (the caller knows: a prompt's image in its n
        samples), encoded once; without keys the pixels are compared."""
        grid_thw = grid_thw.to("cpu", torch.long)
        if image_keys is not None:
            repeats = keyed_duplicates(pixel_values, grid_thw, image_keys, self.merge ** 2)
        else:
            repeats = consecutive_duplicates(pixel_values, grid_thw, self.merge ** 2)
        if repeats is not None:  # the n samples of a prompt share its image: encode it once
            keep, expand = repeats
            pixel_values, grid_thw = keep
            return self._encode(pixel_values, grid_thw)[expand.to(pixel_values.device)]
        return self._encode(pixel_values, grid_thw)

    def _encode(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        unit = self.merge * self.merge
        window_index, window_bounds = vision_window_index(grid_thw, self.merge, self.window_size,
                                                          self.patch_size)
        device = pixel_values.device
        full = segments(vision_cu_seqlens(grid_thw), self.packed_format, device)
        windowed = segments(window_bounds, self.packed_format, device)

        def to_windows(x):
            return x.reshape(-1, unit, x.shape[-1])[window_index].reshape(-1, x.shape[-1])

        hidden = self.patch_embed(pixel_values.to(self.patch_embed.weight.dtype))
        hidden = to_windows(hidden).unsqueeze(1)  # [s, 1, h]
        rotary = to_windows(self.rotary(grid_thw))[:, None, None, :]  # [s, 1, 1, head_dim]
        for i, layer in enumerate(self.decoder.layers):
            hidden, _ = layer(hidden, attention_mask=None, rotary_pos_emb=rotary,
                              packed_seq_params=full if i in self.fullatt else windowed)
        merged = self.merger(hidden.squeeze(1))
        return merged[torch.argsort(window_index)]

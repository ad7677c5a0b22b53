"""Perception maps: which tokens of a response depend on the image, and which parts of the image
the response depends on.

* Token map: for each response token, the exact KL over the vocabulary between the policy's
  next-token distribution with the original image and with a masked image (PAPO's masking: random
  patches blackened, the training settings), averaged over several masks. PAPO's implicit
  perception loss maximises the sum of exactly these per-token KLs (estimated at the sampled
  token); here the full distributions are compared.
* Occlusion map: each region of the image (default one merged 28x28 patch of the model's input)
  covered in turn, everything else kept; the response's total KL to the original is that
  region's heat. The default cover is the image's median colour (its background, for most
  diagrams): it removes what the region shows. A black cover (PAPO's mask colour) also ADDS a
  dark blob that a model can read as content - on the counting task a black square on the white
  background is counted as a shape, and the map then lights up the empty background instead of
  the shapes.

Everything is scored with our Megatron model (one process, TP=1); sequences
of one map differ only in their pixels, so they are batched without padding.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
from dataclasses import asdict, dataclass, field

import torch
from PIL import Image

from megatron_papo.conversion import checkpoint as ck
from megatron_papo.conversion.locate import resolve_model_path
from megatron_papo.models.qwen2_5_vl import load_hf_config, text_spec_from_hf
from megatron_papo.models.qwen2_5_vl.provider import build_model_chunks, forward_logits
from megatron_papo.models.qwen2_5_vl.rope_index import get_rope_index
from megatron_papo.parallel import init_processes, initialize_model_parallel
from megatron_papo.rl.logprobs import sampling_logits
from megatron_papo.rl.masking import masked_copies
from megatron_papo.rollout.inputs import PromptEncoder


class PerceptionError(ValueError):
    """Bad input to a perception map; the message names the argument."""


@dataclass
class PerceptionMap:
    prompt: str
    response: str
    tokens: list[str]
    token_kl: list[float]              # mean over masks, per response token
    token_kl_std: list[float]
    regions: list[tuple[int, int, int, int]]   # (x0, y0, x1, y1) in the model-input image
    region_kl: list[float]             # the response's total KL with that region covered
    image_size: tuple[int, int]        # (width, height) of the (first) model-input image
    settings: dict = field(default_factory=dict)
    # several images: the image each region belongs to, and each model-input image's size
    region_image: list[int] = field(default_factory=list)
    image_sizes: list[tuple[int, int]] = field(default_factory=list)

    def image_regions(self, k: int) -> list[tuple[tuple[int, int, int, int], float]]:
        """(box, KL) of image ``k``'s regions."""
        owners = self.region_image or [0] * len(self.regions)
        return [(box, kl) for box, kl, j in zip(self.regions, self.region_kl, owners) if j == k]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)


class PerceptionScorer:
    """Our model on one process, from an HF folder or a Megatron checkpoint (converted or
    training: loaded as it is, no HF round trip; its HF sidecar folder gives the processor);
    the prompt encoding of the rollouts."""

    def __init__(self, model: str, dtype: torch.dtype = torch.float32,
                 min_pixels: int | None = None, max_pixels: int | None = None,
                 temperature: float = 1.0, batch_size: int = 16):
        init_processes()  # a no-op inside an initialised job
        found = resolve_model_path(model)
        if found.is_megatron:
            self.spec, self.chunks, _ = ck.load_mcore_model(found.path, 1, 1, params_dtype=dtype)
            processor_dir = os.path.join(found.path, ck.HF_DIR)
        else:
            initialize_model_parallel(1, 1)
            self.spec = text_spec_from_hf(load_hf_config(found.path))
            self.chunks = build_model_chunks(self.spec, ddp=False, params_dtype=dtype)
            ck.load_hf_folder(self.chunks, self.spec, found.path)
            processor_dir = found.path
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        for chunk in self.chunks:
            chunk.to(self.device)
        # no engine here: no per-prompt image limit to mirror
        self.encoder = PromptEncoder(processor_dir, min_pixels, max_pixels,
                                     max_images_per_prompt=2**16)
        self.tokenizer = self.encoder.tokenizer
        self.suppressed = self.encoder.suppressed_token_ids(self.spec.vocab_size)
        self.temperature = temperature
        self.batch_size = batch_size
        self.dtype = dtype

    # ------------------------------------------------------------------ scoring
    def _logprobs(self, ids: torch.Tensor, image_sets: list[list[Image.Image]],
                  grids: list[list[int]], first: int) -> torch.Tensor:
        """Log-probs [len(image_sets), R, V] of the sampling distribution at the positions that
        predict ids[first:], one row per set of images (each set: the prompt's images in order,
        of the sizes ``grids``; the same token ids)."""
        out = []
        for start in range(0, len(image_sets), self.batch_size):
            chunk = image_sets[start:start + self.batch_size]
            pixels = self.encoder.pixel_values([im for images in chunk for im in images]).to(
                self.device, self.dtype)
            grid_thw = torch.tensor(grids * len(chunk), device=self.device)
            batch_ids = ids[None].expand(len(chunk), -1).to(self.device)
            positions = get_rope_index(batch_ids, grid_thw, self.spec.image_token_id)
            logits = forward_logits(self.chunks, batch_ids, positions, None, pixels, grid_thw)
            z = sampling_logits(logits[:, first - 1:-1], self.temperature, self.suppressed)
            out.append(torch.log_softmax(z, dim=-1).float().cpu())
        return torch.cat(out)

    @staticmethod
    def _kl(original: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        """KL(original || other) per row and token: [B, R]."""
        p = original.exp()
        return torch.where(p > 0, p * (original - other), torch.zeros_like(p)).sum(-1)

    @staticmethod
    def _messages(images: list, question: str) -> list:
        return [{"role": "user", "content": [*({"type": "image", "image": im} for im in images),
                                             {"type": "text", "text": question}]}]

    def prepare(self, image, question: str):
        """The model-input image(s) (resized as the processor does) and the prompt's token ids.
        ``image``: one image or a list (the prompt shows them in order, then the question);
        returns the same form."""
        images = list(image) if isinstance(image, (list, tuple)) else [image]
        probe = self.encoder.encode_one(self._messages(images, question), 0)
        patch = self.encoder.processor.image_processor.patch_size
        resized = []
        for k, (_, h, w) in enumerate(probe.image_grid_thw.tolist()):
            size = (w * patch, h * patch)
            rgb = probe.images[k].convert("RGB")
            resized.append(rgb.resize(size, Image.BICUBIC) if rgb.size != size else rgb)
        encoded = self.encoder.encode_one(self._messages(resized, question), 0)
        return (resized if isinstance(image, (list, tuple)) else resized[0]), encoded

    @torch.no_grad()
    def generate(self, image: Image.Image, question: str, max_new_tokens: int) -> str:
        """A greedy response (our model, full forward per token: for short answers)."""
        _, encoded = self.prepare(image, question)
        ids = encoded.input_ids.tolist()
        prompt_len = len(ids)
        stops = {self.tokenizer.convert_tokens_to_ids("<|im_end|>"), self.tokenizer.eos_token_id}
        pixels = encoded.pixel_values.to(self.device, self.dtype)
        grid = encoded.image_grid_thw.to(self.device)
        for _ in range(max_new_tokens):
            batch = torch.tensor([ids], device=self.device)
            logits = forward_logits(self.chunks, batch, get_rope_index(
                batch, grid, self.spec.image_token_id), None, pixels, grid)
            token = int(sampling_logits(logits[0, -1], 1.0, self.suppressed).argmax())
            if token in stops:
                break
            ids.append(token)
        return self.tokenizer.decode(ids[prompt_len:])

    @torch.no_grad()
    def perception_map(self, image, question: str, response: str,
                       masks: int = 8, mask_ratio: float = 0.6, mask_patch: int = 14,
                       region: int = 28, fill="median", seed: int = 0) -> PerceptionMap:
        """``image``: one image or a list (a prompt with several images): the token map masks
        every image at once (PAPO's masked branch), the occlusion map covers one region of one
        image at a time. ``fill``: the cover of an occluded region: "median" (that image's
        median colour), "mean", or an RGB tuple (black: (0, 0, 0))."""
        resized, encoded = self.prepare(image, question)
        resized = resized if isinstance(resized, list) else [resized]
        response_ids = self.tokenizer(response, add_special_tokens=False)["input_ids"]
        if not response_ids:
            raise PerceptionError("the response is empty (the model generated nothing): give "
                                  "--response text")
        if isinstance(fill, str) and fill not in ("median", "mean"):
            raise PerceptionError(f"fill={fill!r}: choose median, mean or an RGB tuple")
        first = encoded.input_ids.shape[0]
        ids = torch.cat([encoded.input_ids, torch.tensor(response_ids)])
        # mask i blackens every image: the training's masks of a prompt at index i
        masked = [masked_copies(resized, i, mask_ratio, mask_patch, seed) for i in range(masks)]
        boxes, owners, occluded, fills = [], [], [], []
        for k, im in enumerate(resized):
            cover = _cover(im, fill)
            fills.append(list(cover))
            width, height = im.size
            for y in range(0, height, region):
                for x in range(0, width, region):
                    box = (x, y, min(x + region, width), min(y + region, height))
                    copy = im.copy()
                    copy.paste(cover, box)
                    boxes.append(box)
                    owners.append(k)
                    occluded.append(resized[:k] + [copy] + resized[k + 1:])
        scores = self._logprobs(ids, [resized] + masked + occluded,
                                encoded.image_grid_thw.tolist(), first)
        original = scores[:1]
        token_kls = self._kl(original, scores[1:1 + masks])          # [masks, R]
        region_kls = self._kl(original, scores[1 + masks:]).sum(-1)  # [regions]
        tokens = [self.tokenizer.decode([t]) for t in response_ids]
        return PerceptionMap(
            prompt=question, response=response, tokens=tokens,
            token_kl=token_kls.mean(0).tolist(),
            token_kl_std=(token_kls.std(0) if masks > 1 else torch.zeros(len(tokens))).tolist(),
            regions=boxes, region_kl=region_kls.tolist(), image_size=resized[0].size,
            settings=dict(masks=masks, mask_ratio=mask_ratio, mask_patch=mask_patch,
                          region=region, fill_rgb=fills[0] if len(fills) == 1 else fills,
                          temperature=self.temperature, seed=seed),
            region_image=owners, image_sizes=[im.size for im in resized])


def _cover(image: Image.Image, fill) -> tuple[int, int, int]:
    """The RGB cover of an occluded region of ``image``."""
    if isinstance(fill, str):
        pixels = torch.tensor(list(image.getdata()), dtype=torch.float32)
        value = pixels.median(0).values if fill == "median" else pixels.mean(0)
        fill = tuple(int(round(v)) for v in value.tolist())
    return tuple(int(v) for v in fill)


# ---------------------------------------------------------------------- rendering
def _size(result: PerceptionMap, k: int) -> tuple[int, int]:
    return tuple(result.image_sizes[k] if result.image_sizes else result.image_size)


def _images(image) -> list[Image.Image]:
    return list(image) if isinstance(image, (list, tuple)) else [image]


def heat_overlay(result: PerceptionMap, k: int = 0) -> Image.Image:
    """An RGBA image of image ``k``'s model-input size: each of its regions red with alpha ~ its
    heat (one scale for all images)."""
    overlay = Image.new("RGBA", _size(result, k), (0, 0, 0, 0))
    top = max(result.region_kl) or 1.0
    for box, value in result.image_regions(k):
        overlay.paste((255, 0, 0, int(200 * max(value, 0.0) / top)), tuple(box))
    return overlay


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_png(result: PerceptionMap, image, path: str) -> None:
    """The image(s), the occlusion heat map over each (one colour scale), and the response
    shaded by token KL."""
    import matplotlib  # optional (pip install matplotlib): only the PNG needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after use("Agg"): no display needed

    images = _images(image)
    rows = len(images)
    fig = plt.figure(figsize=(10, 1.2 + 4.3 * rows))
    band = 0.72 / rows  # the images' share of the figure height, per image
    top = max(result.region_kl) or 1.0
    for k, original in enumerate(images):
        size = _size(result, k)
        shown = original.convert("RGB").resize(size)
        bottom = 0.26 + (rows - 1 - k) * band
        suffix = f" {k + 1}" if rows > 1 else ""
        left = fig.add_axes([0.03, bottom, 0.44, band * 0.9])
        left.imshow(shown)
        left.set_title("input image" + suffix)
        left.set_xticks([])
        left.set_yticks([])
        right = fig.add_axes([0.5, bottom, 0.44, band * 0.9])
        right.imshow(shown)
        heat = torch.zeros(size[1], size[0])
        for (x0, y0, x1, y1), value in result.image_regions(k):
            heat[y0:y1, x0:x1] = value
        shown_heat = right.imshow(heat.numpy(), cmap="inferno", alpha=0.6, vmin=0, vmax=top)
        fig.colorbar(shown_heat, ax=right, fraction=0.046, label="response KL when covered")
        right.set_title("occlusion map" + suffix)
        right.set_xticks([])
        right.set_yticks([])
    text = fig.add_axes([0.03, 0.02, 0.94, 0.2])
    text.axis("off")
    text.set_title("response tokens shaded by perception KL (original vs masked image)",
                   fontsize=10)
    top = max(result.token_kl) or 1.0
    x, y = 0.0, 0.85
    for token, value in zip(result.tokens, result.token_kl):
        label = token.replace("\n", "\\n") or " "
        width = 0.012 * max(len(label), 1) + 0.01
        if x + width > 1.0:
            x, y = 0.0, y - 0.2
        text.text(x, y, label, fontsize=10, family="monospace", va="top",
                  bbox=dict(facecolor=(1.0, 0.0, 0.0, 0.85 * value / top), edgecolor="none",
                            pad=1.5))
        x += width
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_html(result: PerceptionMap, image, path: str) -> None:
    """One self-contained page: the image(s) with the heat overlay (hover a region for its
    number; one scale for all images) and the response, each token shaded by its KL (hover for
    the number)."""
    top_region = max(result.region_kl) or 1.0
    figures = []
    for k, original in enumerate(_images(image)):
        size = _size(result, k)
        shown = original.convert("RGB").resize(size)
        scale = max(1, 448 // max(size))
        w, h = size[0] * scale, size[1] * scale
        image_uri = "data:image/png;base64," + base64.b64encode(_png_bytes(shown)).decode()
        cells = "".join(
            f'<div class="r" title="KL {v:.4g}" style="left:{x0 * scale}px;top:{y0 * scale}px;'
            f'width:{(x1 - x0) * scale}px;height:{(y1 - y0) * scale}px;'
            f'background:rgba(255,0,0,{0.75 * max(v, 0) / top_region:.3f})"></div>'
            for (x0, y0, x1, y1), v in result.image_regions(k))
        figures.append(f'<div class="img" style="width:{w}px;height:{h}px"><img src="{image_uri}"'
                       f' style="width:{w}px;height:{h}px">{cells}</div>')
    top_token = max(result.token_kl) or 1.0
    spans = "".join(
        f'<span title="KL {v:.4g} (sd {s:.2g})" style="background:rgba(255,0,0,'
        f'{0.85 * v / top_token:.3f})">{html.escape(t)}</span>'
        for t, v, s in zip(result.tokens, result.token_kl, result.token_kl_std))
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>Perception map</title>
<style>body{{font-family:sans-serif;margin:2em}} .img{{position:relative;margin-bottom:1em}}
.img img{{image-rendering:pixelated}} .r{{position:absolute}}
.tokens span{{font-family:monospace;font-size:1.2em;white-space:pre;padding:1px}}</style></head>
<body><h2>Perception map</h2><p><b>Prompt:</b> {html.escape(result.prompt)}</p>
{"".join(figures)}
<p>Red: the response's total KL when that region is covered (hover for the number).</p>
<p class="tokens"><b>Response</b> (shaded by the KL between the original and masked images):<br>
{spans}</p><pre>{html.escape(json.dumps(result.settings))}</pre></body></html>"""
    with open(path, "w") as f:
        f.write(page)

"""Images as datasets and prompts carry them: PIL images, file paths, raw bytes, HF ``datasets``
image dicts ({"bytes": ..., "path": ...}). One decoder for the data loader and the rollout side."""

from __future__ import annotations

import io
import os

from PIL import Image


class ImageLoadError(ValueError):
    """An image that is missing or cannot be decoded; the message says why."""


class ImageMissingError(ImageLoadError):
    """No image: None, or a path to no file."""


# Qwen2.5-VL's processor needs each side >= one merged patch (2 x 14 px); images above this many
# pixels (PIL's own decompression-bomb line) are refused before decoding: the processor would
# only downscale them to max_pixels after holding them whole in memory.
MIN_IMAGE_SIDE = 28
MAX_IMAGE_PIXELS = 89_478_485


def _open(value):
    """A lazily opened PIL image (header read, pixels not decoded) or an ImageLoadError."""
    if value is None:
        raise ImageMissingError("the image is missing (None)")
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, (str, os.PathLike)):
        if not os.path.exists(value):
            raise ImageMissingError(f"image file '{value}' does not exist")
        return Image.open(value)
    if isinstance(value, (bytes, bytearray)):
        return Image.open(io.BytesIO(value))
    if isinstance(value, dict) and value.get("bytes") is not None:
        return Image.open(io.BytesIO(value["bytes"]))
    if isinstance(value, dict) and value.get("path"):
        return _open(value["path"])
    raise ImageLoadError(f"cannot read an image from a {type(value).__name__}; give a PIL "
                         "image, a path or bytes")


def check_image(value, min_side: int = MIN_IMAGE_SIDE,
                max_pixels: int = MAX_IMAGE_PIXELS) -> str | None:
    """Why ``value`` cannot serve as an image (a short reason for the data summary), or None.
    Reads the header only: the size is known before any pixel is decoded."""
    try:
        image = _open(value)
    except ImageMissingError:
        return "missing image"
    except Exception:  # noqa: BLE001 - PIL raises many kinds for data that is no image
        return "corrupt image"
    width, height = image.size
    if min(width, height) < min_side:
        return f"image smaller than {min_side} px"
    if width * height > max_pixels:
        return f"image larger than {max_pixels} pixels"
    return None


def load_image(value) -> Image.Image:
    """Decode ``value`` into an RGB PIL image (fully loaded)."""
    try:
        image = _open(value)
        image.load()
        return image.convert("RGB")
    except ImageLoadError:
        raise
    except Exception as err:  # noqa: BLE001 - PIL raises many kinds for corrupt data
        raise ImageLoadError(f"the image cannot be decoded ({type(err).__name__}: {err})") \
            from None

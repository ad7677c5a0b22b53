"""Images as datasets and prompts carry them: PIL images, file paths, raw bytes, HF ``datasets``
image dicts ({"bytes": ..., "path": ...}). One decoder for the data loader and the rollout side."""

from __future__ import annotations

import io
import os

from PIL import Image


class ImageLoadError(ValueError):
    """An image that is missing or cannot be decoded; the message says why."""


def load_image(value) -> Image.Image:
    """Decode ``value`` into an RGB PIL image (fully loaded)."""
    if value is None:
        raise ImageLoadError("the image is missing (None)")
    try:
        if isinstance(value, Image.Image):
            image = value
        elif isinstance(value, (str, os.PathLike)):
            if not os.path.exists(value):
                raise ImageLoadError(f"image file '{value}' does not exist")
            image = Image.open(value)
        elif isinstance(value, (bytes, bytearray)):
            image = Image.open(io.BytesIO(value))
        elif isinstance(value, dict) and value.get("bytes") is not None:
            image = Image.open(io.BytesIO(value["bytes"]))
        elif isinstance(value, dict) and value.get("path"):
            return load_image(value["path"])
        else:
            raise ImageLoadError(f"cannot read an image from a {type(value).__name__}; give a "
                                 "PIL image, a path or bytes")
        image.load()
        return image.convert("RGB")
    except ImageLoadError:
        raise
    except Exception as err:  # noqa: BLE001 - PIL raises many kinds for corrupt data
        raise ImageLoadError(f"the image cannot be decoded ({type(err).__name__}: {err})") \
            from None

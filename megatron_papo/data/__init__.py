"""Prompt datasets: HF ``datasets`` files with images (``loader``) and the embedded synthetic
counting task (``synthetic``)."""

from .loader import (
    DataConfig,
    DataError,
    Example,
    LoadSummary,
    images_per_prompt,
    load_examples,
    load_split,
)
from .synthetic import counting_rows, write_counting_dataset

__all__ = ["DataConfig", "DataError", "Example", "LoadSummary", "counting_rows",
           "images_per_prompt", "load_examples", "load_split", "write_counting_dataset"]

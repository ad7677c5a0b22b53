"""Prompt datasets from HF ``datasets`` files (parquet or JSON/JSONL, as the authors' ViRL39K and
MMK12 ship them): an image column (bytes, paths, PIL images, HF image dicts, or a list of them),
a problem column and an answer column, names configurable. Each row becomes chat messages in the
authors' prompt format (think inside <think></think>, final answer in \\boxed{}).

Bad rows (missing or corrupt image, empty problem, missing answer) are skipped and counted; more
than ``max_bad_fraction`` of them is an error naming the file and the first bad rows."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from .images import check_image, load_image

# The authors' instruction (EasyR1's math format prompt), appended to each problem.
PROMPT_TEMPLATE = (
    "{problem} You FIRST think about the reasoning process as an internal monologue and then "
    "provide the final answer. The reasoning process MUST BE enclosed within <think> </think> "
    "tags. The final answer MUST BE put in \\boxed{{}}.")


class DataError(ValueError):
    """A dataset that cannot be used; the message names the file, the column or the rows."""


@dataclass
class DataConfig:
    """``data.*``: one file per split; column names; the prompt template (``{problem}``)."""

    train_files: list[str] = field(default_factory=list)
    val_files: list[str] = field(default_factory=list)
    image_key: str = "image"
    problem_key: str = "problem"
    answer_key: str = "answer"
    # a column whose values split the held-out accuracy (val/accuracy@<value>), e.g. the hint
    # task's "hint" (right / wrong) or a source column; null: no split
    group_key: str | None = None
    prompt_template: str = PROMPT_TEMPLATE
    max_bad_fraction: float = 0.05

    def __post_init__(self):
        if "{problem}" not in self.prompt_template:
            raise DataError("data.prompt_template must contain '{problem}'")
        if not 0 <= self.max_bad_fraction <= 1:
            raise DataError(f"data.max_bad_fraction={self.max_bad_fraction} must be in [0, 1]")


@dataclass
class Example:
    messages: list            # chat messages, images as PIL
    answer: str
    source: str               # "file:row"
    group: str | None = None  # the row's data.group_key value (held-out accuracy per group)

    @property
    def image_count(self) -> int:
        return sum(1 for m in self.messages if not isinstance(m["content"], str)
                   for item in m["content"] if item.get("type") == "image")


@dataclass
class LoadSummary:
    file: str
    rows: int
    kept: int
    bad: dict[str, list[int]] = field(default_factory=dict)   # reason -> row numbers

    def line(self) -> str:
        skipped = self.rows - self.kept
        reasons = ", ".join(f"{len(rows)} {why}" for why, rows in self.bad.items())
        return (f"[data] {self.file}: {self.kept}/{self.rows} rows kept"
                + (f", {skipped} skipped ({reasons})" if skipped else ""))


def _read(path: str):
    import datasets  # imports torch (seconds): only reading a file needs it

    if not os.path.exists(path):
        raise DataError(f"data file '{path}' does not exist")
    kind = {".parquet": "parquet", ".json": "json", ".jsonl": "json"}.get(
        os.path.splitext(path)[1].lower())
    if kind is None:
        raise DataError(f"data file '{path}': use .parquet, .json or .jsonl")
    return datasets.load_dataset(kind, data_files=path, split="train")


def undecoded(table, column: str):
    """``table`` with HF ``datasets``' automatic image decoding turned off for ``column``
    (``Image()``, or a list/sequence of them): datasets would decode while iterating and a
    corrupt image would end the iteration with an exception; here each cell stays
    {"bytes", "path"} and :func:`row_images` decodes it, so a bad image is one counted row."""
    from datasets import Image as HFImage  # datasets: as in _read
    from datasets import List, Sequence  # List: datasets >= 4 (requirements.txt)

    feature = table.features.get(column)
    if isinstance(feature, HFImage) and feature.decode:
        return table.cast_column(column, HFImage(decode=False))
    inner = getattr(feature, "feature", None)
    if isinstance(feature, (List, Sequence)) and isinstance(inner, HFImage) and inner.decode:
        return table.cast_column(column, List(HFImage(decode=False)))
    if isinstance(feature, list) and len(feature) == 1 and isinstance(feature[0], HFImage):
        return table.cast_column(column, [HFImage(decode=False)])
    return table


def image_problem(raw) -> str | None:
    """Why one row's image cell (one image or a list of them, any form ``load_image`` reads)
    cannot be used, or None. Sizes are read from the file header before any pixel is decoded."""
    raws = raw if isinstance(raw, (list, tuple)) else [raw]
    if not raws or any(r is None for r in raws):
        return "missing image"
    for r in raws:
        problem = check_image(r)
        if problem:
            return problem
    return None


def row_images(raw) -> tuple[list | None, str | None]:
    """(the PIL images of one row's image cell, None), or (None, why not): absent, corrupt,
    smaller than the processor's minimum side or larger than the pixel limit."""
    problem = image_problem(raw)
    if problem:
        return None, problem
    raws = raw if isinstance(raw, (list, tuple)) else [raw]
    try:
        return [load_image(r) for r in raws], None
    except Exception:  # noqa: BLE001 - pixels that do not decode behind a valid header
        return None, "corrupt image"


def images_per_prompt(examples: list[Example], limit: int | None, setting: str,
                      default_hint: str) -> int:
    """The engine's image limit: ``limit``, or the most images any example has (at least 1). An
    example above an explicit limit is refused before any work, naming its row and
    ``setting`` (the user's key or flag, e.g. ``rollout.max_images_per_prompt=1``)."""
    if limit is None:
        return max([1] + [e.image_count for e in examples])
    over = next((e for e in examples if e.image_count > limit), None)
    if over is not None:
        raise DataError(f"{over.source}: {over.image_count} images, more than {setting}; raise "
                        f"it ({default_hint}) or drop the row")
    return limit


IMAGE_PLACEHOLDER = "<image>"


def prompt_content(text: str, images: list, where: str) -> list[dict]:
    """The user message's content: with ``<image>`` placeholders in the text (ViRL39K, MMMU
    style), the images take their places, in order; without any, the images come first (in
    order), then the text. A count that differs from the images' is an error naming the row."""
    parts = text.split(IMAGE_PLACEHOLDER)
    if len(parts) == 1:
        return [*({"type": "image", "image": im} for im in images), {"type": "text", "text": text}]
    if len(parts) - 1 != len(images):
        raise DataError(f"{where}: {len(parts) - 1} '{IMAGE_PLACEHOLDER}' placeholder(s) in the "
                        f"prompt but {len(images)} image(s) in the image column; make them agree "
                        "(one placeholder per image, or none: the images then come first) or "
                        "drop the row")
    content = []
    for k, part in enumerate(parts):
        if k:
            content.append({"type": "image", "image": images[k - 1]})
        if part.strip():
            content.append({"type": "text", "text": part})
    return content


def load_examples(path: str, config: DataConfig) -> tuple[list[Example], LoadSummary]:
    table = _read(path)
    columns = table.column_names
    for key in ("image_key", "problem_key", "answer_key", "group_key"):
        name = getattr(config, key)
        if name is not None and name not in columns:
            raise DataError(f"data.{key}='{name}' is not a column of '{path}' (columns: "
                            f"{columns})")
    table = undecoded(table, config.image_key)
    summary = LoadSummary(path, len(table), 0)
    examples = []
    for i, row in enumerate(table):
        problem, answer, raw = (row[config.problem_key], row[config.answer_key],
                                row[config.image_key])
        reason = None
        if not isinstance(problem, str) or not problem.strip():
            reason = "empty problem"
        elif answer is None or not str(answer).strip():
            reason = "missing answer"
        else:
            images, reason = row_images(raw)
        if reason:
            summary.bad.setdefault(reason, []).append(i)
            continue
        text = config.prompt_template.format(problem=problem.strip())
        content = prompt_content(text, images, f"'{path}' row {i}")
        group = None if config.group_key is None else str(row[config.group_key])
        examples.append(Example([{"role": "user", "content": content}], str(answer).strip(),
                                f"{path}:{i}", group))
    summary.kept = len(examples)
    bad = summary.rows - summary.kept
    if summary.rows and bad / summary.rows > config.max_bad_fraction:
        first = sorted(r for rows in summary.bad.values() for r in rows)[:5]
        raise DataError(f"'{path}': {bad} of {summary.rows} rows are bad ({summary.line()}); "
                        f"more than data.max_bad_fraction={config.max_bad_fraction}; first bad "
                        f"rows: {first}")
    if not examples:
        raise DataError(f"'{path}' has no usable rows")
    return examples, summary


def load_split(files: list[str], config: DataConfig, log=print) -> list[Example]:
    """All examples of a split's files, with one summary line per file."""
    examples = []
    for path in files:
        part, summary = load_examples(path, config)
        log(summary.line())
        examples += part
    return examples

"""The paper's evaluation benchmarks: one preset per benchmark (``configs/benchmark/<name>.yaml``)
that maps the dataset's own columns (as its dataset card describes them) to a prompt with the
image, the gold answer and its type, and the rows the paper keeps.

A preset holds::

    name, title, group        # group: general | vision (the paper's two groups)
    dataset, split            # where the file comes from (download it yourself: no hub access here)
    image                     # an Image column ({bytes, path} / bytes / path), or a list of them
    question                  # a format string over the columns, e.g. "{question}\\nChoices: {option}"
    answer                    # the gold answer's column
    answer_type               # letter | option_text | number | expression | text, or
                              # {column: C, map: {value of C: type}} (per row)
    choices                   # option_text only: the options' column (a list, a string repr of
                              # a list, or ';'-separated "A. x;B. y")
    filter                    # {column: [kept values]} (e.g. MathVerse: multi-choice only)

Answer types: ``letter`` (an option letter, or several "A, C"), ``option_text`` (the text of one
of the options; a boxed letter of that option counts too), ``number``, ``expression`` (LaTeX,
graded by math-verify), ``text`` (any string). Each row's gold is checked against its type; bad
rows are skipped and counted like the training loader's, and a preset whose columns are not in
the file is an error naming the column, the file and the schema the preset expects.

The prompt is the question followed by the PAPO evaluation instruction (think in <think> tags,
final answer in \\boxed{}); the protocol is avg@8 at temperature 1.0, and the paper's summary
averages each group's benchmarks without weights, and all nine for the overall number.
"""

from __future__ import annotations

import ast
import glob
import os
import re
import string
from dataclasses import dataclass, field

from .loader import DataError, Example, LoadSummary, _read, row_images, undecoded

# PAPO-Eval's instruction after each question (its processed PAPO_eval splits)
EVAL_INSTRUCTION = ("You first think through the reasoning process as an internal monologue, "
                    "enclosed within <think> </think> tags. Then, provide your final answer "
                    "enclosed within \\boxed{}.")
ANSWER_TYPES = ("letter", "option_text", "number", "expression", "text")
GROUPS = {"general": "General multimodal reasoning",
          "vision": "Vision-dependent multimodal reasoning"}
PRESET_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "configs", "benchmark")
_LETTERS = re.compile(r"^\(?[A-Z]\)?(\s*,\s*\(?[A-Z]\)?)*$")
_OPTION_PREFIX = re.compile(r"^\s*\(?([A-Z])[.):]\s*")


class BenchmarkError(DataError):
    """A benchmark preset or file that cannot be evaluated; the message names the preset, the
    file and the column or value."""


@dataclass
class BenchmarkPreset:
    name: str
    title: str
    group: str
    dataset: str
    split: str
    image: str
    question: str
    answer: str
    answer_type: str | dict
    choices: str | None = None
    filter: dict = field(default_factory=dict)
    notes: str = ""

    def where(self) -> str:
        return f"benchmark {self.name} ({os.path.join('configs', 'benchmark', self.name)}.yaml)"

    def columns(self) -> list[str]:
        names = [self.image, self.answer] + list(self.filter)
        names += [f for _, f, _, _ in string.Formatter().parse(self.question) if f]
        if self.choices:
            names.append(self.choices)
        if isinstance(self.answer_type, dict):
            names.append(self.answer_type["column"])
        return list(dict.fromkeys(names))


def available_presets() -> list[str]:
    return sorted(os.path.splitext(os.path.basename(p))[0]
                  for p in glob.glob(os.path.join(PRESET_DIR, "*.yaml")))


def load_preset(name: str) -> BenchmarkPreset:
    """``configs/benchmark/<name>.yaml`` (or a path to such a file), validated."""
    from omegaconf import OmegaConf  # ~0.1 s: only presets need it (evaluate's --help imports us)

    path = name if name.endswith(".yaml") else os.path.join(PRESET_DIR, f"{name}.yaml")
    if not os.path.exists(path):
        raise BenchmarkError(f"unknown benchmark {name!r}: choose one of {available_presets()} "
                             "or give a preset .yaml")
    raw = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    known = set(BenchmarkPreset.__dataclass_fields__)
    unknown = sorted(set(raw) - known)
    if unknown:
        raise BenchmarkError(f"{path}: {unknown[0]!r} is not a preset key; allowed: "
                             f"{sorted(known)}")
    try:
        preset = BenchmarkPreset(**raw)
    except TypeError as err:
        raise BenchmarkError(f"{path}: {err}") from None
    if preset.group not in GROUPS:
        raise BenchmarkError(f"{preset.where()}: group={preset.group!r}: choose one of "
                             f"{list(GROUPS)}")
    types = ([preset.answer_type] if isinstance(preset.answer_type, str)
             else list((preset.answer_type.get("map") or {}).values()))
    if isinstance(preset.answer_type, dict) and set(preset.answer_type) != {"column", "map"}:
        raise BenchmarkError(f"{preset.where()}: answer_type as a mapping needs exactly "
                             "'column' and 'map'")
    for kind in types:
        if kind not in ANSWER_TYPES:
            raise BenchmarkError(f"{preset.where()}: answer type {kind!r} is not one of "
                                 f"{list(ANSWER_TYPES)}")
    if "option_text" in types and not preset.choices:
        raise BenchmarkError(f"{preset.where()}: answer type option_text needs 'choices' (the "
                             "options' column)")
    return preset


def parse_options(value) -> list[str]:
    """Options as a list of texts: a list, a string repr of a list ("['a', 'b']") or one string
    of ';'-separated "A. x" items; letter prefixes are removed."""
    if value is None:
        return []
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                value = [text]
        else:
            value = [part for part in text.split(";") if part.strip()]
    return [_OPTION_PREFIX.sub("", str(v)).strip() for v in value]


def _gold(kind: str, answer: str, options: list[str]):
    """The accepted answers of one row (a string, or a tuple of alternatives), or None when
    the gold does not fit its type."""
    if kind == "letter":
        return answer.replace("(", "").replace(")", "") if _LETTERS.match(answer) else None
    if kind == "number":
        try:
            float(answer.replace(",", ""))
        except ValueError:
            return None
        return answer
    if kind == "option_text":
        matches = [i for i, o in enumerate(options) if o.strip() == answer]
        if not matches:
            return None
        return (answer, string.ascii_uppercase[matches[0]])
    return answer


def load_benchmark(preset: BenchmarkPreset | str, path: str,
                   max_bad_fraction: float = 0.05) -> tuple[list[Example], LoadSummary]:
    """The examples of a benchmark file read through its preset."""
    preset = load_preset(preset) if isinstance(preset, str) else preset
    table = _read(path)
    columns = table.column_names
    for name in preset.columns():
        if name not in columns:
            raise BenchmarkError(
                f"{preset.where()}: column {name!r} is not in '{path}' (its columns: "
                f"{columns}); the preset reads the {preset.dataset} {preset.split} schema")
    table = undecoded(table, preset.image)
    summary = LoadSummary(path, len(table), 0)
    examples = []
    for i, row in enumerate(table):
        if any(row[c] not in allowed for c, allowed in preset.filter.items()):
            summary.rows -= 1  # not part of the benchmark (the paper's selection)
            continue
        kind = preset.answer_type
        if isinstance(kind, dict):
            kind = kind["map"].get(row[kind["column"]])
            if kind is None:
                raise BenchmarkError(
                    f"{preset.where()}: row {i} of '{path}' has "
                    f"{preset.answer_type['column']}={row[preset.answer_type['column']]!r}, "
                    f"which answer_type.map does not name (it has "
                    f"{sorted(preset.answer_type['map'])})")
        answer = "" if row[preset.answer] is None else str(row[preset.answer]).strip()
        options = parse_options(row[preset.choices]) if preset.choices else []
        gold = _gold(kind, answer, options) if answer else None
        reason = None
        if gold is None:
            reason = "missing answer" if not answer else f"answer not a valid {kind}"
        else:
            images, reason = row_images(row[preset.image])
        if reason:
            summary.bad.setdefault(reason, []).append(i)
            continue
        values = {c: ("" if row[c] is None else row[c]) for c in columns}
        question = preset.question.format(**values).replace("<image>", "").strip()
        text = f"{question}\n\n{EVAL_INSTRUCTION}" if question else EVAL_INSTRUCTION
        content = [{"type": "image", "image": im} for im in images]
        content.append({"type": "text", "text": text})
        examples.append(Example([{"role": "user", "content": content}], gold, f"{path}:{i}"))
    summary.kept = len(examples)
    bad = summary.rows - summary.kept
    if summary.rows and bad / summary.rows > max_bad_fraction:
        first = sorted(r for rows in summary.bad.values() for r in rows)[:5]
        raise BenchmarkError(f"{preset.where()}: '{path}': {bad} of {summary.rows} rows are bad "
                             f"({summary.line()}); first bad rows: {first}")
    if not examples:
        raise BenchmarkError(f"{preset.where()}: '{path}' has no usable rows")
    return examples, summary


def summary_table(results: dict[str, dict], presets: dict[str, BenchmarkPreset]) -> str:
    """The paper's layout: each group's benchmarks and their unweighted mean, then the overall
    mean of all benchmarks (accuracy in %)."""
    lines, means = [], []
    for group, title in GROUPS.items():
        names = [n for n in results if presets[n].group == group]
        if not names:
            continue
        lines.append(f"{title}:")
        values = [100 * results[n]["accuracy"] for n in names]
        for n, v in zip(names, values):
            lines.append(f"  {presets[n].title:<14} {v:6.2f}")
        lines.append(f"  {'average':<14} {sum(values) / len(values):6.2f}")
        means += values
    lines.append(f"Overall ({len(means)} benchmarks): {sum(means) / len(means):.2f}")
    return "\n".join(lines)

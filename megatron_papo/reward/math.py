"""The math reward of PAPO's authors: ``accuracy_weight x accuracy + format_weight x format``
(0.9 / 0.1 by default).

* format: the response is ``<think>...</think>`` followed by an answer in ``\\boxed{...}``;
* accuracy: the content of the LAST ``\\boxed{...}`` equals the ground truth, decided by a real
  grader (``math-verify``: LaTeX/expression parsing and symbolic comparison), never by
  hand-written string normalisation. The authors use ``mathruler``; ``math-verify`` is the other
  common choice and already a dependency.

A grader failure or a non-finite reward is an error that names the sample (a silent 0 would
train the model on a broken signal).
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass

FORMAT_PATTERN = r"\s*<think>.*</think>.*\\boxed\{.*\}.*"


class RewardError(ValueError):
    """A sample whose reward cannot be computed; the message names it."""


@dataclass
class RewardConfig:
    accuracy_weight: float = 0.9
    format_weight: float = 0.1
    format_pattern: str = FORMAT_PATTERN

    def __post_init__(self):
        for key in ("accuracy_weight", "format_weight"):
            value = getattr(self, key)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise RewardError(f"reward.{key}={value!r} must be a finite number >= 0")
        try:
            self._format = re.compile(self.format_pattern, re.DOTALL)
        except re.error as err:
            raise RewardError(f"reward.format_pattern is not a valid regular expression: "
                              f"{err}") from None


@dataclass
class ScoredResponse:
    reward: float
    accuracy: float   # 1.0 / 0.0
    format: float     # 1.0 / 0.0


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (braces matched, nested ones included); None if
    there is none or it is not closed."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1:j]
    return None


def format_ok(response: str, config: RewardConfig | None = None) -> bool:
    config = config or RewardConfig()
    return config._format.fullmatch(response) is not None


@functools.lru_cache(maxsize=1 << 16)
def _grade(predicted: str, answer: str) -> bool:
    """math-verify's verdict; a pure function of the two strings, so it is memoised (the n
    responses of a group often box the same answer; sympy takes ~3 ms per comparison)."""
    from math_verify import parse, verify  # ~1 s (sympy): evaluate's CLI imports this module

    if predicted.strip() == answer.strip():  # equal strings are equal answers
        return True
    gold = parse(f"\\boxed{{{answer}}}")
    guess = parse(f"\\boxed{{{predicted}}}")
    if not gold:
        raise RewardError(f"the grader cannot read the ground-truth answer {answer!r}")
    return bool(verify(gold, guess))


def score(response: str, answer, config: RewardConfig | None = None) -> ScoredResponse:
    """Reward of one response against its ground-truth answer (or a tuple of equally accepted
    forms, e.g. a multiple-choice option's text and its letter)."""
    config = config or RewardConfig()
    golds = answer if isinstance(answer, (tuple, list)) else (answer,)
    if not golds or any(g is None or (isinstance(g, str) and not g.strip()) for g in golds):
        raise RewardError("the ground-truth answer is empty")
    fmt = 1.0 if format_ok(response, config) else 0.0
    boxed = last_boxed(response)
    acc = 1.0 if boxed is not None and boxed.strip() and any(
        _grade(boxed, str(g)) for g in golds) else 0.0
    reward = config.accuracy_weight * acc + config.format_weight * fmt
    if not math.isfinite(reward):
        raise RewardError(f"non-finite reward {reward}")
    return ScoredResponse(reward, acc, fmt)


def score_all(responses: list[str], answers: list, config: RewardConfig | None = None,
              names: list[str] | None = None) -> list[ScoredResponse]:
    """Rewards of many responses; ``names`` (e.g. "prompt 3, sample 1") label errors."""
    if len(responses) != len(answers):
        raise RewardError(f"{len(responses)} responses but {len(answers)} answers")
    config = config or RewardConfig()
    out = []
    for i, (response, answer) in enumerate(zip(responses, answers)):
        try:
            out.append(score(response, answer, config))
        except Exception as err:  # noqa: BLE001 - every failure names its sample
            name = names[i] if names else f"sample {i}"
            raise RewardError(f"reward of {name} failed ({type(err).__name__}: {err}); "
                              f"response {response[:80]!r}, answer {answer!r}") from None
    return out

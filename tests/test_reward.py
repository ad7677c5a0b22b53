"""The math reward with the real grader (math-verify): format, last-boxed accuracy, weights, and
errors that name the sample."""

import pytest

from megatron_papo.reward import (
    RewardConfig,
    RewardError,
    format_ok,
    last_boxed,
    score,
    score_all,
)


def test_last_boxed_takes_the_last_and_matches_nested_braces():
    assert last_boxed(r"first \boxed{1} then \boxed{\frac{3}{4}} done") == r"\frac{3}{4}"
    assert last_boxed("no answer") is None
    assert last_boxed(r"\boxed{unclosed") is None


@pytest.mark.parametrize("response,answer,accuracy", [
    (r"<think>count</think> \boxed{3}", "3", 1.0),
    (r"<think>half</think> the answer is \boxed{\frac{1}{2}}", "0.5", 1.0),   # symbolic
    (r"<think>x</think> \boxed{2}", "3", 0.0),
    (r"<think>x</think> \boxed{3} wait no \boxed{4}", "3", 0.0),               # the LAST box
    (r"<think>x</think> \boxed{x^2 + 2x + 1}", "(x+1)^2", 1.0),
    ("3", "3", 0.0),                                                            # no box
])
def test_accuracy_is_decided_by_the_grader(response, answer, accuracy):
    assert score(response, answer).accuracy == accuracy


def test_format_and_weights():
    assert format_ok(r"<think>a</think> so \boxed{3}")
    assert format_ok("\n<think>a\nb</think>\n\\boxed{3}.")
    assert not format_ok(r"\boxed{3}") and not format_ok("<think>a</think> 3")
    both = score(r"<think>a</think> \boxed{3}", "3")
    assert (both.reward, both.accuracy, both.format) == (pytest.approx(1.0), 1.0, 1.0)
    assert score(r"\boxed{3}", "3").reward == pytest.approx(0.9)
    assert score(r"<think>a</think> \boxed{4}", "3").reward == pytest.approx(0.1)
    assert score(r"\boxed{3}", "3", RewardConfig(0.5, 0.5)).reward == pytest.approx(0.5)


def test_errors_name_the_sample_and_the_key():
    with pytest.raises(RewardError, match=r"reward of prompt 2, sample 1 failed .*empty"):
        score_all([r"\boxed{1}", r"\boxed{1}"], ["1", ""],
                  names=["prompt 2, sample 0", "prompt 2, sample 1"])
    with pytest.raises(RewardError, match="reward.accuracy_weight=nan"):
        RewardConfig(accuracy_weight=float("nan"))
    with pytest.raises(RewardError, match="reward.format_pattern"):
        RewardConfig(format_pattern="(")

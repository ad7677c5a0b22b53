"""Rewards: the authors' math reward (accuracy by a real grader, plus format)."""

from .math import RewardConfig, RewardError, ScoredResponse, format_ok, last_boxed, score, score_all

__all__ = ["RewardConfig", "RewardError", "ScoredResponse", "format_ok", "last_boxed", "score",
           "score_all"]

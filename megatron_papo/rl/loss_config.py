"""The combined loss's settings (the main job's ``algorithm.loss``), without torch: the command
that starts the ranks validates a configuration before anything heavy is imported
(train/launch.py). The terms themselves are in :mod:`megatron_papo.rl.algorithms`."""

from __future__ import annotations

from dataclasses import dataclass

from megatron_papo.settings import SettingError

AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")


@dataclass
class LossConfig:
    """Coefficients and options of the combined loss (the main job's ``algorithm.loss``; each
    algorithm's numbers are in ``configs/algorithm/<name>.yaml``). The defaults are the loss of
    ``papo_no_kl_ref`` (the main job's default, ``papo_no_kl_ref_ds``, adds dynamic sampling to
    it: not a loss setting). Validates itself (:class:`SettingError` naming
    the field)."""

    eps_low: float = 0.2
    eps_high: float = 0.3
    dual_clip: float | None = 3.0     # the dual clip bound c (> 1) or null
    kl_beta: float = 0.0              # reference KL weight (0 = no reference model)
    prcp_gamma: float = 0.01          # implicit perception loss weight (0: GRPO)
    prcp_clip: bool = False           # clip KL_prcp to [0, 0.2]
    entropy_eta_original: float = 0.03  # double entropy loss weights (0: off)
    entropy_eta_masked: float = 0.03
    entropy_estimator: str = "sampled"  # "sampled" (authors) or "exact"
    aggregation: str = "token-mean"
    # KL_prcp and the masked entropy logged even where their weights are 0 (a gamma = 0 control
    # the perception-hacking monitor can read); costs the masked branch; the loss is unchanged
    measure_perception: bool = False

    def __post_init__(self):
        if self.aggregation not in AGGREGATIONS:
            raise SettingError("aggregation", f"={self.aggregation!r}: choose one of "
                               f"{list(AGGREGATIONS)}")
        if self.entropy_estimator not in ("sampled", "exact"):
            raise SettingError("entropy_estimator", f"={self.entropy_estimator!r}: choose "
                               "'sampled' or 'exact'")
        for name in ("eps_low", "eps_high", "kl_beta", "prcp_gamma", "entropy_eta_original",
                     "entropy_eta_masked"):
            if getattr(self, name) < 0:
                raise SettingError(name, f" must be >= 0, got {getattr(self, name)}")
        if self.dual_clip is not None and self.dual_clip <= 1.0:
            raise SettingError("dual_clip", f" must be > 1 (authors: 3.0) or null, got "
                               f"{self.dual_clip}")

    @property
    def needs_masked_branch(self) -> bool:
        return self.prcp_gamma > 0 or self.entropy_eta_masked > 0 or self.measure_perception

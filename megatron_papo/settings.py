"""The error a typed config raises for one of its own fields. The config knows its field names,
not where it sits in the user's configuration: whoever builds it from user input names the full
key (:meth:`SettingError.under`), e.g. ``algorithm.loss.prcp_gamma`` for the main job."""

from __future__ import annotations


class SettingError(ValueError):
    """``field`` (dotted within its config) is invalid; ``reason`` follows the field's name."""

    def __init__(self, field: str, reason: str):
        self.field, self.reason = field, reason
        super().__init__(f"{field}{reason}")

    def under(self, prefix: str) -> str:
        """The message with the field's full key (``prefix`` + "." + field)."""
        return f"{prefix}.{self.field}{self.reason}" if prefix else str(self)

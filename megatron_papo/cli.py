"""What the command-line entry points share: input the user has to fix ends in one line on
stderr and exit code 2, never a traceback."""

from __future__ import annotations

import sys

# the error types (by name: importing them all would pull in every subsystem) that name the
# user's file, key, column or tensor and the fix
USER_ERRORS = frozenset({
    "ConfigError", "DataError", "RolloutInputError", "RewardError", "ModelConfigError",
    "ParallelConfigError", "MappingError", "HFCheckpointError", "ConversionError",
    "OutputExistsError", "EvaluationError",
})


def is_user_error(err: BaseException) -> bool:
    return type(err).__name__ in USER_ERRORS


def fail(err: BaseException | str) -> None:
    """Print the one-line error and exit with code 2."""
    print(f"error: {err}", file=sys.stderr, flush=True)
    sys.exit(2)

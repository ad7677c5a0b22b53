"""Reading the files users bring: a broken file is one line naming it, where and the fix."""

from __future__ import annotations

import json


def read_json(path: str, error: type[Exception] = ValueError) -> dict:
    """A JSON file, or ``error`` naming the file, the line and the column of what is wrong."""
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise error(f"{path} is not valid JSON ({err.msg} at line {err.lineno}, column "
                    f"{err.colno}): repair or replace the file") from None
    except UnicodeDecodeError:
        raise error(f"{path} is not a text (JSON) file: repair or replace it") from None

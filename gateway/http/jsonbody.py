"""Request bodies as JSON, bounded in depth: a deeply nested body is a 400, never a 500."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

# No body the API takes nests more than a few levels; a generous bound still refuses the
# 100,000 `[` that made json's decoder raise RecursionError (a 500 and a traceback).
MAX_DEPTH = 32


class BadBody(ValueError):
    """Not JSON, or nested deeper than MAX_DEPTH: the message is the client's answer."""


def parse(raw: bytes) -> Any:
    try:
        data = json.loads(raw)
    except RecursionError:
        raise BadBody(f"the request body nests deeper than {MAX_DEPTH} levels") from None
    except ValueError:
        raise BadBody("the request body must be JSON") from None
    if _depth(data) > MAX_DEPTH:
        raise BadBody(f"the request body nests deeper than {MAX_DEPTH} levels")
    return data


def _depth(data: Any) -> int:
    """How deep lists and objects nest (iterative: the value is the client's)."""
    deepest = 0
    stack = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        values: Iterable[Any]
        if isinstance(value, dict):
            values = value.values()
        elif isinstance(value, list):
            values = value
        else:
            continue
        deepest = max(deepest, depth)
        if deepest > MAX_DEPTH:
            return deepest
        stack.extend((item, depth + 1) for item in values)
    return deepest

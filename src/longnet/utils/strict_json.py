"""Strict JSON: the one place longnet turns a value into the JSON it prints or writes.

Python's ``json.dumps`` writes ``NaN``, ``Infinity`` and ``-Infinity`` for non-finite floats
unless told otherwise; strict parsers (``jq``, JavaScript's ``JSON.parse``, most other languages)
reject them. Every JSON line a ``longnet`` command prints (:func:`print_json_line`) and every
JSON file written through :func:`longnet.utils.atomic.atomic_write_json` goes through
:func:`to_json`, which refuses non-finite numbers and names where the first one sits.

This module imports nothing from longnet.
"""

from __future__ import annotations

import json
import math
import sys
from typing import Any

__all__ = ["to_json", "print_json_line", "first_non_finite"]


def first_non_finite(value: Any, path: str = "$") -> tuple[str, float] | None:
    """``(where, number)`` of the first non-finite float in ``value`` (``$["loss@32"]``), or None."""
    if isinstance(value, float):
        return None if math.isfinite(value) else (path, value)
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, (list, tuple)) else ()
    for key, item in items:
        found = first_non_finite(item, f"{path}[{json.dumps(key if isinstance(key, int) else str(key))}]")
        if found is not None:
            return found
    return None


def to_json(value: Any, **dumps_kwargs: Any) -> str:
    """``json.dumps(value, allow_nan=False, **dumps_kwargs)``: strict JSON, or ``ValueError``.

    The error names the first non-finite number (``$["perplexity@512"] is nan``), so the caller
    can tell which figure went wrong; nothing is returned in that case.
    """
    try:
        return json.dumps(value, allow_nan=False, **dumps_kwargs)
    except ValueError:
        found = first_non_finite(value)
        if found is None:
            raise
        where, number = found
        raise ValueError(f"{where} is {number}, which JSON cannot hold (NaN and infinity are not JSON "
                         "numbers)") from None


def print_json_line(value: Any, *, compact: bool = False) -> None:
    """Print ``value`` as one line of strict JSON on stdout, after everything printed before it.

    ``compact``: no spaces after ``,`` and ``:`` (large documents). Raises ``ValueError`` (and
    prints nothing) when ``value`` holds NaN or infinity.
    """
    line = to_json(value, separators=(",", ":") if compact else None)
    sys.stdout.flush()
    print(line, flush=True)

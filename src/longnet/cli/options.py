"""Argument types shared by the subcommands."""

from __future__ import annotations

import argparse

__all__ = ["int_list"]


def int_list(text: str) -> list[int]:
    """``"2048,4096, 8192"`` -> ``[2048, 4096, 8192]``: positive ints, comma or space separated."""
    try:
        values = [int(x) for x in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive ints, got {text!r}")
    return values

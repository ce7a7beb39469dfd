"""Argument types and the help formatter shared by the subcommands."""

from __future__ import annotations

import argparse
import math
import textwrap

__all__ = ["HelpFormatter", "int_list", "positive_int", "non_negative_int", "positive_float"]


def int_list(text: str) -> list[int]:
    """``"2048,4096, 8192"`` -> ``[2048, 4096, 8192]``: positive ints, comma or space separated."""
    try:
        values = [int(x) for x in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive ints, got {text!r}")
    return values


def _number(text: str, convert, ok, expected: str):
    try:
        value = convert(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """``"8"`` -> 8; 0, negatives and non-ints are refused."""
    return _number(text, int, lambda v: v >= 1, "a positive int")


def non_negative_int(text: str) -> int:
    """``"0"`` -> 0; negatives and non-ints are refused."""
    return _number(text, int, lambda v: v >= 0, "an int >= 0")


def positive_float(text: str) -> float:
    """``"1.5"`` -> 1.5; 0, negatives, NaN and infinity are refused."""
    return _number(text, float, lambda v: 0 < v < math.inf, "a positive number")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` of the ``longnet`` commands: an option's default is appended only when it says
    something (not ``None``, not a flag's, not already given in the help text); in descriptions and
    epilogs each line is wrapped on its own and indented lines are kept as written, so an
    ``examples:`` block shows one command per line."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        flag = action.nargs == 0 and not isinstance(action, argparse.BooleanOptionalAction)
        if action.default is None or flag or "default" in text.lower():
            return action.help
        return super()._get_help_string(action)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        lines = []
        for line in text.splitlines():
            if not line.strip() or line[:1].isspace():
                lines.append(indent + line if line.strip() else "")
            else:
                lines.append(textwrap.fill(line, width, initial_indent=indent, subsequent_indent=indent))
        return "\n".join(lines)

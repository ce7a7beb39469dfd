"""Every ``longnet`` command and subcommand explains each option and ends with examples.

The test walks the whole argparse tree that ``longnet`` builds: every option (except ``-h``) has
help text, no help says "(default: None)" (neither as written nor as formatted), and every
command's ``--help`` ends with an ``examples:`` epilog.
"""

from __future__ import annotations

import argparse

import pytest

from longnet.cli.main import build_parser


def _walk(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """``(path, parser)`` for ``parser`` and every subcommand parser below it."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _walk(sub, (*path, name))


def _commands():
    return [(" ".join(("longnet", *path)), parser) for path, parser in _walk(build_parser())]


def test_the_walk_reaches_every_command():
    names = {name for name, _ in _commands()}
    assert {"longnet", "longnet bench", "longnet plan", "longnet train", "longnet eval", "longnet experiment",
            "longnet experiment table2", "longnet experiment recall", "longnet experiment runtime"} <= names


@pytest.mark.parametrize("name, parser", _commands(), ids=lambda v: v if isinstance(v, str) else "")
def test_every_option_has_help_and_no_default_none(name, parser):
    missing = [action.option_strings or action.dest for action in parser._actions
               if not isinstance(action, argparse._HelpAction) and not (action.help or "").strip()]
    assert not missing, f"{name}: options without help text: {missing}"
    said = [action.option_strings for action in parser._actions if "(default: None)" in (action.help or "")]
    assert not said, f"{name}: help says '(default: None)': {said}"
    assert "(default: None)" not in parser.format_help(), f"{name} --help shows '(default: None)'"


@pytest.mark.parametrize("name, parser", _commands(), ids=lambda v: v if isinstance(v, str) else "")
def test_every_command_ends_with_examples(name, parser):
    assert "examples:" in (parser.epilog or ""), f"{name} --help has no 'examples:' epilog"
    assert "longnet" in parser.format_help().rsplit("examples:", 1)[-1], f"{name}: no command in its examples"

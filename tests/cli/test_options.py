"""The argument types the subcommands and benchmark scripts share (longnet.cli.options)."""

import argparse

import pytest

from longnet.cli.options import int_list, non_negative_int, positive_float, positive_int


@pytest.mark.parametrize("fn, text, want", [
    (positive_int, "8", 8), (non_negative_int, "0", 0), (positive_float, "1.5", 1.5),
    (positive_float, "2", 2.0), (int_list, "2048,4096 8192", [2048, 4096, 8192]),
])
def test_accepts(fn, text, want):
    assert fn(text) == want


@pytest.mark.parametrize("fn, text, match", [
    (positive_int, "0", "a positive int"), (positive_int, "-3", "a positive int"),
    (positive_int, "1.5", "a positive int"), (positive_int, "x", "a positive int"),
    (non_negative_int, "-1", "an int >= 0"), (non_negative_int, "", "an int >= 0"),
    (positive_float, "0", "a positive number"), (positive_float, "-1e-3", "a positive number"),
    (positive_float, "nan", "a positive number"), (positive_float, "inf", "a positive number"), (positive_float, "fast", "a positive number"),
    (int_list, "4,0", "positive ints"), (int_list, "a,b", "comma-separated ints"),
])
def test_refuses_naming_what_it_expected(fn, text, match):
    with pytest.raises(argparse.ArgumentTypeError, match=match) as info:
        fn(text)
    assert repr(text) in str(info.value) or fn is int_list

"""``longnet reach``: table, examples and a JSON line that agree with the analysis and with BFS."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np

from longnet.analysis import alternating_shift, reach
from longnet.cli.main import main
from longnet.cli.reach import print_report
from longnet.models.config import PRESETS
from longnet.ops.pattern import DilatedPattern


def _run(capsys, *argv):
    rc = main(["reach", *argv])
    out = capsys.readouterr()
    return rc, out.out.strip().splitlines(), out.err


def test_issue_pattern_numbers_table_and_json(capsys):
    rc, lines, _ = _run(capsys, "--segment-lengths", "8,16,32,64,128", "--dilation-rates",
                        "1,2,4,8,16", "--heads", "8", "--seq-len", "128")
    assert rc == 0
    r = json.loads(lines[-1])
    assert (r["unreachable_pairs"], r["pairs"], r["max_hops"], r["causal"]) == (639, 8256, None, True)
    assert r["segment_lengths"] == [8, 16, 32, 64, 128] and r["heads"] == 8
    text = "\n".join(lines[:-1])
    assert "max hops: inf" in text and "639 of 8,256 pairs" in text and "7 -> 8" in text
    # the table has one row per log2 distance bucket, and the rows add up to all pairs
    rows = r["distance_table"]
    assert [(b["lo"], b["hi"]) for b in rows] == [(0, 1), (1, 2), (2, 4), (4, 8), (8, 16), (16, 32),
                                                  (32, 64), (64, 128)]
    assert sum(b["pairs"] for b in rows) == 8256 and sum(b["unreachable"] for b in rows) == 639
    assert all(f"{b['lo']}-{b['hi'] - 1}" in text for b in rows if b["hi"] - b["lo"] > 1)
    # pairs per bucket: i <= j with j - i in [lo, hi)
    d = np.subtract.outer(np.arange(128), np.arange(128))
    assert [b["pairs"] for b in rows] == [int(((d >= b["lo"]) & (d < b["hi"])).sum()) for b in rows]


def test_non_causal_connects_every_pair_in_four_layers(capsys):
    rc, lines, _ = _run(capsys, "--segment-lengths", "8,16,32,64,128", "--dilation-rates",
                        "1,2,4,8,16", "--heads", "8", "--seq-len", "128", "--non-causal")
    r = json.loads(lines[-1])
    assert rc == 0 and (r["max_hops"], r["unreachable_pairs"], r["pairs"]) == (4, 0, 128 * 128)
    assert r["examples"] == [] and any("max hops: 4" in line for line in lines)


def test_preset_supplies_pattern_heads_and_length(capsys):
    rc, lines, _ = _run(capsys, "--preset", "tiny", "--examples", "2")
    r = json.loads(lines[-1])
    tiny = PRESETS["tiny"]
    assert rc == 0
    assert (r["segment_lengths"], r["dilation_rates"]) == (list(tiny["segment_lengths"]),
                                                           list(tiny["dilation_rates"]))
    assert (r["heads"], r["seq_len"]) == (tiny["num_heads"], tiny["max_train_length"])
    want = reach(DilatedPattern(tiny["segment_lengths"], tiny["dilation_rates"]),
                 tiny["max_train_length"], tiny["num_heads"], examples=2)
    assert r["unreachable_pairs"] == want.unreachable and r["hop_counts"] == list(want.hop_counts)
    assert [tuple(e) for e in r["examples"]] == list(want.examples)
    # a flag overrides the preset
    _, lines, _ = _run(capsys, "--preset", "tiny", "--heads", "8", "--seq-len", "100")
    assert (json.loads(lines[-1])["heads"], json.loads(lines[-1])["seq_len"]) == (8, 100)


def test_blocks_are_explained(capsys):
    _, lines, _ = _run(capsys, "--segment-lengths", "4,8", "--dilation-rates", "1,2", "--heads", "2",
                       "--seq-len", "30")
    assert any("blocks: 3 of 8 tokens and one of 6" in line for line in lines)


def test_bad_input_is_one_clear_line(capsys):
    rc, lines, err = _run(capsys, "--heads", "0", "--seq-len", "64")
    assert rc == 2 and lines == [] and "--heads must be a positive int" in err
    rc, _, err = _run(capsys, "--segment-lengths", "8,16", "--dilation-rates", "1")
    assert rc == 2 and "same length" in err and "Traceback" not in err


def test_registered_as_a_command():
    out = subprocess.run([sys.executable, "-m", "longnet", "reach", "--help"], capture_output=True,
                         text=True, check=True).stdout
    assert "--non-causal" in out and "hops against distance" in out


def test_shifted_layers_have_no_blind_spots_and_match_the_analysis(capsys):
    """--shifted: the layers of LongNetConfig(shift_segments=True); issue 11's 639 -> 0."""
    rc, lines, _ = _run(capsys, "--segment-lengths", "8,16,32,64,128", "--dilation-rates",
                        "1,2,4,8,16", "--heads", "8", "--seq-len", "128", "--shifted")
    r = json.loads(lines[-1])
    cycle = alternating_shift(DilatedPattern([8, 16, 32, 64, 128], [1, 2, 4, 8, 16]))
    want = reach(cycle, 128, 8)
    assert rc == 0 and r["shifted"] and r["shifts"] == [0, 4] and r["layers"] is None
    assert (r["unreachable_pairs"], r["max_hops"], r["examples"]) == (0, want.max_hops, [])
    assert r["hop_counts"] == list(want.hop_counts) and sum(b["pairs"] for b in r["distance_table"]) == 8256
    text = "\n".join(lines[:-1])
    assert "shift 0, shift 4" in text and "0 of 8,256 pairs" in text


def test_layers_bounds_the_depth(capsys):
    argv = ["--segment-lengths", "8,16,32", "--dilation-rates", "1,2,4", "--heads", "4", "--seq-len", "100"]
    _, lines, _ = _run(capsys, *argv, "--shifted", "--layers", "3")
    r = json.loads(lines[-1])
    cycle = alternating_shift(DilatedPattern([8, 16, 32], [1, 2, 4]))
    want = reach(cycle, 100, 4, layers=3, examples=5)
    assert r["layers"] == 3 and r["unreachable_pairs"] == want.unreachable > 0
    assert [tuple(e) for e in r["examples"]] == list(want.examples)
    assert any("first 3 layers" in line for line in lines) and any("in 3 layers" in line for line in lines)
    _, lines, _ = _run(capsys, *argv, "--shifted")
    assert json.loads(lines[-1])["unreachable_pairs"] == 0  # more layers cross every cut
    rc, _, err = _run(capsys, *argv, "--layers", "0")
    assert rc == 2 and "--layers must be a positive int" in err


def test_pieces_are_explained(capsys):
    """One layer of --shifted is the unshifted pattern (blocks); a shifted pattern alone has a short
    first piece."""
    _, lines, _ = _run(capsys, "--segment-lengths", "4,8", "--dilation-rates", "1,2", "--heads", "2",
                       "--seq-len", "30", "--shifted", "--layers", "1")
    assert json.loads(lines[-1])["shifts"] == [0] and any("blocks: 3 of 8 tokens and one of 6" in x for x in lines)
    rep = reach(DilatedPattern([4, 8], [1, 2], shift=2), 30, 2)
    assert rep.pieces == ((0, 6, 1), (6, 8, 3))
    print_report(rep, [DilatedPattern([4, 8], [1, 2], shift=2)], 0.0)
    assert "pieces: one of 6 tokens, 3 of 8 tokens;" in capsys.readouterr().out

"""Every JSON line a ``longnet`` command prints is strict JSON (no NaN or Infinity), and every
command prints it through one helper, :func:`longnet.utils.strict_json.print_json_line`."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from longnet.cli.main import main

SRC = Path(__file__).resolve().parents[2] / "src" / "longnet"



def strict_loads(line: str):
    """``json.loads`` that refuses NaN, Infinity and -Infinity, as strict parsers (jq) do."""
    def refuse(name):
        raise ValueError(f"{name} is not JSON")
    return json.loads(line, parse_constant=refuse)


def _last_line(capsys, argv: list[str], code: int = 0):
    assert main(argv) == code
    return strict_loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_eval_plan_reach_and_bench_end_with_strict_json(trained_run, capsys, tmp_path):
    assert "perplexity@32" in _last_line(capsys, ["eval", "--checkpoint", str(trained_run), "--seq-len", "32",
                                                  "--max-tokens", "128", "--no-progress"])
    assert "params" in _last_line(capsys, ["plan", "--seq-len", "4096", "--gpus", "2", "--preset", "tiny"])
    # unreachable pairs: max_hops is infinite, which the line must write as null
    assert _last_line(capsys, ["reach", "--segment-lengths", "8,16", "--dilation-rates", "1,2", "--heads", "2",
                               "--seq-len", "32"])["max_hops"] is None
    assert _last_line(capsys, ["bench", "attention", "--quick", "--no-plot", "--no-progress",
                               "--out", str(tmp_path / "bench")])["complete"] is True


def test_slide_embed_ends_with_strict_json(capsys, tmp_path):
    from longnet.gigapath import SlideEncoder, SlideEncoderConfig
    from longnet.gigapath.checkpoint import FORMAT

    config = SlideEncoderConfig(in_dim=8, embed_dim=16, depth=1, num_heads=2, ffn_dim=16,
                                segment_lengths=(8,), dilation_rates=(1,))
    torch.manual_seed(0)
    ckpt = tmp_path / "encoder.safetensors"
    save_file({k: v.contiguous() for k, v in SlideEncoder(config).state_dict().items()}, str(ckpt),
              metadata={"format": FORMAT, "config": json.dumps(config.to_dict())})
    (tmp_path / "feats").mkdir()
    torch.save({"features": torch.randn(3, 8), "coords": torch.rand(3, 2) * 1000}, tmp_path / "feats" / "a.pt")
    doc = _last_line(capsys, ["slide-embed", "--checkpoint", str(ckpt), "--features", str(tmp_path / "feats"),
                              "--out", str(tmp_path / "out"), "--no-progress"])
    assert doc["embedded"] == 1


def test_commands_print_json_through_the_strict_helper():
    printed = re.compile(r"print\(\s*json\.dumps")
    offenders = [p.relative_to(SRC).as_posix() for p in sorted(SRC.rglob("*.py"))
                 if printed.search(p.read_text())]
    assert offenders == [], f"print JSON lines with longnet.utils.strict_json.print_json_line: {offenders}"


def test_print_json_line_refuses_nan_and_says_where(capsys):
    from longnet.utils.strict_json import print_json_line

    print_json_line({"a": [1, 2.5, None]})
    assert strict_loads(capsys.readouterr().out) == {"a": [1, 2.5, None]}
    with pytest.raises(ValueError, match=r'\$\["figures"\]\[1\] is nan'):
        print_json_line({"ok": 1.0, "figures": [1.0, float("nan")]})
    with pytest.raises(ValueError, match=r'\$\["loss@32"\] is inf'):
        print_json_line({"loss@32": float("inf")})
    assert capsys.readouterr().out == ""  # nothing half-printed

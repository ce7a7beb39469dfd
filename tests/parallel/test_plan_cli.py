"""``longnet plan``: table then one JSON line, numbers from the shared byte planner."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from longnet.cli import plan
from longnet.models import PRESETS, LongNetConfig, LongNetEncoder, LongNetLM
from longnet.ops.pattern import DilatedPattern
from longnet.parallel import plan_bytes


def _run(capsys, *argv):
    parser = argparse.ArgumentParser()
    plan.add_arguments(parser)
    assert plan.run(parser.parse_args(list(argv))) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    return lines, json.loads(lines[-1])


def test_paper_scale_table_and_json(capsys):
    lines, r = _run(capsys, "--seq-len", "1000000000", "--gpus", "1024", "--preset", "base")
    # 10^9 is not a multiple of 1024: rounded up to 1024 chunks of 30 * 32768 tokens
    assert r["seq_len"] == 1024 * 30 * 32768 and r["requested_seq_len"] == 10**9
    assert lines[0].startswith("note: N rounded up")
    assert (r["layers"], r["embed_dim"], r["heads"], r["head_dim"]) == (12, 768, 12, 64)
    # every segment (<= 32768) fits in a 983,040-token chunk: no attention communication
    assert all(b["local"] for b in r["branches"]) and r["comm_bytes_per_step_attention"] == 0
    assert r["flops_per_step_train"] > 3 * 12 * r["attention_flops_per_layer_fwd"] > 0


def test_long_segments_communicate_a_bounded_amount(capsys):
    w = ",".join(str(2048 * 4**k) for k in range(8))
    rates = ",".join(str(4**k) for k in range(8))
    per_rank = {}
    for gpus in (64, 256):
        _, r = _run(capsys, "--seq-len", str(2**20 * gpus // 64), "--gpus", str(gpus),
                    "--segment-lengths", w, "--dilation-rates", rates, "--layers", "2")
        shared = [b for b in r["branches"] if not b["local"]]
        assert shared
        per_rank[gpus] = r["comm_bytes_per_layer_fwd"]
        expect = plan_bytes(DilatedPattern(r["pattern"][0], r["pattern"][1]), r["seq_len"],
                            gpus, 12, 64, 2).forward_bytes
        assert r["comm_bytes_per_layer_fwd"] == expect
        assert r["comm_bytes_per_step_attention"] == 2 * (expect + r["comm_bytes_per_layer_bwd"])
    # same chunk (16384 tokens), 4x the sequence: the bytes per rank grow by less than 2x
    # (new branches span more ranks, each branch's bytes stay below 2048 keys x heads x 2D)
    assert per_rank[256] < 2 * per_rank[64]


def test_bad_flags():
    with pytest.raises(ValueError, match="num_heads must divide embed_dim=100"):  # the config's own check
        plan.plan_model(seq_len=1024, gpus=2, layers=1, embed_dim=100, heads=3, ffn_dim=4,
                        segment_lengths=[512], dilation_rates=[1])
    parser = argparse.ArgumentParser()
    plan.add_arguments(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["--seq-len", "8", "--gpus", "2", "--segment-lengths", "a,b"])
    with pytest.raises(ValueError, match="needs a dilated"):
        plan.plan_config(LongNetConfig.from_preset("tiny", attention="dense"), seq_len=1024, gpus=2)


def test_flags_override_the_preset(capsys):
    parser = argparse.ArgumentParser()
    plan.add_arguments(parser)
    args = parser.parse_args(["--seq-len", "4096", "--gpus", "2", "--preset", "small", "--layers", "2",
                              "--kv-heads", "3"])
    assert plan.config_from_args(args) == LongNetConfig.from_preset("small", num_layers=2, num_kv_heads=3)
    _, r = _run(capsys, "--seq-len", "4096", "--gpus", "2", "--preset", "small")
    small = PRESETS["small"]  # the preset's own pattern and vocabulary, not the paper's
    assert r["pattern"] == [list(small["segment_lengths"]), list(small["dilation_rates"])]
    assert r["params"] == LongNetConfig.from_preset("small").matmul_parameters()


def test_bad_shapes_are_one_error_line(capsys):
    from longnet.cli.main import main

    assert main(["plan", "--seq-len", "1024", "--gpus", "2", "--heads", "5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: LongNetConfig.num_heads must divide embed_dim=768, got 5"]
    # segments that do not divide one another cannot be split: a clear error, quickly
    assert main(["plan", "--seq-len", "4096", "--gpus", "2", "--segment-lengths", "1009,1013,30011",
                 "--dilation-rates", "1,2,4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: no sequence length from 4,096") and "divide" in err[0]


PLANNABLE = [name for name in sorted(PRESETS) if name != "gigapath-slide"]  # its segments do not nest


@pytest.mark.parametrize("name", PLANNABLE)
def test_plan_counts_what_the_model_counts(capsys, name):
    """On one device the plan's sizes and training FLOPs are the model's own (built on meta)."""
    config = LongNetConfig.from_preset(name)
    n = 2 * max(config.segment_lengths)
    causal = config.vocab_size is not None
    lines, r = _run(capsys, "--seq-len", str(n), "--gpus", "1", "--preset", name, "--batch-size", "2",
                    *([] if causal else ["--no-causal"]))
    with torch.device("meta"):
        model = LongNetLM(config) if causal else LongNetEncoder(config)
    assert r["seq_len"] == n and r["pattern"] == [list(config.segment_lengths), list(config.dilation_rates)]
    assert r["params"] == model._matmul_params() == config.matmul_parameters("lm" if causal else "encoder")
    assert r["params_total"] == model.num_parameters()
    assert r["flops_per_step_train"] == pytest.approx(2 * n * model.flops_per_token(n), rel=1e-12)
    assert f"{r['params'] / 1e6:,.1f}M parameters" in lines[0]

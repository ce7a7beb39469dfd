"""``longnet experiment table2``: the quick run end to end, and the pieces it reports from."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from longnet.cli.main import main
from longnet.experiments import table2 as t2
from longnet.experiments.table2 import ROWS, Table2Plan

_path = Path(__file__).resolve().parents[1] / "train" / "conftest.py"
_spec = importlib.util.spec_from_file_location("_longnet_train_fixtures_t2", _path)
_fixtures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_fixtures)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """The --quick experiment on a synthetic corpus (enough held-out tokens for 2,048-token windows)."""
    root = tmp_path_factory.mktemp("table2")
    data = _fixtures.write_corpus(root / "code", files=300, lines=40, seed=1)
    args = ["experiment", "table2", "--quick", "--data", str(data), "--cache-dir", str(root / "cache"),
            "--vocab-size", "300", "--out", str(root / "run"), "--results-dir", str(root / "results"),
            "--no-progress"]
    return root, args


def test_quick_run_reports_every_row(quick_run, capsys):
    root, args = quick_run
    assert main(args) == 0
    out = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(out[-1])
    rows = summary["rows"]
    assert [(r["model"], r["train_length"]) for r in rows] == [
        (r.model, r.train_length // 16) for r in ROWS]
    plan = Table2Plan.preset("quick")
    tokens = plan.steps * plan.tokens_per_step
    for r in rows:
        assert r["tokens"] == tokens  # one budget for every model
        assert set(r["perplexity"]) == {"128", "512", "2048"}
        for n, ppl in r["perplexity"].items():
            lo, hi = r["interval"][n]
            assert math.isfinite(ppl) and 1 < ppl < 300 + 1e-6  # below chance (vocab 300) after training
            assert lo <= ppl <= hi
    # the dense model beyond its training length runs blockwise windows of 128: the same scores
    dense = rows[0]["perplexity"]
    assert dense["512"] == pytest.approx(dense["128"], rel=1e-5)
    assert dense["2048"] == pytest.approx(dense["128"], rel=1e-5)
    assert summary["orderings"]["checked"] == 40  # 10 pairs x 3 lengths + 5 rows x 2 length steps
    doc = json.loads((root / "run" / "table2.json").read_text())
    assert doc["eval"]["tokens"] % 2048 == 0 and doc["eval"]["tokens"] >= 2048
    for row in doc["rows"]:
        assert row["loss_by_position"][0]["start"] == 1 and row["loss_by_position"][-1]["stop"] == 2048
        assert [c["distance"] for c in row["copy"]["by_distance"]] == [32, 256, 1024, 1984]
    assert (root / "run" / "table2.png").stat().st_size > 0
    markdown = (root / "run" / "table2.md").read_text().splitlines()
    assert len(markdown) == 2 + len(ROWS) and "| longnet 512 |" in "\n".join(markdown)
    assert markdown[2].endswith("| 4.24 | 5.07 | 11.29 |")  # the paper's Transformer row beside ours
    assert list((root / "results").glob("table2-*-quick.json"))
    assert "the paper's orderings" in "\n".join(out)


def test_quick_run_resumes_without_training_again(quick_run, capsys):
    root, args = quick_run
    if not (root / "run" / "table2.json").is_file():
        assert main(args) == 0
        capsys.readouterr()
    before = json.loads((root / "run" / "table2.json").read_text())
    assert main(args) == 0
    captured = capsys.readouterr()
    assert captured.err.count("done earlier") == len(ROWS)
    after = json.loads(captured.out.strip().splitlines()[-1])
    assert [r["perplexity"] for r in after["rows"]] == [r["perplexity"] for r in before["rows"]]


def test_a_row_of_another_plan_is_refused(quick_run, capsys):
    root, args = quick_run
    if not (root / "run" / "table2.json").is_file():
        assert main(args) == 0
    assert main(args + ["--steps", "7"]) == 2
    assert "another plan" in capsys.readouterr().err


@pytest.mark.parametrize("overrides, name", [
    (dict(num_heads=8), "num_heads"),
    (dict(tokens_per_step=1000), "tokens_per_step"),
    (dict(rows=("longnet-4096",)), "rows"),
    (dict(steps=0), "steps"),
    (dict(copy_distances=(100,)), "copy_distances"),
    (dict(scale=3), "scale"),
])
def test_plan_rejects_bad_fields(overrides, name):
    with pytest.raises(ValueError, match=name):
        Table2Plan(**overrides)


def test_plan_shares_everything_but_attention():
    plan = Table2Plan()
    settings = [plan.train_settings(row, None, "cpu", False) for row in ROWS]
    shared = ("data", "vocab_size", "batch_tokens", "seed", "lr", "warmup_steps", "max_steps", "decay_steps")
    for key in shared:
        assert len({json.dumps(s[key]) for s in settings}) == 1, key
    assert plan.segment_lengths == (2048, 4096, 8192, 16384, 32768)
    assert plan.dilation_rates == (1, 2, 4, 6, 12)
    assert [s["seq_len"] for s in settings] == [2048, 8192, 8192, 32768, 32768, 8192]
    assert {s["model_overrides"]["attention"] for s in settings} == {"dense", "sparse", "dilated"}
    assert [s["model_overrides"]["shift_segments"] for s in settings] == [False] * 5 + [True]
    assert plan.steps * plan.tokens_per_step >= 1_000_000  # at least 1M training tokens per model
    with pytest.raises(ValueError, match="unknown scale"):
        Table2Plan.preset("huge")


def test_position_buckets_are_log_spaced_and_cover_every_position():
    losses = np.arange(2 * 20, dtype=np.float64).reshape(2, 20)
    buckets = t2.position_buckets(losses)
    assert [(b["start"], b["stop"]) for b in buckets] == [(1, 1), (2, 3), (4, 7), (8, 20)]
    per_position = losses.mean(axis=0)
    assert buckets[-1]["loss"] == pytest.approx(per_position[7:].mean())
    assert t2.position_buckets(np.ones((1, 16)))[-1] == {"start": 8, "stop": 16, "loss": 1.0}


def test_block_means_and_bootstrap_are_paired():
    values = np.array([1.0, 1, 2, 2, 4])
    assert t2.block_means(values, 2).tolist() == [1.0, 2.0, 4.0]
    a = t2.bootstrap_indices(10, 50, seed=3)
    assert a.shape == (50, 10) and (a == t2.bootstrap_indices(10, 50, seed=3)).all()
    comparison = t2._compare("x", np.zeros(100), np.full(100, 0.5), 1.0, 1.5)
    assert comparison["agrees"] and comparison["significant"] and comparison["interval"] == [0.5, 0.5]
    noisy = t2._compare("x", np.zeros(100), np.linspace(-1, 1, 100), 1.0, 0.9)
    assert not noisy["agrees"] and not noisy["significant"]


class _Oracle(torch.nn.Module):
    """Predicts token t+1 as the token ``distance`` positions before it (a perfect copier)."""

    def __init__(self, distance: int, vocab: int) -> None:
        super().__init__()
        self.distance, self.vocab = distance, vocab

    def forward(self, ids):
        b, n = ids.shape
        logits = torch.zeros(b, n, self.vocab)
        for t in range(n):
            source = t + 1 - self.distance
            if source >= 0:
                logits[:, t, ids[:, source]] = 30.0
        return type("Out", (), {"logits": logits})()


def test_copy_probe_measures_copying_at_the_right_distance(monkeypatch, tmp_path):
    from longnet.data import TokenStream

    path = tmp_path / "tokens.bin"
    np.random.default_rng(0).integers(0, 50, size=4000).astype(np.uint16).tofile(path)
    tokens = TokenStream(path, np.uint16)
    plan = Table2Plan.preset("quick", copy_distances=(1024,), copy_samples=3)  # 64 tokens apart, span 32
    monkeypatch.setattr("longnet.train.evaluate.model_for_length", lambda model, n: _Oracle(model, 50))
    (hit,) = t2.copy_probe(64, tokens, plan, torch.device("cpu"))["by_distance"]
    assert hit["distance"] == 64 and hit["samples"] == 3
    assert hit["after_copy"] < 1e-6 and hit["gain"] > 10  # the copy is found; the control is not
    (elsewhere,) = t2.copy_probe(7, tokens, plan, torch.device("cpu"))["by_distance"]
    assert elsewhere["gain"] == pytest.approx(0.0, abs=1e-6)  # copying from another distance gains nothing


def test_options_become_the_plan():
    from longnet.cli.experiment import plan_from_args
    from longnet.cli.main import build_parser

    def plan(*flags):
        return plan_from_args(build_parser().parse_args(["experiment", "table2", *flags]))

    assert plan() == Table2Plan()
    assert plan("--quick") == Table2Plan.preset("quick")
    assert plan("--scale", "large").steps == Table2Plan.preset("large").steps
    custom = plan("--quick", "--split", "validation", "--eval-tokens", "0", "--steps", "3", "--rows", "longnet-8192")
    assert (custom.split, custom.eval_tokens, custom.steps, custom.rows, custom.scale) == (
        "validation", None, 3, ("longnet-8192",), 16)
    assert plan("--eval-tokens", "65536").eval_tokens == 65536


def test_cli_errors_are_one_line(capsys, tmp_path):
    assert main(["experiment"]) == 2
    assert "name an experiment" in capsys.readouterr().err
    assert main(["experiment", "table2", "--quick", "--rows", "nope", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: rows must be") and "\n" not in err


def test_an_interrupted_row_says_how_to_continue(monkeypatch, capsys, tmp_path):
    import signal

    from longnet.train import TrainingInterrupted

    def interrupted(*args, **kwargs):
        raise TrainingInterrupted(signal.SIGTERM, 3, tmp_path / "longnet-8192")

    monkeypatch.setattr(t2, "run_table2", interrupted)
    assert main(["experiment", "table2", "--quick", "--out", str(tmp_path)]) == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert "SIGTERM at step 3 of longnet-8192" in err and "same command again" in err

"""``longnet experiment recall``: the sequences, the statistics, the rows, and the quick run end to end."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from longnet.cli.main import main
from longnet.experiments import recall as rc
from longnet.experiments.recall import ROWS, RecallPlan, bucket_accuracy, wilson_interval
from longnet.experiments.recall_data import (
    IGNORE,
    MAX_OFFSET,
    SLOT,
    RecallVocab,
    make_batch,
    make_sequence,
    max_queries,
)


def _strict(line: str):
    def refuse(name):
        raise ValueError(f"non-strict JSON constant {name}")

    return json.loads(line, parse_constant=refuse)


# ------------------------------------------------------------------------------ sequences
@pytest.mark.parametrize("length,seed", [(512, 0), (4096, 1), (1000, 2)])
def test_sequences_hold_what_the_design_says(length, seed):
    vocab = RecallVocab(64, 64, 128)
    rng = np.random.default_rng(seed)
    tokens, at, dist = make_sequence(rng, length, vocab, num_queries=min(64, max_queries(length)),
                                     min_distance=64, max_distance=length)
    assert tokens.shape == (length + 1,) and len(at) > 0
    keys = tokens[at]
    assert ((keys >= 1) & (keys < vocab.value_start)).all()
    assert len(set(keys.tolist())) == len(keys)  # distinct keys: one answer per query
    assert ((tokens[at + 1] >= vocab.value_start) & (tokens[at + 1] < vocab.filler_start)).all()
    assert (dist >= 64 - MAX_OFFSET - SLOT).all() and (dist <= length).all()
    for q, d in zip(at, dist):  # the pair sits exactly `d` tokens earlier and says the same
        assert tokens[q - d] == tokens[q] and tokens[q - d + 1] == tokens[q + 1]
    items = np.sort(np.concatenate([at, at - dist]))
    assert (np.diff(items) >= SLOT - MAX_OFFSET - 1).all()  # room between items
    others = np.setdiff1d(np.arange(length + 1), np.concatenate([items, items + 1]))
    assert (tokens[others] >= vocab.filler_start).all()  # everything else is filler


def test_batches_are_a_function_of_seed_stream_and_index_and_label_only_answers():
    kw = dict(batch_size=3, length=512, vocab=RecallVocab(), num_queries=8, min_distance=64, max_distance=512)
    a, b = make_batch(0, 0, 5, **kw), make_batch(0, 0, 5, **kw)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.input_ids, make_batch(0, 1, 5, **kw).input_ids)
    labelled = a.labels != IGNORE
    assert torch.equal(labelled, a.distances > 0)
    # a label is the token that follows its position
    b_idx, t_idx = labelled.nonzero(as_tuple=True)
    assert (t_idx < 511).all()
    assert torch.equal(a.labels[b_idx, t_idx], a.input_ids[b_idx, t_idx + 1])


def test_distances_spread_over_the_whole_range():
    batch = make_batch(0, 0, 0, batch_size=32, length=4096, vocab=RecallVocab(), num_queries=64,
                       min_distance=64, max_distance=4096)
    d = batch.distances[batch.distances > 0].numpy()
    for lo, hi in ((64, 256), (256, 1024), (1024, 2048), (2048, 4096)):
        assert ((d >= lo) & (d < hi)).sum() > 20, (lo, hi)
    assert len(np.unique(d % 12)) == 12  # every residue of the largest rate occurs


# ------------------------------------------------------------------------------ statistics
def test_wilson_interval_matches_known_values():
    lo, hi = wilson_interval(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-4) and hi == pytest.approx(0.7634, abs=1e-4)
    lo, hi = wilson_interval(0, 10)  # closed form: z^2 / (n + z^2)
    z2 = 1.959963984540054 ** 2
    assert lo == 0.0 and hi == pytest.approx(z2 / (10 + z2), rel=1e-12)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_bucket_accuracy_counts_each_query_once():
    d = np.array([64, 100, 255, 256, 1000, 4096])
    ok = np.array([1, 0, 1, 1, 1, 0], dtype=bool)
    out = bucket_accuracy(d, ok, [64, 256, 1024, 4096])
    assert [b["n"] for b in out] == [3, 2, 1]
    assert [b["correct"] for b in out] == [2, 2, 0]
    assert out[0]["accuracy"] == pytest.approx(2 / 3)


# ------------------------------------------------------------------------------ the plan
def test_rows_share_everything_but_the_attention():
    plan = RecallPlan()
    configs = {r.key: plan.model_config(r) for r in ROWS}
    fields = {f.name for f in dataclasses.fields(configs["dense"])}
    differ = {name for name in fields if len({repr(getattr(c, name)) for c in configs.values()}) > 1}
    assert differ <= {"attention", "segment_lengths", "dilation_rates", "shift_segments", "max_train_length"}
    assert configs["longnet"].segment_lengths == (256, 512, 1024, 2048, 4096)
    assert configs["dense-block"].segment_lengths == (2048,) and configs["dense-block"].dilation_rates == (1,)
    assert configs["dense"].for_eval_length(8192).attention == "dense"  # stays full at 2x
    # same initial weights for every row
    states = []
    for key in ("dense", "longnet"):
        torch.manual_seed(plan.seed)
        from longnet.models import LongNetLM

        states.append(LongNetLM(RecallPlan.preset("quick").model_config(rc.ROWS[[r.key for r in ROWS].index(key)]))
                      .state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert plan.bucket_edges() == [64, 256, 1024, 2048, 4096, 8192]


@pytest.mark.parametrize("overrides,name", [
    (dict(train_length=1000), "train_length"), (dict(num_heads=8, embed_dim=192), "num_heads"),
    (dict(tokens_per_step=5000), "tokens_per_step"), (dict(rows=("nope",)), "rows"), (dict(lr=0.0), "lr"),
    (dict(embed_dim=100), "embed_dim"),
])
def test_plan_rejects_bad_fields(overrides, name):
    with pytest.raises(ValueError, match=name):
        RecallPlan(**overrides)


# ------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """The --quick experiment, run once for the module: (folder, arguments, printed lines)."""
    import contextlib
    import io

    root = tmp_path_factory.mktemp("recall")
    args = ["experiment", "recall", "--quick", "--out", str(root / "run"), "--results-dir", str(root / "results"),
            "--no-progress", "--device", "cpu"]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(args) == 0
    return root, args, printed.getvalue().strip().splitlines()


def test_quick_run_reports_every_row(quick_run):
    root, args, out = quick_run
    last = _strict(out[-1])
    assert [r["key"] for r in last["rows"]] == [r.key for r in ROWS]
    assert last["eval_length"] == 1024 and last["chance"] == pytest.approx(1 / 16)
    doc = json.loads((root / "run" / "recall.json").read_text())
    for row in doc["rows"]:
        for length in ("512", "1024"):
            buckets = row["accuracy"][length]
            assert sum(b["n"] for b in buckets) > 0
            for b in buckets:
                if b["n"]:
                    assert b["interval"][0] <= b["accuracy"] <= b["interval"][1]
        assert row["train_flops"] > 0 and row["attention_flops_per_token"] > 0
    flops = {r["key"]: r["attention_flops_per_token"] for r in doc["rows"]}
    assert flops["dense"] > flops["longnet"]
    for name in ("recall.json", "recall.md"):
        assert (root / "run" / name).is_file()
    assert any(p.name.startswith("recall-") for p in (root / "results").iterdir())
    assert "accuracy by query distance" in "\n".join(out)


def test_quick_run_resumes_without_training_again(quick_run, capsys, monkeypatch):
    root, args, _ = quick_run
    monkeypatch.setattr(rc, "train_row", lambda *a, **k: pytest.fail("a finished row was trained again"))
    assert main(args) == 0
    assert capsys.readouterr().err.count("done earlier") == len(ROWS)


def test_a_row_of_another_plan_is_refused(quick_run, capsys):
    root, args, _ = quick_run
    assert main(args + ["--lr", "0.02"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: ") and "written by another plan" in last


def test_an_interrupted_row_continues_to_the_same_weights(tmp_path, monkeypatch):
    plan = RecallPlan.preset("quick", rows=("longnet",), short_steps=3, long_steps=3, save_every=2)
    row = ROWS[3]
    torch.set_num_threads(1)
    whole, _, _ = rc.train_row(plan, row, tmp_path / "whole", torch.device("cpu"), progress=False, log=lambda m: None)

    calls = {"n": 0}
    real = rc.make_batch

    def interrupt_at_step_4(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(rc, "make_batch", interrupt_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        rc.train_row(plan, row, tmp_path / "cut", torch.device("cpu"), progress=False, log=lambda m: None)
    monkeypatch.setattr(rc, "make_batch", real)
    logs = []
    resumed, history, _ = rc.train_row(plan, row, tmp_path / "cut", torch.device("cpu"), progress=False,
                                       log=logs.append)
    assert any("resuming at step 4" in m for m in logs)
    assert [h["step"] for h in history] == list(range(1, 7))
    a, b = whole.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cli_lists_all_three_experiments(capsys):
    with pytest.raises(SystemExit):
        main(["experiment", "--help"])
    text = capsys.readouterr().out
    assert all(name in text for name in ("table2", "recall", "runtime")) and "example" in text
    assert main(["experiment"]) == 2
    assert "name an experiment" in capsys.readouterr().err

"""``longnet train`` / ``longnet eval`` from the command line: output, errors, signals."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from longnet.cli.main import main
from longnet.data import Tokenizer, prepare_data
from longnet.models import LongNetLM
from longnet.train import latest_checkpoint, load_trainer_checkpoint, read_metrics

SRC = Path(__file__).resolve().parents[2] / "src"


def _one_line_error(capsys, must_contain: str = "") -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("error: "), lines[0]
    assert "Traceback" not in captured.err + captured.out
    assert must_contain.lower() in lines[0].lower(), lines[0]
    return lines[0]


def _snapshot(folder: Path) -> dict:
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}


# ------------------------------------------------------------------------------------ eval
def test_eval_table_and_json_last_line(trained_run, corpus, cache, capsys):
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(trained_run), "--seq-len", "32", "64", "100000",
                 "--max-tokens", "512", "--no-progress"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    figures = json.loads(out[-1])
    assert set(k for k in figures if "perplexity" in k) == {"perplexity@32", "perplexity@64"}
    assert "100000" in figures["skipped"] and any("skipped" in line for line in out[:-1])
    assert figures["tokens@32"] == 512 and figures["tokens@64"] == 512  # 16 and 8 windows, same text
    # segments (8, 16) divide both lengths: a 64-window is two 32-windows, so the losses agree
    assert figures["loss@32"] == pytest.approx(figures["loss@64"], rel=1e-5)
    assert any(line.startswith("training curves:") for line in out[:-1])
    # recompute @64 independently: mean loss over every position of non-overlapping windows
    model = LongNetLM.from_pretrained(trained_run).eval()
    prepared = prepare_data(str(corpus), cache, tokenizer=Tokenizer.load(trained_run))
    tokens = prepared.tokens("validation")
    total = count = 0
    with torch.no_grad():
        for i in range(8):
            window = torch.from_numpy(tokens[i * 64: i * 64 + 65].astype("int64"))[None]  # (1, 65)
            logits = model(window[:, :-1]).logits.double()  # (1, 64, V)
            total += torch.nn.functional.cross_entropy(logits[0], window[0, 1:], reduction="sum").item()
            count += 64
    assert figures["perplexity@64"] == pytest.approx(math.exp(total / count), rel=1e-5)
    assert figures["step"] == 12


def test_eval_lengths_score_the_same_tokens(trained_run, capsys):
    assert main(["eval", "--checkpoint", str(trained_run), "--seq-len", "32", "64", "--max-tokens", "500"]) == 0
    figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert figures["tokens@32"] == figures["tokens@64"] == 448  # 500 rounded down to a multiple of 64


def test_eval_of_a_checkpoint_subfolder(trained_run, capsys):
    sub = latest_checkpoint(trained_run)
    assert main(["eval", "--checkpoint", str(sub), "--seq-len", "32", "--max-tokens", "64"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["step"] == 12


def test_eval_rejects_corrupt_truncated_and_mismatched_checkpoints(tmp_path, trained_run, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(trained_run, bad)
    weights = bad / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])  # truncated
    assert main(["eval", "--checkpoint", str(bad), "--seq-len", "32"]) == 2
    _one_line_error(capsys, "model.safetensors")
    weights.write_bytes(b"\x00" * 64)  # garbage
    assert main(["eval", "--checkpoint", str(bad), "--seq-len", "32"]) == 2
    _one_line_error(capsys, "model.safetensors")
    weights.write_bytes(good)
    config = json.loads((bad / "config.json").read_text())
    config["config"]["embed_dim"] = 64  # a checkpoint of another config
    (bad / "config.json").write_text(json.dumps(config))
    assert main(["eval", "--checkpoint", str(bad), "--seq-len", "32"]) == 2
    _one_line_error(capsys, "config")
    assert main(["eval", "--checkpoint", str(tmp_path / "missing"), "--seq-len", "32"]) == 2
    _one_line_error(capsys, "not a folder")
    assert main(["eval", "--checkpoint", str(trained_run), "--seq-len", "1000000"]) == 2
    _one_line_error(capsys, "too few")


def test_eval_finds_a_run_folder_corrupted_on_disk_by_its_manifest(tmp_path, trained_run, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(trained_run, bad)
    for folder in (bad, latest_checkpoint(bad)):  # the run folder and its latest checkpoint
        weights = folder / "model.safetensors"
        data = bytearray(weights.read_bytes())
        data[len(data) // 2:len(data) // 2 + 4096] = bytes(4096)  # zeros: finite, only the hash sees it
        weights.write_bytes(bytes(data))
        assert main(["eval", "--checkpoint", str(folder), "--seq-len", "32"]) == 2
        _one_line_error(capsys, f"{weights}: corrupted on disk (SHA-256 differs")


def _strict_json(line: str) -> dict:
    """``json.loads`` that refuses NaN, Infinity and -Infinity (as jq and JSON.parse do)."""
    def refuse(name):
        raise ValueError(f"{name} is not JSON")
    return json.loads(line, parse_constant=refuse)


def test_eval_of_a_non_finite_loss_is_an_error_not_a_nan(tmp_path, trained_run, corpus, cache, capsys):
    """Finite weights (so loading accepts them) whose forward pass overflows float32: the loss is
    NaN, and eval says so and exits 1 instead of printing ``nan`` as a perplexity."""
    model = LongNetLM.from_pretrained(trained_run)
    with torch.no_grad():
        model.embed.weight.fill_(1e38)
    broken = tmp_path / "broken"
    model.save_pretrained(broken)
    Tokenizer.load(trained_run).save(broken)
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(broken), "--data", str(corpus), "--cache-dir", str(cache),
                 "--seq-len", "32", "--max-tokens", "256", "--no-progress"]) == 1
    line = _one_line_error(capsys, "nan")
    assert "weights are finite but the forward pass overflows" in line


def test_eval_of_non_finite_weights_is_refused_at_load(tmp_path, trained_run, capsys):
    model = LongNetLM.from_pretrained(trained_run)
    name = next(n for n, _ in model.named_parameters() if "norm" in n)
    with torch.no_grad():
        model.get_parameter(name).fill_(float("nan"))
    broken = tmp_path / "broken"
    model.save_pretrained(broken)
    Tokenizer.load(trained_run).save(broken)
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(broken), "--seq-len", "32", "--no-progress"]) == 2
    line = _one_line_error(capsys, name)
    assert "not finite" in line or "NaN" in line or "nan" in line


def test_trainer_and_eval_agree_on_the_same_tokens(tmp_path, micro, corpus, cache, capsys):
    run = tmp_path / "run"
    assert main(micro(corpus, cache, run, steps=2)) == 0  # evaluates at its last step: 256 tokens at 32
    err = capsys.readouterr().err
    said = [line for line in err.splitlines() if line.startswith("step 2:") and "validation loss" in line]
    assert len(said) == 1 and "256 tokens of the validation split" in said[0] and "windows of 32" in said[0], err
    record = [r for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "eval"][-1]
    assert (record["step"], record["val_tokens"], record["val_split"], record["val_seq_len"]) == (
        2, 256, "validation", 32)
    assert main(["eval", "--checkpoint", str(run), "--split", "validation", "--seq-len", "32", "--max-tokens", "256",
                 "--no-progress"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    figures = _strict_json(out[-1])
    assert (figures["split"], figures["tokens@32"]) == ("validation", 256)
    assert figures["loss@32"] == pytest.approx(record["val_loss"], abs=1e-6)
    assert f"{record['val_perplexity']:.2f}" in said[0]
    assert "first 256 tokens of the validation split" in out[0]
    row = next(line.split() for line in out if line.split()[:1] == ["32"])
    assert row[1:4] == ["8", "256", "validation"]


def test_eval_help_says_which_tokens_each_figure_scores(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--eval-tokens" in text and "--max-tokens" in text and "docs/evaluation.md" in text


# ----------------------------------------------------------------------------------- train
def test_train_refuses_a_folder_with_another_run(tmp_path, trained_run, micro, corpus, cache, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    before = _snapshot(run)
    assert main(micro(corpus, cache, run)) == 2
    _one_line_error(capsys, "--resume")
    assert main(micro(corpus, cache, run, "--resume", "--seq-len", "64")) == 2  # resume, other settings
    _one_line_error(capsys, "--seq-len")
    other = tmp_path / "notes"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert main(micro(corpus, cache, other)) == 2
    _one_line_error(capsys, "not empty")
    assert _snapshot(run) == before and (other / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("case", ["missing", "empty", "too-short", "preset"])
def test_train_bad_input_is_one_line(tmp_path, micro, corpus, cache, capsys, case):
    out = tmp_path / "run"
    if case == "missing":
        args = micro(tmp_path / "nowhere", cache, out)
        hint = "does not exist"
    elif case == "empty":
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "a.py").write_text("")
        args = micro(tmp_path / "empty", cache, out)
        hint = "no text"
    elif case == "too-short":
        args = micro(corpus, cache, out, "--seq-len", "1000000", "--batch-tokens", "1000000")
        hint = "--seq-len"
    else:
        args = micro(corpus, cache, out, "--preset", "huge")
        hint = "unknown preset"
    assert main(args) == 2
    _one_line_error(capsys, hint)
    assert not out.exists() or not any(out.iterdir())


def test_help_explains_with_examples(capsys):
    for command in (["--help"], ["train", "--help"], ["eval", "--help"]):
        with pytest.raises(SystemExit) as exit_info:
            main(command)
        assert exit_info.value.code == 0
        text = capsys.readouterr().out
        assert "usage:" in text
        if command != ["--help"]:
            assert "examples:" in text and f"longnet {command[0]}" in text


def test_sigterm_saves_a_loadable_checkpoint(tmp_path, micro, corpus, cache):
    run = tmp_path / "run"
    args = micro(corpus, cache, run, steps=100000)
    args[args.index("--save-every") + 1] = "100000"
    env = dict(os.environ, PYTHONPATH=str(SRC), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "longnet", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.is_file() and metrics.read_text().count('"train"') >= 3:
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err  # SIGTERM: saved, a clean exit
    last = err.strip().splitlines()[-1]
    assert last.startswith("stopped: interrupted by SIGTERM") and "--resume" in last
    assert "Traceback" not in err
    state = load_trainer_checkpoint(latest_checkpoint(run))
    assert state.step >= 3
    model = LongNetLM.from_pretrained(run)
    assert model.config.embed_dim == 32


def test_resume_refuses_a_checkpoint_of_another_config(tmp_path, trained_run, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    doc = json.loads((run / "run.json").read_text())
    doc["config"]["model"]["model_overrides"]["ffn_dim"] = 128  # the run now asks for another model
    (run / "run.json").write_text(json.dumps(doc))
    before = _snapshot(run)
    assert main(["train", "--out", str(run), "--resume", "--max-steps", "20", "--no-progress"]) == 2
    _one_line_error(capsys, "another model config")
    assert _snapshot(run) == before

"""The training configuration tree: declared once, the CLI, --config TOML, identity on resume, and
runs written before the tree (run.json format 1) still resume to the same numbers."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
from pathlib import Path

import pytest

from longnet.cli.main import main
from longnet.train import TrainConfig, read_metrics, resolve_config, train
from longnet.train.config import stored_settings
from longnet.utils import config_tree

FIXTURE = Path(__file__).parent / "fixtures" / "run_v1"

# every option `longnet train` had before the configuration tree (its flags then); each must keep working
OPTIONS_BEFORE = [
    "--preset", "--attention", "--model-overrides", "--hf-model", "--segment-lengths", "--dilation-rates",
    "--grad-checkpointing", "--data", "--vocab-size", "--seq-len", "--cache-dir", "--batch-tokens", "--micro-batch",
    "--max-steps", "--lr", "--warmup-steps", "--decay", "--decay-steps", "--min-lr-ratio", "--weight-decay",
    "--grad-clip", "--seed", "--device", "--dtype", "--compile", "--eval-every", "--eval-tokens", "--save-every",
    "--sequence-parallel", "--fsdp", "--fsdp-shard", "--dist-timeout", "--progress", "--out", "--resume",
]


def _parser() -> argparse.ArgumentParser:
    from longnet.cli.train import add_arguments

    parser = argparse.ArgumentParser(prog="longnet train")
    add_arguments(parser)
    return parser


def test_every_setting_is_declared_once_with_a_docstring_and_a_section():
    names = [leaf.name for leaf in config_tree.leaves(TrainConfig)]
    assert len(names) == len(set(names))  # one flat spelling each
    for leaf in config_tree.leaves(TrainConfig):
        assert leaf.doc, f"{leaf.name} has no docstring: its --help would be empty"
    sections = {f.name for f in dataclasses.fields(TrainConfig)}
    assert sections == {"model", "data", "optim", "schedule", "parallel", "checkpoint", "eval", "run"}


def test_the_command_line_is_generated_from_the_tree():
    parser = _parser()
    flags = {s for a in parser._actions for s in a.option_strings}
    assert set(OPTIONS_BEFORE) <= flags
    helps = {a.dest: a.help for a in parser._actions}
    for leaf in config_tree.leaves(TrainConfig):
        assert leaf.flag in flags
        assert leaf.doc.split()[0] in helps[leaf.name]  # the docstring is the help
        assert helps[leaf.name].startswith("[run]") == leaf.identity
    assert "(default: 0.01)" in helps["weight_decay"] and "(default: cosine)" in helps["decay"]
    args = parser.parse_args(["--out", "x", "--lr", "1e-3", "--no-compile", "--segment-lengths", "8,16",
                              "--model-overrides", '{"num_layers": 1}'])
    assert config_tree.given_values(args, TrainConfig) == {
        "lr": 1e-3, "compile": False, "segment_lengths": [8, 16], "model_overrides": {"num_layers": 1}}


def test_help_lists_sections_and_run_marks(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    for title in ("model:", "data:", "optim:", "schedule:", "parallel:", "checkpoint:", "eval:", "run:"):
        assert f"\n{title}" in out
    assert "--config FILE" in out and "[run] Peak learning rate" in out


def test_resolve_fills_derived_settings_and_checks_types():
    config = resolve_config({"preset": "tiny", "max_steps": 200})
    assert (config.optim.lr, config.optim.batch_tokens, config.data.seq_len) == (2e-3, 4096, 512)
    assert (config.schedule.decay_steps, config.schedule.warmup_steps) == (200, 20)
    for bad, match in (({"lr": "fast"}, "--lr must be a number"), ({"max_steps": 0}, "--max-steps must be positive"),
                       ({"decay": "step"}, "--decay must be one of cosine, linear, constant"),
                       ({"fsdp": "yes"}, "--fsdp must be true or false"), ({"colour": 1}, "unknown training settings"),
                       ({"segment_lengths": [8], "dilation_rates": [1]}, "--segment-lengths / --dilation-rates choose"),
                       ({"attention": "dense", "model_overrides": {"attention": "sparse"}}, "disagree")):
        with pytest.raises(ValueError, match=match):
            resolve_config(bad)


def test_config_toml_round_trip_and_command_line_overrides(tmp_path):
    config = resolve_config({"preset": "tiny", "lr": 1e-3, "model_overrides": {"num_layers": 2}})
    path = tmp_path / "train.toml"
    path.write_text(config.to_toml())
    assert resolve_config(config_tree.read_toml(path, TrainConfig)) == config
    path.write_text("[optim]\nlr = 5e-4\n\n[schedule]\nmax_steps = 7\n\nseed = 3\n")
    with pytest.raises(ValueError, match=r"\[schedule\] has no setting 'seed' \(it belongs in \[run\]\)"):
        config_tree.read_toml(path, TrainConfig)  # in TOML a key after a table belongs to that table
    path.write_text("seed = 3\n[optim]\nlr = 5e-4\n")
    assert config_tree.read_toml(path, TrainConfig) == {"seed": 3, "lr": 5e-4}
    path.write_text("[optim]\nmax_steps = 7\n")
    with pytest.raises(ValueError, match=r"\[optim\] has no setting 'max_steps' \(it belongs in \[schedule\]\)"):
        config_tree.read_toml(path, TrainConfig)
    path.write_text("[optim\n")
    with pytest.raises(ValueError, match="not valid TOML"):
        config_tree.read_toml(path, TrainConfig)


def test_command_line_config_file_and_overrides(tmp_path, corpus, cache, capsys):
    path = tmp_path / "run.toml"
    path.write_text(f'[data]\ndata = "{corpus}"\ncache_dir = "{cache}"\nvocab_size = 300\nseq_len = 32\n'
                    '[optim]\nbatch_tokens = 128\nlr = 1e-3\n[schedule]\nmax_steps = 2\n'
                    '[model]\nmodel_overrides = {embed_dim = 32, num_layers = 1, num_heads = 2, ffn_dim = 64, '
                    'segment_lengths = [8, 16], dilation_rates = [1, 2]}\n')
    out = tmp_path / "run"
    assert main(["train", "--config", str(path), "--lr", "2e-3", "--out", str(out), "--no-progress"]) == 0
    doc = json.loads((out / "run.json").read_text())
    assert doc["format_version"] == 2
    assert doc["config"]["optim"]["lr"] == 2e-3  # the command line wins over the file
    assert doc["config"]["schedule"]["max_steps"] == 2 and doc["config"]["data"]["seq_len"] == 32
    # train.toml is the resolved config: it starts the same run again
    again = tmp_path / "again"
    assert main(["train", "--config", str(out / "train.toml"), "--out", str(again), "--no-progress"]) == 0
    assert json.loads((again / "run.json").read_text())["config"] == doc["config"]
    capsys.readouterr()
    (tmp_path / "bad.toml").write_text("[optim]\nlearning_rate = 1\n")
    assert main(["train", "--config", str(tmp_path / "bad.toml"), "--out", str(tmp_path / "x")]) == 2
    assert "[optim] has no setting 'learning_rate'" in capsys.readouterr().err


def test_a_changed_identity_setting_is_refused_naming_it_and_both_values(tmp_path, corpus, cache, micro, capsys):
    run = tmp_path / "run"
    assert main(micro(corpus, cache, run, steps=2)) == 0
    capsys.readouterr()
    assert main(["train", "--out", str(run), "--resume", "--lr", "0.01", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--lr 0.01 differs from the resumed run's 0.002 (stored in run.json)" in err
    # free settings may change, and layout settings are not inherited
    assert main(["train", "--out", str(run), "--resume", "--max-steps", "3", "--eval-every", "1",
                 "--no-progress"]) == 0
    assert json.loads((run / "run.json").read_text())["config"]["eval"]["eval_every"] == 1


def test_a_run_written_before_the_config_tree_resumes_to_the_same_losses(tmp_path):
    # run.json format 1 (flat settings, --attention inside model_overrides), made by the trainer
    # before this redesign; resumed here, it logs the losses that trainer logged when it resumed
    folder = tmp_path / "old"
    shutil.copytree(FIXTURE, folder)
    expected = json.loads((folder / "expected.json").read_text())
    stored = json.loads((folder / "run" / "run.json").read_text())
    assert stored["format_version"] == 1 and "settings" in stored
    assert stored_settings(stored)["attention"] == "dilated"
    cwd = os.getcwd()
    os.chdir(folder)  # the run stored its data and cache paths relative to where it was made
    try:
        with pytest.raises(ValueError, match="--seq-len 64 differs from the resumed run's 32"):
            train({"seq_len": 64}, "run", resume=True, log=lambda m: None)
        result = train({"max_steps": expected["resume_max_steps"], "progress": False}, "run", resume=True,
                       log=lambda m: None)
    finally:
        os.chdir(cwd)
    assert result.step == 4
    losses = {str(r["step"]): r["loss"] for r in read_metrics(folder / "run" / "metrics.jsonl") if r["kind"] == "train"}
    for step, loss in expected["losses"].items():
        assert losses[step] == pytest.approx(loss, abs=1e-6)
    assert json.loads((folder / "run" / "run.json").read_text())["format_version"] == 2

"""``longnet generate``: streamed text equals the model's generation; one-line errors, exit 2."""

import argparse
import shutil

import pytest
import torch

from longnet import LongNetConfig, LongNetLM
from longnet.cli import generate as cli
from longnet.data import train_tokenizer

TEXT = "def add(a, b):\n    return a + b\n\nclass Counter:\n    def __init__(self):\n" * 20



@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("run")
    tokenizer = train_tokenizer([TEXT], 300)
    torch.manual_seed(0)
    config = LongNetConfig(vocab_size=tokenizer.vocab_size, embed_dim=32, num_layers=2,
                           num_heads=4, ffn_dim=64, segment_lengths=(4, 8), dilation_rates=(1, 2),
                           max_train_length=8)
    LongNetLM(config).save_pretrained(folder)
    tokenizer.save(folder)
    return folder, tokenizer


def call(argv):
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return cli.run(parser.parse_args(argv))


def test_greedy_text_is_the_model_generation(run_dir, capsys):
    folder, tokenizer = run_dir
    rc = call(["--checkpoint", str(folder), "--prompt", "def add(", "--max-new-tokens", "20",
               "--greedy"])
    out, err = capsys.readouterr()
    assert rc == 0
    model = LongNetLM.from_pretrained(folder).eval()
    ids = torch.tensor([tokenizer.encode("def add(")])
    new = model.generate(ids, 20, eos_token_id=tokenizer.eos_id)[0, ids.shape[1]:].tolist()
    if tokenizer.eos_id in new:
        new = new[:new.index(tokenizer.eos_id)]
    assert out == tokenizer.decode(new) + "\n"
    assert "prompt tokens" in err and "tokens/s" in err


def test_seeded_sampling_reproduces_and_prompt_file_works(run_dir, capsys, tmp_path):
    folder, _ = run_dir
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("class Counter:", encoding="utf-8")
    argv = ["--checkpoint", str(folder), "--prompt-file", str(prompt), "--max-new-tokens", "15",
            "--seed", "3", "--temperature", "0.9", "--top-k", "50", "--top-p", "0.95"]
    assert call(argv) == 0
    first = capsys.readouterr().out
    assert call(argv) == 0
    assert capsys.readouterr().out == first


@pytest.mark.parametrize("argv, message", [
    (["--max-new-tokens", "5", "--prompt", "x", "--checkpoint", "MISSING"], "not found"),
    (["--prompt", "x", "--max-new-tokens", "-1"], "max-new-tokens"),
    (["--prompt", "x", "--max-new-tokens", "5", "--temperature", "0"], "temperature"),
    (["--prompt", "x", "--max-new-tokens", "5", "--top-p", "2"], "top_p"),
    (["--prompt", "", "--max-new-tokens", "5"], "empty"),
    (["--prompt-file", "MISSING.txt", "--max-new-tokens", "5"], "prompt-file"),
    (["--prompt", "x", "--max-new-tokens", "5", "--device", "nodevice"], "device"),
])
def test_errors_are_one_line_with_exit_code_2(run_dir, capsys, tmp_path, argv, message):
    folder, _ = run_dir
    if "--checkpoint" not in argv:
        argv = ["--checkpoint", str(folder)] + argv
    argv = [str(tmp_path / a) if a.startswith("MISSING") else a for a in argv]
    assert call(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and err.startswith("longnet generate: error:")


def test_a_folder_without_tokenizer_or_model_is_an_error(run_dir, capsys, tmp_path):
    folder, tokenizer = run_dir
    assert call(["--checkpoint", str(tmp_path), "--prompt", "x", "--max-new-tokens", "2"]) == 2
    assert "tokenizer" in capsys.readouterr().err
    tokenizer.save(tmp_path)
    assert call(["--checkpoint", str(tmp_path), "--prompt", "x", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("longnet generate: error:")


def test_weights_with_nan_are_an_error_naming_file_and_tensor(run_dir, capsys, tmp_path):
    folder, _ = run_dir
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    data = bytearray((bad / "model.safetensors").read_bytes())
    data[len(data) // 2:len(data) // 2 + 4096] = b"\xff" * 4096  # header intact, NaNs inside
    (bad / "model.safetensors").write_bytes(bytes(data))
    assert call(["--checkpoint", str(bad), "--prompt", "x", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model.safetensors: tensor '" in err and "non-finite" in err

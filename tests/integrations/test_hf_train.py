"""``longnet train --hf-model``: fine-tuning a saved Hugging Face causal LM with dilated attention."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers", minversion="5")

from safetensors.torch import load_file  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402

import longnet.hf  # noqa: E402
from longnet.cli.main import main  # noqa: E402
from longnet.integrations.hf_train import (  # noqa: E402
    HFCausalLM,
    default_pattern,
    load_hf_tokenizer,
    prepare_hf_config,
)
from longnet.testing.hf_fixtures import write_corpus, write_llama  # noqa: E402
from longnet.train import train  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_train")
    corpus = write_corpus(root / "corpus")
    return {"corpus": corpus, "model": write_llama(root / "llama", corpus), "cache": root / "cache"}


def settings(setup, **kw):
    base = dict(hf_model=str(setup["model"]), data=str(setup["corpus"]), cache_dir=str(setup["cache"]),
                seq_len=32, batch_tokens=128, micro_batch=2, max_steps=6, eval_every=3, eval_tokens=128,
                save_every=3, lr=3e-3, warmup_steps=1, device="cpu", progress=False)
    base.update(kw)
    return base


def weights(run: Path) -> dict:
    return load_file(str(run / "model.safetensors"))


def test_default_pattern_grows_from_the_original_context():
    assert default_pattern(2048, 32768) == ([2048, 4096, 8192, 16384, 32768], [1, 2, 4, 8, 16])
    assert default_pattern(4096, 10000) == ([4096, 8192, 16384], [1, 2, 4])
    assert default_pattern(4096, 1000) == ([4096], [1])
    with pytest.raises(ValueError, match="seq_len"):
        default_pattern(8, 0)


def test_the_model_tokenizer_and_its_end_of_sequence_separate_documents(setup):
    config = prepare_hf_config(setup["model"], seq_len=32)
    assert (config.segment_lengths, config.dilation_rates) == ([8, 16, 32], [1, 2, 4])
    tokenizer = load_hf_tokenizer(setup["model"], config)
    assert tokenizer.eos_id == config.eos_token_id and tokenizer.pad_id == tokenizer.eos_id
    folder = setup["model"].parent / "tok"
    tokenizer.save(folder)  # reloads with the same special tokens (as the token cache does)
    again = type(tokenizer).load(folder)
    assert (again.eos_id, again.pad_id, again.sha256()) == (tokenizer.eos_id, tokenizer.pad_id, tokenizer.sha256())


def test_adapter_loss_is_the_shifted_cross_entropy_of_the_hf_model(setup):
    model = HFCausalLM.from_folder(setup["model"], seq_len=32).eval()
    hf = model.model
    ids = torch.randint(0, 100, (2, 20))
    with torch.no_grad():
        out = model(ids[:, :-1], labels=ids[:, 1:])
        ref = hf(input_ids=ids, labels=ids).loss  # transformers shifts itself
    torch.testing.assert_close(out.loss, ref, atol=1e-6, rtol=1e-6)
    assert int(out.num_tokens) == 2 * 19
    assert hf.config._attn_implementation in longnet.hf.registered_names()


def test_trains_resumes_bit_exactly_and_saves_an_hf_folder(setup, tmp_path):
    straight = train(settings(setup), tmp_path / "straight", log=lambda m: None)
    assert straight.step == 6 and straight.val_loss is not None
    first = train(settings(setup, max_steps=3, decay_steps=6), tmp_path / "pieces", log=lambda m: None)
    assert first.step == 3
    resumed = train({"max_steps": 6, "progress": False}, tmp_path / "pieces", resume=True, log=lambda m: None)
    assert resumed.step == 6
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "pieces")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    losses = [r["loss"] for r in straight.history if r["kind"] == "train"]
    assert losses[-1] < losses[0]
    before = load_file(str(setup["model"] / "model.safetensors"))
    assert any(not torch.equal(before[k], a[k]) for k in a)  # it did train

    # the run folder is a transformers folder: it loads with the dilated attention and pattern
    run = tmp_path / "straight"
    saved = json.loads((run / "config.json").read_text())
    assert (saved["segment_lengths"], saved["dilation_rates"]) == ([8, 16, 32], [1, 2, 4])
    longnet.hf.register()
    reloaded = LlamaForCausalLM.from_pretrained(run, attn_implementation="dilated").eval()
    trained = HFCausalLM.from_pretrained(latest := sorted((run / "checkpoints").iterdir())[-1]).eval()
    assert latest.name.startswith("step-")
    ids = torch.randint(0, 100, (2, 40))  # past the largest segment
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, trained(ids).logits, atol=0, rtol=0)
        dense = LlamaForCausalLM.from_pretrained(run, attn_implementation="sdpa").eval()
        assert (dense(input_ids=ids).logits - reloaded(input_ids=ids).logits).abs().max() > 1e-4


def test_reloading_verifies_the_manifest_and_finite_weights(setup, tmp_path):
    from longnet.models import CheckpointError
    from longnet.models.checkpoint import MANIFEST_FILE, build_manifest

    folder = tmp_path / "ckpt"
    HFCausalLM.from_folder(setup["model"], seq_len=32).save_pretrained(folder)
    (folder / MANIFEST_FILE).write_text(json.dumps(build_manifest(folder)))
    HFCausalLM.from_pretrained(folder)
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2:len(data) // 2 + 4096] = b"\xff" * 4096  # NaNs, header intact
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors: corrupted on disk"):
        HFCausalLM.from_pretrained(folder)
    (folder / MANIFEST_FILE).unlink()
    with pytest.raises(CheckpointError, match="model.safetensors: tensor '.*' holds .* non-finite"):
        HFCausalLM.from_pretrained(folder)
    HFCausalLM.from_pretrained(folder, verify=False)


def test_command_line_and_its_errors(setup, tmp_path, capsys):
    args = ["train", "--hf-model", str(setup["model"]), "--data", str(setup["corpus"]), "--cache-dir",
            str(setup["cache"]), "--seq-len", "32", "--batch-tokens", "64", "--max-steps", "2", "--eval-every",
            "2", "--eval-tokens", "64", "--segment-lengths", "4,16", "--dilation-rates", "1,4", "--lr", "1e-3",
            "--device", "cpu", "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "run")]) == 0
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (saved["segment_lengths"], saved["dilation_rates"]) == ([4, 16], [1, 4])
    capsys.readouterr()
    bad = [
        (["--hf-model", str(tmp_path / "missing")], "no such folder"),
        (["--segment-lengths", "4,16", "--dilation-rates", "1"], "dilation"),
        (["--vocab-size", "50"], "--vocab-size"),
        (["--attention", "dense"], "--attention"),
    ]
    base = [a for a in args if a not in ("--segment-lengths", "4,16", "--dilation-rates", "1,4")]
    for i, (extra, match) in enumerate(bad):
        argv = list(base)
        if extra[0] == "--hf-model":
            argv[argv.index("--hf-model") + 1] = extra[1]
            extra = []
        code = main([*argv, *extra, "--out", str(tmp_path / f"bad{i}")])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and err[-1].startswith("error: ") and match in err[-1], err[-1:]
        assert "Traceback" not in "".join(err)

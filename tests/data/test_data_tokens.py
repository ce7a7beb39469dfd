"""Token files: build, manifest, cache reuse and invalidation, atomic writes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from longnet.data import SPLITS, Tokenizer, load_corpus, prepare_data, token_dtype
from longnet.data import tokens as tokens_module
from longnet.data.tokenizer import EOS_TOKEN


def _prepare(folder, cache, **kwargs):
    return prepare_data(str(folder), cache, vocab_size=300, progress=False, **kwargs)


def test_build_manifest_and_contents(text_folder, tmp_path):
    prepared = _prepare(text_folder, tmp_path / "cache")
    assert not prepared.reused
    assert prepared.dtype == np.uint16
    manifest = json.loads((prepared.directory / "manifest.json").read_text())
    assert manifest == prepared.manifest
    assert manifest["version"] == tokens_module.FORMAT_VERSION
    assert manifest["source"] == str(text_folder)
    assert manifest["dtype"] == "uint16"
    assert manifest["tokenizer"]["vocab_size"] == prepared.tokenizer.vocab_size
    assert manifest["tokenizer"]["sha256"] == Tokenizer.load(prepared.directory).sha256()
    assert any(f[0].endswith("README.txt") and f[1] == 16 for f in manifest["corpus"]["files"])
    corpus = load_corpus(str(text_folder))
    for split in SPLITS:
        entry = manifest["splits"][split]
        stream = prepared.tokens(split)
        assert len(stream) == entry["num_tokens"] == prepared.num_tokens[split]
        assert prepared.paths[split].stat().st_size == entry["size"] == 2 * entry["num_tokens"]
        expected = "".join(doc.text + EOS_TOKEN for doc in corpus.split(split))
        assert prepared.tokenizer.decode(stream[:].tolist()) == expected
        assert entry["num_documents"] == len(corpus.keys(split))
    assert sum(prepared.num_tokens.values()) > 1000


def test_second_call_reuses_without_tokenizing(text_folder, tmp_path, monkeypatch):
    first = _prepare(text_folder, tmp_path / "cache")
    mtimes = {p: p.stat().st_mtime_ns for p in first.directory.iterdir()}

    def fail(*args, **kwargs):
        raise AssertionError("re-tokenized")

    monkeypatch.setattr(tokens_module, "write_token_file", fail)
    monkeypatch.setattr(tokens_module, "train_tokenizer", fail)
    second = _prepare(text_folder, tmp_path / "cache")
    assert second.reused and second.directory == first.directory
    assert second.num_tokens == first.num_tokens
    assert {p: p.stat().st_mtime_ns for p in second.directory.iterdir()} == mtimes


def test_rebuild_when_data_or_tokenizer_changes(text_folder, tmp_path, small_tokenizer):
    first = _prepare(text_folder, tmp_path / "cache")
    (text_folder / "README.txt").write_text("A small corpus, edited.\n")
    second = _prepare(text_folder, tmp_path / "cache")
    assert not second.reused and second.directory != first.directory
    given = prepare_data(str(text_folder), tmp_path / "cache", tokenizer=small_tokenizer, progress=False)
    assert given.manifest["tokenizer"]["sha256"] == small_tokenizer.sha256()
    assert given.directory not in (first.directory, second.directory)
    # A tokenizer file changed behind the manifest's back invalidates the entry.
    (second.directory / "tokenizer.json").write_text(small_tokenizer.to_str())
    third = _prepare(text_folder, tmp_path / "cache")
    assert not third.reused and third.manifest["tokenizer"]["sha256"] == small_tokenizer.sha256()
    # So does a truncated token file.
    path = third.paths["train"]
    path.write_bytes(path.read_bytes()[:-2])
    assert not _prepare(text_folder, tmp_path / "cache").reused


def test_crash_mid_write_leaves_no_complete_looking_entry(text_folder, tmp_path, monkeypatch):
    monkeypatch.setattr(tokens_module, "ENCODE_BATCH_CHARS", 200)  # many batches per split
    calls = {"n": 0}
    original = Tokenizer.encode_batch

    def crash_on_fifth(self, texts):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("simulated crash")
        return original(self, texts)

    monkeypatch.setattr(Tokenizer, "encode_batch", crash_on_fifth)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _prepare(text_folder, tmp_path / "cache")
    (entry,) = (tmp_path / "cache").iterdir()
    names = {p.name for p in entry.iterdir()}
    assert "manifest.json" not in names
    assert "train.bin" not in names  # the crash hit the training split mid-file
    assert not [n for n in names if n.endswith(".tmp")]
    monkeypatch.setattr(Tokenizer, "encode_batch", original)
    prepared = _prepare(text_folder, tmp_path / "cache")
    assert not prepared.reused and prepared.directory == entry
    assert _prepare(text_folder, tmp_path / "cache").reused


def test_token_dtype():
    assert token_dtype(300) == np.uint16
    assert token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32
    with pytest.raises(ValueError, match="vocab_size"):
        token_dtype(0)


def test_prepare_rejects_bad_arguments(tmp_path):
    with pytest.raises(TypeError, match="spec"):
        prepare_data(123, tmp_path)
    with pytest.raises(TypeError, match="tokenizer"):
        prepare_data("stdlib", tmp_path, tokenizer="gpt2")
    with pytest.raises(ValueError, match="does not exist"):
        prepare_data(str(tmp_path / "missing"), tmp_path)
    with pytest.raises(ValueError, match="vocab_size"):
        prepare_data("stdlib", tmp_path, vocab_size=10)
    assert not list(tmp_path.iterdir())  # rejected before creating anything


def test_empty_training_split_is_a_clear_error(tmp_path):
    path = tmp_path / "one.txt"
    path.write_text("a single document\n")
    corpus = load_corpus(str(path), validation_fraction=0.5, test_fraction=0.49999)
    assert corpus.split_of("one.txt") != "train"
    with pytest.raises(ValueError, match="training split .* is empty"):
        prepare_data(corpus, tmp_path / "cache", vocab_size=300, progress=False)


def test_tokenizer_training_is_deterministic(text_folder, tmp_path):
    first = _prepare(text_folder, tmp_path / "a")
    second = _prepare(text_folder, tmp_path / "b")
    assert first.tokenizer.sha256() == second.tokenizer.sha256()
    assert first.paths["train"].read_bytes() == second.paths["train"].read_bytes()

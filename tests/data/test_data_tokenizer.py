"""Tokenizer: exact byte-level round trips, special tokens, save/load, exact chunked encoding."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from longnet.data import EOS_TOKEN, Tokenizer, train_tokenizer
from longnet.data.tokens import encoding_chunks

TRICKY = "héllo wörld — 日本語 🚀\n\tx"


def test_round_trip_non_ascii(small_tokenizer):
    ids = small_tokenizer.encode(TRICKY)
    assert small_tokenizer.decode(ids) == TRICKY
    assert all(0 <= i < small_tokenizer.vocab_size for i in ids)
    unseen = "Ωμέγα ∑ 🤖 \x00\x7f\r\n  trailing  "
    assert small_tokenizer.decode(small_tokenizer.encode(unseen)) == unseen


def test_special_tokens(small_tokenizer):
    assert (small_tokenizer.eos_id, small_tokenizer.pad_id) == (0, 1)
    assert 258 < small_tokenizer.vocab_size <= 400  # at most the requested size
    text = f"a{EOS_TOKEN}b"
    ids = small_tokenizer.encode(text)
    assert small_tokenizer.eos_id not in ids  # text cannot inject a separator
    assert small_tokenizer.decode(ids) == text
    assert small_tokenizer.decode([small_tokenizer.eos_id]) == EOS_TOKEN


def test_save_load_identical(small_tokenizer, tmp_path, sample_text):
    path = small_tokenizer.save(tmp_path / "tok")
    assert path.name == "tokenizer.json"
    loaded = Tokenizer.load(tmp_path / "tok")
    for text in (TRICKY, sample_text, f"x{EOS_TOKEN}y"):
        assert loaded.encode(text) == small_tokenizer.encode(text)
    assert loaded.sha256() == small_tokenizer.sha256()
    assert loaded.encode_batch([TRICKY, "z"]) == [small_tokenizer.encode(TRICKY), small_tokenizer.encode("z")]
    with pytest.raises(ValueError, match="not found"):
        Tokenizer.load(tmp_path / "missing")


def test_training_cap_and_errors(sample_text):
    capped = train_tokenizer([sample_text * 50], 400, max_train_bytes=64)
    full = train_tokenizer([sample_text * 50], 400)
    assert capped.vocab_size < full.vocab_size  # 64 bytes cannot fill the vocabulary
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer([sample_text], 100)
    with pytest.raises(TypeError, match="vocab_size"):
        train_tokenizer([sample_text], 300.0)
    with pytest.raises(ValueError, match="empty"):
        train_tokenizer([], 300)
    with pytest.raises(TypeError, match="text"):
        full.encode(b"bytes")


_pieces = st.sampled_from(["\n", " ", "  ", "\t", "x", "def", "'s", "日本", "🚀", "é", "(", "1", "\r\n", " \n"])


@settings(max_examples=150, deadline=None)
@given(parts=st.lists(_pieces, max_size=200), target=st.integers(1, 40))
def test_encoding_chunks_match_whole_text(small_tokenizer, parts, target):
    text = "".join(parts)
    chunks = encoding_chunks(text, target)
    assert "".join(chunks) == text
    ids = [i for chunk_ids in small_tokenizer.encode_batch(chunks) for i in chunk_ids]
    assert ids == small_tokenizer.encode(text)

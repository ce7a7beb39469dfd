"""Loaders: deterministic, resumable training batches; sequence/data-parallel slices; eval windows."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from longnet.data import EvalBatches, TokenStream, TrainBatches


@pytest.fixture
def stream(tmp_path) -> TokenStream:
    """Tokens whose value is their position (mod 65536), so windows are easy to check."""
    path = tmp_path / "train.bin"
    np.arange(5000, dtype=np.uint16).tofile(path)
    return TokenStream(path, np.uint16, name="train")


def test_token_stream(stream, tmp_path):
    assert len(stream) == 5000 and stream[10] == 10
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    assert len(TokenStream(empty, "uint32")) == 0
    odd = tmp_path / "odd.bin"
    odd.write_bytes(b"abc")
    with pytest.raises(ValueError, match="multiple"):
        TokenStream(odd, np.uint16)
    with pytest.raises(ValueError, match="not found"):
        TokenStream(tmp_path / "missing.bin", np.uint16)
    with pytest.raises(ValueError, match="dtype"):
        TokenStream(odd, np.int8)


def test_train_batches_are_pure_functions_of_seed_and_step(stream):
    sampler = TrainBatches(stream, seq_len=64, batch_size=4, seed=7)
    inputs, labels = sampler.get(3)
    assert inputs.shape == labels.shape == (4, 64)
    assert inputs.dtype == labels.dtype == torch.int64
    again = TrainBatches(stream, seq_len=64, batch_size=4, seed=7).get(3)
    assert torch.equal(inputs, again[0]) and torch.equal(labels, again[1])
    assert not torch.equal(inputs, sampler.get(4)[0])
    assert not torch.equal(inputs, TrainBatches(stream, 64, 4, seed=8).get(3)[0])
    raw = np.asarray(stream[:], dtype=np.int64)
    for row, offset in enumerate(sampler.offsets(3)):
        assert torch.equal(inputs[row], torch.from_numpy(raw[offset : offset + 64]))
        assert torch.equal(labels[row], torch.from_numpy(raw[offset + 1 : offset + 65]))
    offsets = np.concatenate([sampler.offsets(s) for s in range(200)])
    assert offsets.min() >= 0 and offsets.max() <= len(stream) - 65


def test_sequence_parallel_slices_concatenate_to_full_batch(stream):
    sampler = TrainBatches(stream, seq_len=96, batch_size=3, seed=1)
    full_inputs, full_labels = sampler.get(5)
    bounds = [0, 24, 48, 72, 96]
    chunks = [sampler.get(5, start, stop) for start, stop in zip(bounds, bounds[1:])]
    assert torch.equal(torch.cat([c[0] for c in chunks], dim=1), full_inputs)
    assert torch.equal(torch.cat([c[1] for c in chunks], dim=1), full_labels)
    # a chunk's last label is the next chunk's first input
    assert torch.equal(chunks[0][1][:, -1], chunks[1][0][:, 0])
    with pytest.raises(ValueError, match="start"):
        sampler.get(5, 50, 40)
    with pytest.raises(ValueError, match="stop"):
        sampler.get(5, 0, 97)


def test_data_parallel_ranks_partition_the_global_batch(stream):
    sampler = TrainBatches(stream, seq_len=32, batch_size=8, seed=3)
    full_inputs, full_labels = sampler.get(11)
    parts = [sampler.get(11, rank=r, world=4) for r in range(4)]
    assert all(p[0].shape == (2, 32) for p in parts)
    assert torch.equal(torch.cat([p[0] for p in parts]), full_inputs)
    assert torch.equal(torch.cat([p[1] for p in parts]), full_labels)
    both = sampler.get(11, 16, 32, rank=1, world=4)
    assert torch.equal(both[0], full_inputs[2:4, 16:32])
    with pytest.raises(ValueError, match="divisible"):
        sampler.get(0, world=3)
    with pytest.raises(ValueError, match="rank"):
        sampler.get(0, rank=4, world=4)


def test_resume_from_state_dict(stream):
    sampler = TrainBatches(stream, seq_len=16, batch_size=2, seed=5)
    uninterrupted = [next(sampler)[0] for _ in range(6)]
    first = TrainBatches(stream, seq_len=16, batch_size=2, seed=5)
    for _ in range(3):
        next(first)
    state = first.state_dict()
    assert state["step"] == 3 and state["seed"] == 5
    resumed = TrainBatches(stream, seq_len=16, batch_size=2, seed=0)
    resumed.load_state_dict(state)
    assert all(torch.equal(next(resumed)[0], uninterrupted[i]) for i in range(3, 6))
    with pytest.raises(ValueError, match="seq_len"):
        TrainBatches(stream, seq_len=8, batch_size=2).load_state_dict(state)


def test_eval_windows_are_contiguous(stream):
    evals = EvalBatches(stream, seq_len=100)
    assert len(evals) == (5000 - 1) // 100
    batches = list(evals.batches(batch_size=7))
    assert [b[0].shape[0] for b in batches] == [7] * 7
    assert [b[0].shape[0] for b in evals.batches(batch_size=10)] == [10, 10, 10, 10, 9]
    inputs = torch.cat([b[0] for b in batches]).reshape(-1)
    labels = torch.cat([b[1] for b in batches]).reshape(-1)
    raw = torch.from_numpy(np.asarray(stream[:], dtype=np.int64))
    assert torch.equal(inputs, raw[: len(evals) * 100])
    assert torch.equal(labels, raw[1 : len(evals) * 100 + 1])
    assert len(list(EvalBatches(stream, seq_len=100, max_sequences=3))) == 3
    chunked = list(evals.batches(batch_size=4, start=50, stop=100))
    assert torch.equal(chunked[0][1], batches[0][1][:4, 50:])


def test_eval_ranks_take_disjoint_windows(stream):
    evals = EvalBatches(stream, seq_len=100)  # 49 windows: 48 used with 4 ranks
    seen = []
    for rank in range(4):
        rank_batches = list(evals.batches(batch_size=5, rank=rank, world=4))
        assert len(rank_batches) == 3  # same count on every rank
        seen.extend(int(x) // 100 for b in rank_batches for x in b[0][:, 0])
    assert sorted(seen) == list(range(48))


def test_short_split_error(tmp_path):
    path = tmp_path / "validation.bin"
    np.arange(12_345, dtype=np.uint16).tofile(path)
    short = TokenStream(path, np.uint16)
    message = "split 'validation' has 12,345 tokens, fewer than --seq-len 32768 + 1; use a shorter --seq-len or more data"
    with pytest.raises(ValueError, match=message.replace("+", r"\+")):
        EvalBatches(short, seq_len=32768)
    with pytest.raises(ValueError, match="fewer than --seq-len"):
        TrainBatches(short, seq_len=12_345, batch_size=1)
    EvalBatches(short, seq_len=12_344)  # exactly seq_len + 1 tokens is enough
    with pytest.raises(ValueError, match="seq_len"):
        EvalBatches(short, seq_len=0)
    with pytest.raises(TypeError, match="tokens"):
        TrainBatches(np.zeros(10), seq_len=2, batch_size=1)

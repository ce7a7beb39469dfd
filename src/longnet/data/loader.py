"""Batches from token files: random windows for training, contiguous windows for evaluation.

Both are deterministic. A training batch is a pure function of ``(seed, step)``, so resuming at
step k reproduces the exact batches of an uninterrupted run, for any number of ranks.

Parallel contract (both samplers):

- ``rank``/``world`` (data parallel): the *global* batch of ``batch_size`` sequences is cut into
  ``world`` contiguous blocks of ``batch_size // world`` rows; rank r gets rows
  ``[r * batch_size // world, (r + 1) * batch_size // world)``. ``batch_size`` must be divisible
  by ``world``. Concatenating the ranks' rows in rank order gives the ``world=1`` batch.
- ``start``/``stop`` (sequence parallel): columns ``[start, stop)`` of every sequence.
  ``labels[:, j]`` is always the token after ``input_ids[:, j]`` in the *full* sequence, so a
  chunk's last label is the next chunk's first input (for the last chunk: the window's extra
  token). Only ``stop - start + 1`` tokens per row are read. Concatenating the chunks along
  dim 1 gives the unsliced batch.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

Batch = tuple[torch.Tensor, torch.Tensor]
"""``(input_ids, labels)``, both int64 of shape (batch, columns)."""


class TokenStream:
    """A flat token file (``numpy.memmap``, read-only); ``len()`` is its number of tokens."""

    def __init__(self, path: str | os.PathLike, dtype: np.dtype | str, name: str | None = None) -> None:
        self.path = Path(path)
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.dtype(np.uint16), np.dtype(np.uint32)):
            raise ValueError(f"dtype must be uint16 or uint32, got {self.dtype}")
        if not self.path.is_file():
            raise ValueError(f"token file {self.path} not found")
        size = self.path.stat().st_size
        if size % self.dtype.itemsize:
            raise ValueError(f"token file {self.path} has {size} bytes, not a multiple of {self.dtype.itemsize}")
        self.name = name or self.path.stem
        # np.memmap refuses empty files; an empty split is an empty array.
        self.array = np.memmap(self.path, dtype=self.dtype, mode="r") if size else np.zeros(0, self.dtype)

    def __len__(self) -> int:
        return int(self.array.shape[0])

    def __getitem__(self, index: int | slice) -> np.ndarray:
        return self.array[index]

    def __repr__(self) -> str:
        return f"TokenStream({str(self.path)!r}, dtype={self.dtype.name}, tokens={len(self):,})"


def _check_positive(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be positive, got {value}")


def _check_length(tokens: TokenStream, seq_len: int) -> None:
    if len(tokens) < seq_len + 1:
        raise ValueError(
            f"split {tokens.name!r} has {len(tokens):,} tokens, fewer than --seq-len {seq_len} + 1; "
            "use a shorter --seq-len or more data"
        )


def _columns(seq_len: int, start: int | None, stop: int | None) -> tuple[int, int]:
    start = 0 if start is None else start
    stop = seq_len if stop is None else stop
    if not 0 <= start < stop <= seq_len:
        raise ValueError(f"need 0 <= start < stop <= seq_len={seq_len}, got start={start}, stop={stop}")
    return start, stop


def _rows(batch_size: int, rank: int, world: int) -> slice:
    _check_positive("world", world)
    if not 0 <= rank < world:
        raise ValueError(f"rank must be in [0, world={world}), got {rank}")
    if batch_size % world:
        raise ValueError(f"batch_size {batch_size} is not divisible by world {world}")
    per_rank = batch_size // world
    return slice(rank * per_rank, (rank + 1) * per_rank)


def _read_windows(tokens: TokenStream, offsets: np.ndarray, start: int, stop: int) -> Batch:
    """Rows tokens[o + start : o + stop + 1] split into inputs and next-token labels."""
    width = stop - start + 1
    rows = np.empty((len(offsets), width), dtype=np.int64)
    for i, offset in enumerate(offsets):
        rows[i] = tokens[int(offset) + start : int(offset) + start + width]
    data = torch.from_numpy(rows)
    return data[:, :-1], data[:, 1:]


class TrainBatches:
    """Random training windows; ``get(step)`` depends only on ``(seed, step)``.

    Each of the ``batch_size`` rows (the global batch) starts at an offset drawn uniformly from
    ``[0, len(tokens) - seq_len - 1]`` by ``numpy.random.default_rng([seed, step])``; windows may
    cross document boundaries (the EOS separator is a regular token).
    """

    def __init__(self, tokens: TokenStream, seq_len: int, batch_size: int, seed: int = 0) -> None:
        if not isinstance(tokens, TokenStream):
            raise TypeError(f"tokens must be a TokenStream, got {type(tokens).__name__}")
        _check_positive("seq_len", seq_len)
        _check_positive("batch_size", batch_size)
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        _check_length(tokens, seq_len)
        self.tokens = tokens
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.seed = seed
        self.step = 0
        """The next step :meth:`__next__` returns."""

    def offsets(self, step: int) -> np.ndarray:
        """Start offsets of the global batch of ``step``: shape (batch_size,)."""
        if not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be a non-negative int, got {step!r}")
        rng = np.random.default_rng([self.seed, step])
        return rng.integers(0, len(self.tokens) - self.seq_len, size=self.batch_size)

    def get(
        self, step: int, start: int | None = None, stop: int | None = None, *, rank: int = 0, world: int = 1
    ) -> Batch:
        """``(input_ids, labels)`` of shape (batch_size // world, stop - start) for ``step``."""
        start, stop = _columns(self.seq_len, start, stop)
        offsets = self.offsets(step)[_rows(self.batch_size, rank, world)]
        return _read_windows(self.tokens, offsets, start, stop)

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        batch = self.get(self.step)
        self.step += 1
        return batch

    def state_dict(self) -> dict:
        """What resumes the sampler: seed, shapes, next step and the stream length."""
        return {
            "seed": self.seed,
            "seq_len": self.seq_len,
            "batch_size": self.batch_size,
            "step": self.step,
            "num_tokens": len(self.tokens),
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume from :meth:`state_dict`; seq_len, batch_size and the data must match."""
        for name in ("seq_len", "batch_size"):
            if state[name] != getattr(self, name):
                raise ValueError(f"state {name}={state[name]} differs from this sampler's {getattr(self, name)}")
        if state.get("num_tokens", len(self.tokens)) != len(self.tokens):
            raise ValueError(
                f"state was saved on {state['num_tokens']:,} tokens, this stream has {len(self.tokens):,}: "
                "the data changed"
            )
        self.seed = int(state["seed"])
        self.step = int(state["step"])


class EvalBatches:
    """Contiguous evaluation windows, in order, covering the split once.

    Window i reads tokens ``[i * seq_len, (i + 1) * seq_len + 1)``: inputs do not overlap and
    follow each other, and every token after the first is a label exactly once (the last
    partial window is dropped). ``max_sequences`` keeps only the first windows.
    """

    def __init__(self, tokens: TokenStream, seq_len: int, max_sequences: int | None = None) -> None:
        if not isinstance(tokens, TokenStream):
            raise TypeError(f"tokens must be a TokenStream, got {type(tokens).__name__}")
        _check_positive("seq_len", seq_len)
        if max_sequences is not None:
            _check_positive("max_sequences", max_sequences)
        _check_length(tokens, seq_len)
        self.tokens = tokens
        self.seq_len = seq_len
        count = (len(tokens) - 1) // seq_len
        self.num_sequences = count if max_sequences is None else min(count, max_sequences)

    def __len__(self) -> int:
        return self.num_sequences

    def batches(
        self,
        batch_size: int = 1,
        start: int | None = None,
        stop: int | None = None,
        *,
        rank: int = 0,
        world: int = 1,
    ) -> Iterator[Batch]:
        """Batches of up to ``batch_size`` windows (the last may be smaller).

        With ``world > 1`` rank r takes windows ``r, r + world, ...`` of the first
        ``world * (len(self) // world)`` windows, so every rank runs the same number of batches
        (collectives stay in step); up to ``world - 1`` trailing windows are left out.
        """
        _check_positive("batch_size", batch_size)
        start, stop = _columns(self.seq_len, start, stop)
        _rows(world, rank, world)  # validates rank and world
        usable = self.num_sequences - self.num_sequences % world
        windows = np.arange(rank, usable, world)
        for first in range(0, len(windows), batch_size):
            offsets = windows[first : first + batch_size] * self.seq_len
            yield _read_windows(self.tokens, offsets, start, stop)

    def __iter__(self) -> Iterator[Batch]:
        return self.batches()

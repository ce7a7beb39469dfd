"""Multi-query associative recall at controlled distances (MQAR, Arora et al. 2023, stretched).

A sequence of ``length`` tokens holds key-value pairs (``k v``) and, later, queries of their keys
(``k v`` again, the ``v`` being the answer the model must predict at the query's ``k``), with
random filler tokens everywhere else. Three disjoint vocabularies (after :data:`NUM_SPECIAL`):

- keys: distinct within a sequence, so every query has exactly one answer;
- values: drawn with replacement; chance accuracy is ``1 / num_values``;
- filler: uniform random tokens, which carry no information, so whatever the model gets right it
  got from the pair ``distance`` tokens back and from nothing else (stdlib text would carry its own
  long-range structure and blur what distance means).

Layout: the sequence is cut into slots of :data:`SLOT` tokens; an item (a pair or a query, two
tokens) sits at a random offset in ``[0, 12)`` of its slot, so any two items are at least
``SLOT - 13`` filler tokens apart and every residue modulo each dilation rate (up to 12) occurs.
Query distances are drawn log-uniformly in ``[min_distance, max_distance]``; the pair is then
placed at random where its slot and the query's are free. The loss is taken on the answers only
(every other label is ``-100``).

Everything is a function of the seed: batch ``i`` of a stream is ``numpy.random.default_rng((seed,
stream, i))``, so a resumed run sees the same data as an uninterrupted one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

NUM_SPECIAL = 1
"""Token 0 is reserved (never generated)."""
SLOT = 32
"""Tokens per slot; one item (two tokens) per slot at most."""
MAX_OFFSET = 12
"""An item's offset inside its slot is drawn from ``[0, MAX_OFFSET)``."""
IGNORE = -100


@dataclass(frozen=True)
class RecallVocab:
    """Sizes of the three vocabularies; token ids are laid out keys, values, filler."""

    num_keys: int = 256
    num_values: int = 256
    num_filler: int = 256

    @property
    def size(self) -> int:
        return NUM_SPECIAL + self.num_keys + self.num_values + self.num_filler

    @property
    def value_start(self) -> int:
        return NUM_SPECIAL + self.num_keys

    @property
    def filler_start(self) -> int:
        return self.value_start + self.num_values


@dataclass
class RecallBatch:
    """``input_ids`` and ``labels`` (B, N) long, labels aligned (``labels[:, t]`` is predicted at
    ``t``); ``distances`` (B, N) long: the query-to-pair distance at every labelled position, else 0."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    distances: torch.Tensor


def max_queries(length: int) -> int:
    """How many queries a sequence of ``length`` holds (half its slots, each query needing two)."""
    return max(1, (length // SLOT) // 2)


def make_sequence(rng: np.random.Generator, length: int, vocab: RecallVocab, *, num_queries: int,
                  min_distance: int, max_distance: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One sequence of ``length + 1`` tokens (inputs are ``[:-1]``, targets ``[1:]``), the answer
    positions (indices of the query keys, whose next token is the answer) and their distances.

    Queries that find no free place are dropped, so a sequence may hold fewer than ``num_queries``.
    """
    if length < 2 * SLOT:
        raise ValueError(f"length must be >= {2 * SLOT}, got {length}")
    if not 1 <= min_distance <= max_distance:
        raise ValueError(f"need 1 <= min_distance <= max_distance, got {min_distance}, {max_distance}")
    if num_queries > vocab.num_keys:
        raise ValueError(f"num_queries ({num_queries}) must be <= num_keys ({vocab.num_keys}): keys are distinct")
    num_slots = (length + 1) // SLOT
    tokens = rng.integers(vocab.filler_start, vocab.filler_start + vocab.num_filler, size=length + 1)
    free = np.ones(num_slots, dtype=bool)
    offsets = rng.integers(0, MAX_OFFSET, size=num_slots)
    top = min(max_distance, (num_slots - 1) * SLOT)
    lo, hi = math.log(min_distance), math.log(max(top, min_distance))
    wanted = np.sort(np.exp(rng.uniform(lo, hi, size=num_queries)))[::-1]  # place the longest first
    keys = rng.permutation(vocab.num_keys)[:num_queries] + NUM_SPECIAL
    values = rng.integers(vocab.value_start, vocab.value_start + vocab.num_values, size=num_queries)
    answer_at, distances = [], []
    for key, value, want in zip(keys, values, wanted):
        gap = max(1, int(round(want / SLOT)))
        starts = np.flatnonzero(free[: num_slots - gap] & free[gap:])
        if starts.size == 0:
            continue
        a = int(starts[rng.integers(starts.size)])
        b = a + gap
        free[a] = free[b] = False
        p, q = a * SLOT + int(offsets[a]), b * SLOT + int(offsets[b])
        tokens[p], tokens[p + 1] = key, value
        tokens[q], tokens[q + 1] = key, value
        answer_at.append(q)
        distances.append(q - p)
    return tokens, np.asarray(answer_at, dtype=np.int64), np.asarray(distances, dtype=np.int64)


def make_batch(seed: int, stream: int, index: int, *, batch_size: int, length: int, vocab: RecallVocab,
               num_queries: int, min_distance: int, max_distance: int) -> RecallBatch:
    """Batch ``index`` of stream ``stream`` (train, eval, ...): a pure function of its arguments."""
    rng = np.random.default_rng((seed, stream, index))
    ids = np.empty((batch_size, length), dtype=np.int64)
    labels = np.full((batch_size, length), IGNORE, dtype=np.int64)
    dist = np.zeros((batch_size, length), dtype=np.int64)
    for b in range(batch_size):
        tokens, at, d = make_sequence(rng, length, vocab, num_queries=num_queries,
                                      min_distance=min_distance, max_distance=max_distance)
        ids[b] = tokens[:-1]
        labels[b, at] = tokens[at + 1]
        dist[b, at] = d
    return RecallBatch(torch.from_numpy(ids), torch.from_numpy(labels), torch.from_numpy(dist))

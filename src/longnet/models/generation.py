"""Autoregressive generation with a bounded dilated KV cache.

:func:`cached_forward` runs the LM over new tokens of each sequence, reading and updating a
:class:`~longnet.models.cache.DilatedKVCache`: exactly the model's forward over the whole sequence
at those positions, with memory and time bounded by the pattern. :func:`generate` prefills the
prompt in chunks, then decodes token by token (greedy or sampled).

Sequences of one batch are independent: each has its own positions (counted from its first real
token), so a left-padded batch generates exactly what each sequence would alone.
"""

from __future__ import annotations

import contextlib
import numbers
from typing import Any, Callable, Iterator, Sequence

import torch

from longnet.models.base import check_token_ids
from longnet.models.cache import DilatedKVCache, make_cache

__all__ = ["generate", "cached_forward", "sample_next_token"]


# ------------------------------------------------------------------------------------ forward
def _check_suffix(valid: torch.Tensor) -> torch.Tensor:
    """Count of real tokens per row (B,), checking they form a suffix of the row."""
    count = valid.sum(1)  # (B,)
    n = valid.shape[1]
    suffix = torch.arange(n, device=valid.device)[None, :] >= (n - count)[:, None]
    if not torch.equal(suffix, valid):
        raise ValueError("valid (padding mask) must mark a suffix of each row as real (left "
                         "padding): a padding token follows a real one")
    return count


@torch.no_grad()
def cached_forward(model, input_ids: torch.Tensor, cache: DilatedKVCache,
                   valid: torch.Tensor | None = None, *,
                   logits: str = "last") -> torch.Tensor | None:
    """Logits of new tokens that continue the sequences held by ``cache``; updates the cache.

    Equals ``model(whole_sequence).logits`` at these positions (the model in eval mode), with
    each sequence's positions continuing from ``cache.lengths``.

    Args:
        model: a :class:`~longnet.LongNetLM`.
        input_ids: (B, n) long, the next tokens of each sequence.
        cache: from ``model.make_cache(B)``.
        valid: (B, n) bool, True = real token; the real tokens of a row must be a suffix (left
            padding). Padding is neither cached nor counted. Default all True.
        logits: ``"last"``: (B, V) logits of the last column (which must then be real in every
            row); ``"all"``: (B, n, V); ``"none"``: nothing (prefill).
    """
    if logits not in ("last", "all", "none"):
        raise ValueError(f"logits must be 'last', 'all' or 'none', got {logits!r}")
    if input_ids.dim() != 2 or input_ids.dtype not in (torch.long, torch.int32):
        raise ValueError(f"input_ids must be (batch, length) int64/int32, got "
                         f"{input_ids.dtype} {tuple(input_ids.shape)}")
    check_token_ids(input_ids, model.config.vocab_size)
    B, n = input_ids.shape
    if B != cache.batch_size or len(cache.layers) != len(model.blocks):
        raise ValueError(f"cache (batch {cache.batch_size}, {len(cache.layers)} layers) does not "
                         f"fit input_ids of batch {B} on a model of {len(model.blocks)} layers")
    if valid is None:
        valid = torch.ones(B, n, dtype=torch.bool, device=input_ids.device)
    elif valid.shape != (B, n) or valid.dtype != torch.bool:
        raise ValueError(f"valid must be a bool tensor of shape {(B, n)}, got "
                         f"{valid.dtype} {tuple(valid.shape)}")
    count = _check_suffix(valid)  # (B,)
    first = n - count  # first real column of each row
    starts = cache.lengths  # (B,) position of each row's first real token here
    # (B, n): consecutive per row; padding columns get earlier (possibly negative) positions
    positions = (starts - first)[:, None] + torch.arange(n, device=input_ids.device)[None, :]

    x = model.embed(input_ids)  # (B, n, E)
    x = torch.where(valid.unsqueeze(-1), x, torch.zeros_like(x))
    # each block's own forward, its attention reading and updating the layer cache
    for block, layer in zip(model.blocks, cache.layers):
        x = block(x, valid, cache=layer, positions=positions)
    cache.lengths = starts + count
    if logits == "none":
        return None
    if logits == "all":
        return model.lm_head(model.norm(x))  # (B, n, V)
    if not bool(valid[:, -1].all()):
        raise ValueError("the last column must be a real token in every row for its logits")
    return model.lm_head(model.norm(x[:, -1]))  # (B, V)


# ----------------------------------------------------------------------------------- sampling
def sample_next_token(logits: torch.Tensor, *, do_sample: bool = False, temperature: float = 1.0,
                      top_k: int | None = None, top_p: float | None = None,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids (B,) from logits (B, V): argmax, or a sample after temperature, top-k and
    top-p (nucleus: the fewest most likely tokens whose probability reaches ``top_p``)."""
    if not do_sample:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    V = logits.shape[-1]
    if top_k is not None and top_k < V:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs  # mass of the more likely tokens
        drop = before >= top_p  # the first token is always kept (before = 0 < top_p)
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# --------------------------------------------------------------------------------- validation
def _int_arg(name: str, value: Any, minimum: int, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}"
                         f"{' or None' if allow_none else ''}, got {value!r}")
    return int(value)


def _check_args(do_sample, temperature, top_k, top_p, max_new_tokens, prefill_chunk_size):
    _int_arg("max_new_tokens", max_new_tokens, 0)
    _int_arg("prefill_chunk_size", prefill_chunk_size, 1, allow_none=True)
    _int_arg("top_k", top_k, 1, allow_none=True)
    if not isinstance(do_sample, bool):
        raise ValueError(f"do_sample must be a bool, got {do_sample!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or \
            temperature != temperature:
        raise ValueError(f"temperature must be a number, got {temperature!r}")
    if do_sample and not temperature > 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, numbers.Real)
                              or not 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")


def _eos_ids(eos_token_id, vocab_size: int) -> list[int]:
    if eos_token_id is None:
        return []
    ids = [eos_token_id] if isinstance(eos_token_id, numbers.Integral) else eos_token_id
    if isinstance(ids, torch.Tensor):
        ids = ids.flatten().tolist()
    if not isinstance(ids, Sequence) or not ids:
        raise ValueError(f"eos_token_id must be an int or a non-empty sequence of ints, got "
                         f"{eos_token_id!r}")
    for i in ids:
        _int_arg("eos_token_id", i, 0)
        if i >= vocab_size:
            raise ValueError(f"eos_token_id {i} is outside the vocabulary (size {vocab_size})")
    return [int(i) for i in ids]


def _prompt_mask(input_ids, key_padding_mask, attention_mask) -> torch.Tensor:
    """(B, N) bool, True = real token, checked to be left padding with a real token per row."""
    if key_padding_mask is not None and attention_mask is not None:
        raise ValueError("give key_padding_mask or attention_mask, not both")
    name = "key_padding_mask" if key_padding_mask is not None else "attention_mask"
    mask = key_padding_mask if key_padding_mask is not None else attention_mask
    if mask is None:
        return torch.ones(input_ids.shape, dtype=torch.bool, device=input_ids.device)
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(input_ids.shape):
        raise ValueError(f"{name} must be a tensor of the shape of input_ids "
                         f"{tuple(input_ids.shape)}, got "
                         f"{tuple(mask.shape) if isinstance(mask, torch.Tensor) else mask!r}")
    if mask.dtype != torch.bool:
        if mask.dtype.is_floating_point or mask.dtype.is_complex or \
                not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError(f"{name} must be bool or 0/1 integers (1 = real token)")
        mask = mask.bool()
    mask = mask.to(input_ids.device)
    if not bool(mask.any(1).all()):
        raise ValueError(f"{name}: every sequence needs at least one real token")
    if bool((mask[:, :-1] & ~mask[:, 1:]).any()):
        raise ValueError(f"{name} must be left padding (padding only before the real tokens of a "
                         f"row); a padding token follows a real one")
    return mask


def _streamer_calls(streamer) -> tuple[Callable | None, Callable | None]:
    if streamer is None:
        return None, None
    if hasattr(streamer, "put"):
        return streamer.put, getattr(streamer, "end", None)
    if callable(streamer):
        return streamer, None
    raise TypeError(f"streamer must be a callable or have put()/end(), got "
                    f"{type(streamer).__name__}")


@contextlib.contextmanager
def _eval_mode(model) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


# --------------------------------------------------------------------------------- generation
@torch.no_grad()
def generate(model, input_ids: torch.Tensor, max_new_tokens: int, *, do_sample: bool = False,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             eos_token_id: int | Sequence[int] | None = None, pad_token_id: int | None = None,
             cache: DilatedKVCache | None = None, streamer=None,
             key_padding_mask: torch.Tensor | None = None,
             attention_mask: torch.Tensor | None = None, prefill_chunk_size: int | None = None,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Generate up to ``max_new_tokens`` tokens after ``input_ids``.

    The prompt is prefilled through the cache in chunks of ``prefill_chunk_size`` columns (memory
    bounded by the chunk and the pattern; a chunk that starts a segment of every branch runs the
    dilated attention operator, reading nothing cached); with nested patterns (every segment length divides the
    largest, ``W``) prompt tokens before the last ``W``-segment are provably never read and are
    skipped (:meth:`DilatedKVCache.unread_before`), so a prompt of any length costs at most ``W``
    tokens of prefill. Then tokens are decoded one at a time, each step reading at most
    ``ceil(w_i / r_i)`` cached keys per head and branch. The model runs in eval mode (restored
    afterwards).

    Args:
        model: a :class:`~longnet.LongNetLM`.
        input_ids: (B, N) long prompt ids, left-padded when lengths differ.
        max_new_tokens: most tokens to add (>= 0).
        do_sample: sample (True) or take the argmax (False: ``temperature``, ``top_k`` and
            ``top_p`` are then checked but unused).
        temperature: logits are divided by it before sampling (> 0).
        top_k: sample among the ``top_k`` most likely tokens (>= 1).
        top_p: sample among the fewest most likely tokens whose probability reaches it, (0, 1].
        eos_token_id: id(s) that end a sequence; later tokens of that row are ``pad_token_id``.
        pad_token_id: filler after eos; default the (first) eos id.
        cache: a cache from ``model.make_cache(B)`` to continue (``input_ids`` then follow the
            tokens it holds) and to read afterwards; default a new one. After the call it holds
            every token of each sequence except the last one generated (not fed yet).
        streamer: receives each step's new ids (B,) long: a callable, or an object with
            ``put(ids)`` and optionally ``end()`` (called once at the end).
        key_padding_mask / attention_mask: (B, N) bool or 0/1, True/1 = real token; left padding
            only. Each sequence is positioned from its first real token.
        prefill_chunk_size: prompt columns per prefill step; default
            :attr:`DilatedKVCache.default_prefill_chunk` (the patterns' period, e.g. the largest
            segment length, for slot caches; else 1024).
        generator: random generator for sampling (reproducible runs).

    Returns:
        (B, N + T) long: ``input_ids`` with the new tokens appended; ``T <= max_new_tokens``
        (generation stops early once every row has produced an eos).
    """
    _check_args(do_sample, temperature, top_k, top_p, max_new_tokens, prefill_chunk_size)
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or \
            input_ids.dtype not in (torch.long, torch.int32) or input_ids.shape[1] < 1:
        raise ValueError(f"input_ids must be a (batch, length >= 1) int64/int32 tensor, got "
                         f"{getattr(input_ids, 'dtype', type(input_ids).__name__)} "
                         f"{tuple(getattr(input_ids, 'shape', ()))}")
    vocab = model.config.vocab_size
    check_token_ids(input_ids, vocab)
    eos = _eos_ids(eos_token_id, vocab)
    if pad_token_id is not None:
        _int_arg("pad_token_id", pad_token_id, 0)
        if pad_token_id >= vocab:
            raise ValueError(f"pad_token_id {pad_token_id} is outside the vocabulary ({vocab})")
    pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
    put, end = _streamer_calls(streamer)
    mask = _prompt_mask(input_ids, key_padding_mask, attention_mask)
    B, N = input_ids.shape
    device = input_ids.device
    input_ids = input_ids.long()
    if cache is None:
        cache = make_cache(model, B)
    elif not isinstance(cache, DilatedKVCache) or cache.batch_size != B:
        raise ValueError(f"cache must be a DilatedKVCache for batch {B} "
                         f"(from model.make_cache({B})), got {cache!r}")
    if max_new_tokens == 0:
        return input_ids.clone()
    if prefill_chunk_size is None:
        prefill_chunk_size = cache.default_prefill_chunk

    with _eval_mode(model):
        # ---- prefill: skip what no later token reads, then the rest in chunks
        lengths = mask.sum(1)  # (B,) real prompt tokens
        last = cache.lengths + lengths - 1  # (B,) position of each row's last prompt token
        first_read = torch.tensor([cache.unread_before(int(p)) for p in last.tolist()],
                                  device=device)
        skip = (first_read - cache.lengths).clamp(min=0).minimum(lengths)  # (B,)
        keep = lengths - skip
        width = int(keep.max())
        ids = input_ids[:, N - width:]  # (B, width): every kept token lies in these columns
        valid = torch.arange(width, device=device)[None, :] >= (width - keep)[:, None]
        cache.lengths = cache.lengths + skip  # skipped tokens: counted, never cached nor read
        for c0 in range(0, width, prefill_chunk_size):
            c1 = min(c0 + prefill_chunk_size, width)
            logits = cached_forward(model, ids[:, c0:c1], cache, valid[:, c0:c1],
                                    logits="last" if c1 == width else "none")  # (B, V) at the end

        # ---- decode
        new_tokens = []
        finished = torch.zeros(B, dtype=torch.bool, device=device)
        eos_t = torch.tensor(eos, dtype=torch.long, device=device)
        for step in range(max_new_tokens):
            token = sample_next_token(logits, do_sample=do_sample, temperature=temperature,
                                      top_k=top_k, top_p=top_p, generator=generator)  # (B,)
            token = torch.where(finished, torch.full_like(token, pad), token)
            new_tokens.append(token)
            if put is not None:
                put(token)
            if eos:
                finished = finished | torch.isin(token, eos_t)
            if step == max_new_tokens - 1 or bool(finished.all()):
                break
            live = ~finished  # finished rows feed nothing: their cache and positions stay
            logits = _decode_step(model, token, cache, live)
        if end is not None:
            end()
    return torch.cat([input_ids, torch.stack(new_tokens, 1)], 1)


def _decode_step(model, token: torch.Tensor, cache: DilatedKVCache,
                 live: torch.Tensor) -> torch.Tensor:
    """Logits (B, V) after feeding ``token`` (B,) to the rows in ``live`` (B,) bool."""
    if bool(live.all()):
        return cached_forward(model, token[:, None], cache)
    return cached_forward(model, token[:, None], cache, live[:, None], logits="all")[:, -1]

"""Dilated attention inside Hugging Face transformers models (``attn_implementation="dilated"``).

transformers (v5) looks attention up by name in two registries: ``AttentionInterface`` (the
function that attends) and ``AttentionMaskInterface`` (the function that builds the mask the
model hands to it). :func:`register` puts both under one name, so any model written against the
interface (Llama, Mistral, Qwen2, ...) runs dilated attention once its config names it.

What crosses from one function to the other is deliberately small: the mask function returns
``None`` (no padding, keys = queries' context) or the 2-D bool padding mask ``(B, n)`` whose width
``n`` is the number of keys that really exist (``past + q_len``; a static cache's unwritten tail is
cut off). The attention function then

* reads the pattern from ``module.config.segment_lengths`` / ``module.config.dilation_rates``,
* is causal as ``module.is_causal`` (an ``is_causal`` keyword, when a model passes one, wins),
* counts positions from each row's first real token, so left padding does not move segment
  boundaries (a padded row gives its real tokens the outputs the row alone would get),
* runs the fast operator :func:`longnet.dilated_attention` when the queries are the whole
  sequence (training, prefill), and :func:`~longnet.ops.dilated_rows.dilated_attention_rows`
  for the last ``q_len`` rows when a KV cache holds earlier keys (decoding). Both are exact.

Under sequence parallelism (:func:`longnet.parallel.parallelize_sequence` on the model) each
attention module carries ``longnet_attention_fn``, the exact distributed operator over its group,
and ``longnet_sequence_rank``; the attention function then runs that operator on this rank's chunk
and refuses a KV cache, a padding mask and ``position_ids`` that are not the chunk's global ones.

Mask overlays that dilated attention cannot honour (sliding windows, chunked attention, packed
sequences, custom ``or``/``and`` mask functions, prepared 4-D masks) raise ``ValueError`` instead of
being dropped silently.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.generation.continuous_batching.cache import PagedAttentionCache
from transformers.masking_utils import (
    AttentionMaskInterface,
    bidirectional_mask_function,
    causal_mask_function,
)

from longnet.integrations.hf_cache import DilatedCache, layer_of
from longnet.integrations.hf_pattern import MARK, pattern_from_config, registered_names
from longnet.ops.dilated import dilated_attention
from longnet.ops.dilated_rows import dilated_attention_rows

__all__ = [
    "register",
    "unregister",
    "registered_names",
    "dilated_attention_forward",
    "dilated_attention_mask",
    "pattern_from_config",
]

_BUILTIN = frozenset({"eager", "sdpa", "flex_attention", "flash_attention_2", "flash_attention_3",
                      "flash_attention_4", "paged|eager"})
# keyword arguments some models pass that dilated attention cannot honour when set (a ``cache``
# keyword is handled by _cache_layer: only a paged cache, continuous batching's, is refused)
_UNSUPPORTED = ("sliding_window", "softcap", "s_aux", "position_bias")


# -------------------------------------------------------------------------------------- mask
def dilated_attention_mask(
    batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
    mask_function=causal_mask_function, attention_mask: torch.Tensor | None = None,
    config=None, **kwargs,
) -> torch.Tensor | None:
    """Mask function for ``AttentionMaskInterface``: ``None`` or a 2-D bool padding mask ``(B, n)``.

    ``n = q_offset + q_length`` (or the width of the user's 2-D mask when that is larger) is the
    number of keys that exist; queries are the last ``q_length`` of them. ``None`` means no
    padding and ``n == kv_length``. Never builds an ``N x N`` mask: the dilated pattern and
    causality are applied by the attention function.
    """
    if config is not None:
        pattern_from_config(config)  # fail early, with the config's own message
    if mask_function is not causal_mask_function and mask_function is not bidirectional_mask_function:
        raise ValueError(
            "dilated attention applies its own pattern and cannot combine it with this mask "
            f"function ({getattr(mask_function, '__name__', mask_function)!r}): sliding-window "
            "or chunked attention, packed sequences (several sequences in one row, found from "
            "position_ids) and custom or/and mask overlays are not supported; set "
            "config.sliding_window = None, pass an attention_mask instead of packed position_ids, "
            "or use another attn_implementation")
    if int(kv_offset) != 0:
        raise ValueError(f"dilated attention needs keys starting at position 0 (kv_offset=0), "
                         f"got kv_offset={int(kv_offset)} (a sliding-window cache?)")
    n = int(q_offset) + q_length
    if attention_mask is not None:
        if attention_mask.dim() != 2:
            raise ValueError("dilated attention takes a 2-D padding attention_mask (batch, keys), "
                             f"got shape {tuple(attention_mask.shape)}")
        n = max(n, attention_mask.shape[-1])
    if n > kv_length:
        raise ValueError(f"{n} keys expected (past + new tokens, or attention_mask width) but the "
                         f"cache holds only {kv_length}")
    if attention_mask is None:
        if n == kv_length:
            return None
        return torch.ones(batch_size, n, dtype=torch.bool, device=kwargs.get("device", "cpu"))
    mask = attention_mask.to(torch.bool)
    if mask.shape[-1] < n:  # as transformers does: keys the mask does not cover are not attended
        mask = torch.nn.functional.pad(mask, (0, n - mask.shape[-1]), value=False)
    if n == kv_length and bool(mask.all()):
        return None
    return mask


# --------------------------------------------------------------------------------- attention
def _leading_padding(mask: torch.Tensor) -> torch.Tensor:
    """(B, n) bool -> (B,) long: number of padding keys before each row's first real one."""
    first = mask.to(torch.int8).argmax(-1)  # index of the first True (0 if none)
    return torch.where(mask.any(-1), first, torch.zeros_like(first))


def _shift(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (B, H, n, D), index (B, n) -> x[b, :, index[b]]."""
    B, H, n, D = x.shape
    return x.gather(2, index.view(B, 1, n, 1).expand(B, H, n, D))


def _cache_layer(module, key, kwargs):
    """The :class:`~longnet.integrations.hf_cache.DilatedLayer` serving this call, or ``None``.

    Found from the tag on ``key`` (what ``DilatedCache.update`` returned) or, for models that hand
    the cache itself to the attention function (transformers' ``cache`` keyword, the new name of
    ``past_key_values``), from ``cache.layers[module.layer_idx]``. Any other ``Cache`` passed that
    way has given the full keys already; a paged cache (continuous batching) is refused.
    """
    layer = layer_of(key)
    cache = kwargs.get("cache")
    if layer is None and isinstance(cache, DilatedCache):
        idx = getattr(module, "layer_idx", None)
        if idx is None:
            raise ValueError(f"{type(module).__name__} has no layer_idx to find its DilatedCache layer")
        layer = cache.layers[idx]
    elif layer is None and cache is not None and (isinstance(cache, PagedAttentionCache)
                                                  or type(cache).__name__.startswith("Paged")):
        raise ValueError(f"dilated attention does not support a paged cache ({type(cache).__name__}, "
                         "continuous batching); use generate() with a DilatedCache or DynamicCache")
    return layer


def _check_kwargs(module, kwargs) -> None:
    for name in _UNSUPPORTED:
        if kwargs.get(name) is not None:
            raise ValueError(f"dilated attention does not support {name}={kwargs[name]!r:.60} "
                             f"(passed by {type(module).__name__}); use another attn_implementation")
    if kwargs.get("output_attentions"):
        raise ValueError("dilated attention does not return attention weights; "
                         "use attn_implementation='eager' for output_attentions=True")


def _sequence_parallel_forward(module, fn, query, key, value, attention_mask, *, pattern, causal,
                               scaling, dropout, kwargs) -> tuple[torch.Tensor, None]:
    """The call of :func:`dilated_attention_forward` on a module that
    :func:`longnet.parallel.parallelize_sequence` made sequence parallel: ``fn`` is the distributed
    operator over the module's group, ``query``/``key``/``value`` this rank's chunk of the sequence.

    Refuses what cannot be split across ranks: a KV cache (decoding), a padding mask, and
    ``position_ids`` other than this chunk's global positions ``rank * n + arange(n)`` (RoPE would
    then rotate the chunk as if it started the sequence).
    """
    name = type(module).__name__
    if layer_of(key) is not None or kwargs.get("cache") is not None:
        raise ValueError(f"{name} is sequence parallel (longnet.parallel.parallelize_sequence): a KV "
                         "cache / generation cannot run over a split sequence; call "
                         "unparallelize_sequence(model) before generating")
    q, n = query.shape[2], key.shape[2]
    if q != n:
        raise ValueError(f"{name} is sequence parallel: {q} queries over {n} keys is decoding with a KV "
                         "cache, which cannot run over a split sequence; call unparallelize_sequence("
                         "model) and pass use_cache=False under sequence parallelism")
    if attention_mask is not None:
        raise ValueError(f"{name} is sequence parallel: a padding attention_mask is not supported "
                         "there; pass full sequences without attention_mask (labels of -100 leave "
                         "tokens out of the loss)")
    position_ids = kwargs.get("position_ids")
    if position_ids is not None:
        start = int(getattr(module, "longnet_sequence_rank", 0)) * n
        expected = torch.arange(start, start + n, device=position_ids.device)
        if position_ids.shape[-1] != n or not bool((position_ids == expected).all()):
            raise ValueError(f"{name} is sequence parallel and holds positions [{start}, {start + n}) "
                             f"of the sequence, but position_ids start at {int(position_ids.flatten()[0])}: "
                             f"pass position_ids = {start} + arange({n}) (HFCausalLM does this itself)")
    out = fn(query, key, value, segment_lengths=pattern, is_causal=causal, scale=scaling,
             dropout_p=dropout, enable_gqa=key.shape[1] != query.shape[1])  # (B, H, n, D)
    return out.transpose(1, 2).contiguous(), None


def dilated_attention_forward(
    module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
    attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
    is_causal: bool | None = None, **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention function for ``AttentionInterface``.

    Args:
        module: the model's attention module; ``module.config`` holds the pattern,
            ``module.is_causal`` the causality, ``module.num_key_value_groups`` the GQA ratio.
        query: (B, H, q, D); key, value: (B, Hkv, kv, D) (the whole cache when decoding).
        attention_mask: what :func:`dilated_attention_mask` returned: ``None`` or (B, n) bool.
        dropout: attention dropout (the model passes 0 outside training).
        scaling: score scale (default ``1 / sqrt(D)``).
        is_causal: overrides ``module.is_causal`` when given.
        **kwargs: what the model passes on; ``position_ids`` is checked under sequence parallelism
            (``module.longnet_attention_fn`` set by :func:`longnet.parallel.parallelize_sequence`).

    Returns:
        ``(attn_output (B, q, H, D), None)``.
    """
    _check_kwargs(module, kwargs)
    config = getattr(module, "config", None)
    if config is None:
        raise ValueError(f"dilated attention reads its pattern from module.config, but "
                         f"{type(module).__name__} has no config attribute")
    pattern = pattern_from_config(config)
    causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    causal = bool(causal)
    parallel = getattr(module, "longnet_attention_fn", None)  # set by parallelize_sequence
    if parallel is not None:
        return _sequence_parallel_forward(module, parallel, query, key, value, attention_mask,
                                          pattern=pattern, causal=causal, scaling=scaling,
                                          dropout=float(dropout), kwargs=kwargs)
    B, H, q, D = query.shape
    n = key.shape[2]
    if attention_mask is not None and (attention_mask.dim() != 2 or attention_mask.dtype != torch.bool):
        raise ValueError(
            "dilated attention got an attention_mask of shape "
            f"{tuple(attention_mask.shape)} / {attention_mask.dtype}; it needs the 2-D bool "
            "padding mask its mask function builds (a prepared 4-D mask cannot be honoured: "
            "pass the 2-D attention_mask to the model instead)")
    layer = _cache_layer(module, key, kwargs)
    if layer is not None:  # a DilatedCache: the layer attends over its slots
        out = layer.attend(query, key, value, attention_mask, scale=scaling, causal=causal,
                           dropout=float(dropout))
        return out.transpose(1, 2).contiguous(), None
    if attention_mask is not None:
        n = attention_mask.shape[1]
        if n > key.shape[2]:
            raise ValueError(f"attention_mask covers {n} keys but only {key.shape[2]} were given")
        key, value = key[:, :, :n], value[:, :, :n]  # drop a static cache's unwritten tail
    if q > n:
        raise ValueError(f"{q} queries but only {n} keys: queries must be the last keys")
    kpm = attention_mask
    offsets = None
    if kpm is not None:
        offsets = _leading_padding(kpm)  # (B,)
        if not bool(offsets.any()):
            offsets = None
    enable_gqa = key.shape[1] != H
    dropout_p = float(dropout)  # the model passes 0.0 outside training

    if q == n:  # training / prefill: the fast exact operator
        if offsets is not None:  # move each row's leading padding to its end
            ar = torch.arange(n, device=query.device)
            fwd = (ar.unsqueeze(0) + offsets.unsqueeze(1)) % n  # (B, n)
            query, key, value = _shift(query, fwd), _shift(key, fwd), _shift(value, fwd)
            kpm = kpm.gather(1, fwd)
        out = dilated_attention(query, key, value, segment_lengths=pattern, is_causal=causal,
                                scale=scaling, key_padding_mask=kpm, dropout_p=dropout_p,
                                enable_gqa=enable_gqa)  # (B, H, n, D)
        if offsets is not None:
            back = (torch.arange(n, device=query.device).unsqueeze(0) - offsets.unsqueeze(1)) % n
            out = _shift(out, back)
    else:  # decoding: the last q rows over the cached keys
        out = dilated_attention_rows(query, key, value, pattern, query_start=n - q,
                                     is_causal=causal, scale=scaling, key_padding_mask=kpm,
                                     row_offsets=offsets, dropout_p=dropout_p)  # (B, H, q, D)
    return out.transpose(1, 2).contiguous(), None


# what registered_names() recognises (longnet.integrations.hf_pattern)
setattr(dilated_attention_forward, MARK, "attention")
setattr(dilated_attention_mask, MARK, "mask")


# ------------------------------------------------------------------------------ registration
def register(name: str = "dilated") -> str:
    """Register dilated attention and its mask function under ``name``; returns ``name``.

    Idempotent. Models then take it with ``attn_implementation=name`` (``from_pretrained``,
    ``from_config``, or ``model.set_attn_implementation(name)``); their config must carry
    ``segment_lengths`` and ``dilation_rates``. Refuses transformers' own names and names that
    another library registered.
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"name must be a non-empty str, got {name!r}")
    if name in _BUILTIN or name.startswith("paged|"):
        raise ValueError(f"name {name!r} belongs to transformers; choose another, e.g. 'dilated'")
    current = (AttentionInterface._global_mapping.get(name),
               AttentionMaskInterface._global_mapping.get(name))
    if any(f is not None for f in current) and current != (dilated_attention_forward,
                                                            dilated_attention_mask):
        raise ValueError(f"attention implementation {name!r} is already registered by someone "
                         f"else; choose another name")
    AttentionInterface.register(name, dilated_attention_forward)
    AttentionMaskInterface.register(name, dilated_attention_mask)
    return name


def unregister(name: str = "dilated") -> None:
    """Remove a name :func:`register` added (no-op when absent; refuses names it did not add)."""
    if name not in registered_names():
        if name in AttentionInterface._global_mapping:
            raise ValueError(f"{name!r} was not registered by longnet")
        return
    del AttentionInterface._global_mapping[name]
    del AttentionMaskInterface._global_mapping[name]

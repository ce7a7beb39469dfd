"""A bounded KV cache for transformers models with dilated attention: :class:`DilatedCache`.

A causal query of dilated attention reads only keys of its own segment, and per head only those at
its residue, so each layer needs at most ``sum_i ceil(w_i / r_i)`` cached keys per query head: the
cache stops growing once the largest segment is full, whatever the context length. Each layer of a
:class:`DilatedCache` holds a :class:`longnet.models.cache.SlotLayerCache` (the cache
``LongNetLM.generate`` uses: fixed slots written in place, one softmax over all branches), which
stores per key/value head: with grouped-query attention (``G`` query heads per key/value head) a
key/value head keeps, per branch, the union of its group's residues once
(:mod:`longnet.ops.kv_slots`), at most ``min(w_i, G * ceil(w_i / r_i))`` slots, where copies per
query head would take ``G * ceil(w_i / r_i)`` (``G`` copies of the ``r = 1`` branch).

How it meets transformers: a model calls ``cache.update(key, value, layer_idx)`` and hands what it
returns to the attention function. :meth:`DilatedLayer.update` returns the *new* keys and values,
tagged with the layer; :func:`longnet.integrations.transformers.dilated_attention_forward` sees the
tag and lets the layer attend (write the keys that later queries can read, then attend over the
slots). So a :class:`DilatedCache` only works together with ``attn_implementation="dilated"``,
which :meth:`DilatedCache.update` checks; a layer whose update was not attended (a model that
changes the keys between the two calls) raises at the next update instead of decoding wrongly.

Positions count from each row's first real token (left padding), taken from the 2-D attention
mask exactly as the dense-cache path of the integration does, so both give the same outputs.
Beam search (``reorder_cache``), sampling, left-padded batches and chunked prefill
(``prefill_chunk_size``) work; what cannot work raises ``ValueError``: rolling back
(``crop``: assisted / speculative decoding), sliding-window or chunked layers, non-causal
attention, encoder-decoder models, attention dropout with a cache.
"""

from __future__ import annotations

import inspect

import torch
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.configuration_utils import PretrainedConfig

from longnet.integrations.hf_pattern import is_dilated_implementation, pattern_from_config
from longnet.models.cache import SlotLayerCache
from longnet.ops.kv_slots import KVSlotLayout, kv_slot_layout
from longnet.ops.pattern import DilatedPattern

__all__ = ["DilatedCache", "DilatedLayer", "bound_bytes", "cache_argument", "layer_of"]

_TAG = "_longnet_dilated_layer"


def cache_argument(model) -> str:
    """Name under which ``model.forward`` takes its cache: ``"cache"`` (transformers >= 5.2x, where
    ``past_key_values`` is deprecated) or ``"past_key_values"`` (earlier releases)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def layer_of(key: torch.Tensor) -> DilatedLayer | None:
    """The :class:`DilatedLayer` whose ``update`` returned ``key``, or ``None``."""
    return getattr(key, _TAG, None)


def _leading_padding(mask: torch.Tensor) -> torch.Tensor:
    """(B, n) bool -> (B,) long: number of padding keys before each row's first real one."""
    first = mask.to(torch.int8).argmax(-1)
    return torch.where(mask.any(-1), first, torch.zeros_like(first))


class DilatedLayer(CacheLayerMixin):
    """One attention layer of a :class:`DilatedCache` (see the module docstring).

    Args:
        pattern: the layer's dilated pattern.
        num_heads: query heads (the key/value heads come with the first keys; the cache stores
            per key/value head the union of its query heads' residues).
        layer_idx: the layer's index (for messages).
    """

    is_compileable = False
    is_croppable = False
    is_sliding = False

    def __init__(self, pattern: DilatedPattern, num_heads: int, layer_idx: int = 0):
        super().__init__()
        self.pattern, self.num_heads, self.layer_idx = pattern, num_heads, layer_idx
        self.slots: SlotLayerCache | None = None
        self.seen = 0  # key columns so far (padding included): the mask width
        self.start = 0  # columns before this one are never read (see DilatedCache.start_at)
        self.offsets: torch.Tensor | None = None  # (B,) index of each row's first real token, -1: none
        self.pending = False  # update returned keys that no attention consumed yet

    def __repr__(self) -> str:
        return f"DilatedLayer(seen={self.seen}, nbytes={self.nbytes})"

    # ------------------------------------------------------------------ transformers' interface
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.batch_size, self.kv_heads, _, self.head_dim = key_states.shape
        self.dtype, self.device = key_states.dtype, key_states.device
        if self.num_heads % self.kv_heads:
            raise ValueError(f"query heads ({self.num_heads}) must be a multiple of key/value heads "
                             f"({self.kv_heads})")
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Record ``n`` new tokens; returns their keys/values tagged for the attention function."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        B, Hkv, n, D = key_states.shape
        if (B, Hkv, D) != (self.batch_size, self.kv_heads, self.head_dim):
            raise ValueError(f"layer {self.layer_idx}: keys of shape {tuple(key_states.shape)} do not "
                             f"fit a cache holding batch {self.batch_size}, {self.kv_heads} key/value "
                             f"heads, head dim {self.head_dim}")
        if self.pending:
            raise RuntimeError(
                f"DilatedCache layer {self.layer_idx}: the keys of the previous update were never "
                "attended by dilated attention (the model does not hand cache.update's result to its "
                "attention function unchanged), so the cache would be wrong; use a DynamicCache")
        self.pending = True
        self.seen += n
        key, value = key_states.view(key_states.shape), value_states.view(value_states.shape)
        setattr(key, _TAG, self)
        setattr(value, _TAG, self)
        return key, value

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.slots, self.seen, self.start, self.offsets, self.pending = None, 0, 0, None, False
        self.is_initialized = False

    def offload(self):
        raise ValueError("DilatedCache does not offload (it is bounded already)")

    prefetch = offload

    def crop(self, tokens_to_remove: int) -> None:
        raise ValueError(
            "DilatedCache cannot roll back tokens (crop): it keeps only what future queries read "
            "and drops the rest, so assisted / speculative decoding (which discards rejected draft "
            "tokens) cannot use it; use a DynamicCache there")

    def _select(self, fn) -> None:
        """Apply a batch selection ``fn`` (a tensor -> its selected rows) to every per-row state."""
        s = self.slots
        if s is not None:
            s.keys, s.values, s.positions = fn(s.keys), fn(s.values), fn(s.positions)
            s.B = s.keys.shape[0]
        if self.offsets is not None:
            self.offsets = fn(self.offsets)
        if self.is_initialized:
            self.batch_size = fn(torch.arange(self.batch_size)).shape[0]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: row ``i`` becomes old row ``beam_idx[i]``."""
        self._select(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._select(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select(lambda t: t[indices])

    # -------------------------------------------------------------------------------- attention
    @property
    def nbytes(self) -> int:
        """Bytes held (slot keys, values, positions): the pattern's bound once tokens arrived."""
        return 0 if self.slots is None else self.slots.nbytes

    def allocate(self) -> None:
        """Make the layer's slots at their bound (the first :meth:`attend` does it), on the device
        and in the dtype of the first keys (``lazy_initialization``; a ``"meta"`` device counts
        bytes without holding them)."""
        if not self.is_initialized:
            raise ValueError(f"DilatedCache layer {self.layer_idx}: allocate needs the first keys "
                             "(lazy_initialization) for its batch, heads and dtype")
        self.slots = SlotLayerCache(self.pattern, self.batch_size, self.num_heads, self.head_dim,
                                    num_kv_heads=self.kv_heads, dtype=self.dtype, device=self.device)

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None, *, scale: float | None, causal: bool,
               dropout: float) -> torch.Tensor:
        """Causal dilated attention of the new queries over the cache; updates it.

        Args:
            query: (B, H, q, D); key, value: (B, Hkv, q, D), what :meth:`update` returned.
            attention_mask: ``None`` or the (B, seen) bool padding mask of the mask function.
        Returns:
            (B, H, q, D).
        """
        if layer_of(key) is not self or layer_of(value) is not self:
            raise ValueError(f"DilatedCache layer {self.layer_idx}: key and value must be what its "
                             "update returned")
        self.pending = False
        if not causal:
            raise ValueError("DilatedCache needs causal attention (a non-causal query reads later "
                             "keys, which no cache holds); use the model without a cache")
        if dropout > 0.0:
            raise ValueError(f"DilatedCache does not apply attention dropout (got {dropout}); call "
                             "model.eval() to generate, or train without a cache (use_cache=False)")
        B, H, q, D = query.shape
        if H != self.num_heads:
            raise ValueError(f"{H} query heads but the cache was made for {self.num_heads} "
                             "(config.num_attention_heads)")
        device = query.device
        past = self.seen - q
        if attention_mask is None:
            offsets = torch.zeros(B, dtype=torch.long, device=device)
            valid = None
        else:
            if attention_mask.shape != (B, self.seen):
                raise ValueError(f"attention_mask covers {tuple(attention_mask.shape)} but the cache "
                                 f"holds {self.seen} positions of {B} rows")
            offsets = _leading_padding(attention_mask)
            valid = attention_mask[:, past:]
        if self.start and bool(offsets.any()):
            raise ValueError("DilatedCache.start_at needs prompts without left padding")
        real = attention_mask.any(-1) if attention_mask is not None else torch.ones_like(offsets, dtype=torch.bool)
        first = torch.where(real, offsets, torch.full_like(offsets, -1))  # -1: no real token yet
        if self.offsets is not None:  # rows that had real tokens must keep their first one
            had = self.offsets >= 0
            if bool((had & (first != self.offsets)).any()):
                raise ValueError("attention_mask changed which earlier tokens are padding; the cache "
                                 "already holds them: pass the same mask prefix at every step")
        self.offsets = first
        positions = past + torch.arange(q, device=device).unsqueeze(0) - offsets.unsqueeze(1)
        if self.slots is None:
            self.allocate()
        return self.slots.attend(query, key, value, positions, valid, scale=scale)


class DilatedCache(Cache):
    """Bounded KV cache for a transformers causal LM with ``attn_implementation="dilated"``.

    Each layer keeps, per key/value head, the keys and values its query heads can still read:
    for each branch the union of the group's residues, each position once (:attr:`slots_per_kv_head`
    slots, at most ``sum_i min(w_i, G * ceil(w_i / r_i))``; ``sum_i ceil(w_i / r_i)`` without GQA).
    That bound is reached from the first token on (slots are preallocated), whatever the context
    length; :attr:`nbytes` reports the bytes held and :func:`bound_bytes` computes them from the
    config. Use it in place of transformers' dense cache::

        cache = DilatedCache(model.config)
        out = model.generate(ids, attention_mask=mask, max_new_tokens=100, cache=cache)
        cache.nbytes

    (``past_key_values=cache`` also works: transformers 5.x deprecates that name.)

    Args:
        config: the model's config (``model.config``, or any transformers ``PretrainedConfig``
            with ``segment_lengths`` / ``dilation_rates``); decoder-only, causal, no sliding-window
            or chunked layers.
    Raises:
        ValueError: for configs it cannot serve (naming the field).
    """

    def __init__(self, config: PretrainedConfig) -> None:
        if getattr(config, "is_encoder_decoder", False):
            raise ValueError("DilatedCache serves decoder-only models (config.is_encoder_decoder is True)")
        if hasattr(config, "get_text_config"):
            config = config.get_text_config(decoder=True)
        pattern = pattern_from_config(config)
        for field in ("sliding_window", "attention_chunk_size"):
            if getattr(config, field, None) is not None:
                raise ValueError(f"DilatedCache cannot serve a model with config.{field}="
                                 f"{getattr(config, field)!r}: dilated attention applies its own "
                                 f"pattern; set config.{field} = None")
        types = getattr(config, "layer_types", None)
        if types is not None and any(t != "full_attention" for t in types):
            raise ValueError(f"DilatedCache needs every layer to be 'full_attention' (config.layer_types"
                             f" has {sorted(set(types) - {'full_attention'})})")
        if not getattr(config, "is_causal", True):
            raise ValueError("DilatedCache needs a causal model (config.is_causal is False)")
        heads = config.num_attention_heads
        layers = [DilatedLayer(pattern, heads, i) for i in range(config.num_hidden_layers)]
        super().__init__(layers=layers)
        self.config = config
        self.pattern = pattern

    def __repr__(self) -> str:
        return (f"DilatedCache(layers={len(self.layers)}, seen={self.get_seq_length()}, "
                f"nbytes={self.nbytes})")

    @property
    def nbytes(self) -> int:
        """Bytes held now, all layers (keys, values and their positions)."""
        return sum(layer.nbytes for layer in self.layers)

    @property
    def slots_per_kv_head(self) -> int:
        """Keys (and values) each layer keeps per key/value head (:mod:`longnet.ops.kv_slots`)."""
        return _layout(self.config).total

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        impl = getattr(self.config, "_attn_implementation", None)
        if not is_dilated_implementation(impl):
            raise ValueError(f"DilatedCache works only with dilated attention, but the model's "
                             f"attention is {impl!r}: call longnet.hf.register() and "
                             "model.set_attn_implementation('dilated') (and make the cache from "
                             "model.config), or use a DynamicCache")
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove == 0:  # transformers' no-op rollback check
            return
        self.layers[0].crop(tokens_to_remove)

    def activate_past_recording(self, *args, **kwargs):
        # transformers 5.25 passes recurrent_states_to_keep=; whatever it passes, the answer is no
        self.layers[0].crop(-1)  # raises: a cache that drops keys cannot record its past

    def first_needed(self, length: int) -> int:
        """First position that continuing a ``length``-token prompt reads (for :meth:`start_at`).

        When every segment length divides the largest one ``W``, the hidden state of position
        ``p`` depends only on the tokens of ``[W * (p // W), p]`` at every layer (each branch reads
        inside its own segment). So the last prompt token and all later ones depend on nothing
        before ``W * ((length - 1) // W)``. Returns 0 when the pattern does not nest.
        """
        W = max(self.pattern.segment_lengths)
        if length < 1 or any(W % w for w in self.pattern.segment_lengths):
            return 0
        return W * ((length - 1) // W)

    def start_at(self, position: int) -> None:
        """Declare that ``position`` tokens come before the next ones, without feeding them.

        Exact when no later query reads them: ``position`` must be a multiple of the largest
        segment ``W`` and every segment length must divide ``W`` (:meth:`first_needed`). The
        model then takes positions (RoPE) from ``cache.get_seq_length()`` as usual, so::

            start = cache.first_needed(ids.shape[1]); cache.start_at(start)
            model(ids[:, start:], cache=cache)   # same logits as the whole prompt, cost <= W

        Only on an empty cache, for prompts without padding.
        """
        if isinstance(position, bool) or not isinstance(position, int) or position < 0:
            raise ValueError(f"position must be a non-negative int, got {position!r}")
        if self.get_seq_length():
            raise ValueError("start_at needs an empty cache")
        W = max(self.pattern.segment_lengths)
        if any(W % w for w in self.pattern.segment_lengths) or position % W:
            raise ValueError(f"start_at({position}) is exact only at multiples of the largest segment "
                             f"({W}) of a pattern whose segment lengths divide it "
                             f"({list(self.pattern.segment_lengths)}); see first_needed()")
        for layer in self.layers:
            layer.seen = layer.start = position


def _layout(config) -> KVSlotLayout:
    """The slot layout of ``config``'s layers (the pattern, query and key/value heads)."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return kv_slot_layout(pattern_from_config(config), heads, kv_heads)


def bound_bytes(config, batch_size: int, dtype: torch.dtype) -> int:
    """Bytes a :class:`DilatedCache` holds for ``config`` once tokens arrived (its constant size):
    keys, values (``dtype``) and int64 positions of :attr:`DilatedCache.slots_per_kv_head` slots
    per key/value head, row and layer."""
    if hasattr(config, "get_text_config"):
        config = config.get_text_config(decoder=True)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return config.num_hidden_layers * _layout(config).nbytes(batch_size, head_dim, dtype)

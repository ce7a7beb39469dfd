"""Multi-head dilated attention: projections, positions on q/k, dilated (or dense) attention.

The forward is split into small methods so that a generation cache can hook in between them:
:meth:`MultiheadDilatedAttention.project` (x -> q, k, v), :meth:`~MultiheadDilatedAttention.
apply_positions` (positions with an offset), :meth:`~MultiheadDilatedAttention.attend` (the
attention call) and :meth:`~MultiheadDilatedAttention.output` (sub-LN and output projection).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from longnet.interop.torchscale import torchscale_dilated_attention
from longnet.nn.positions import build_positions
from longnet.ops.dilated import dilated_attention
from longnet.ops.pattern import DilatedPattern

__all__ = ["MultiheadDilatedAttention"]


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be positive, got {value}")
    return value


class MultiheadDilatedAttention(nn.Module):
    """Multi-head attention whose core is dilated attention (LongNet), batch first.

    Args:
        embed_dim: model width E.
        num_heads: query heads H; ``E % H == 0``, head dim ``D = E / H``.
        segment_lengths, dilation_rates: the dilated pattern's branches (or ``segment_lengths``
            a :class:`~longnet.DilatedPattern`). Ignored when ``dense``.
        num_kv_heads: key/value heads (grouped-query attention), a divisor of ``num_heads``;
            default ``num_heads``.
        bias: biases on the four projections.
        dropout: attention dropout (training mode only).
        is_causal: default causality of :meth:`forward`.
        position: ``"xpos"`` (the paper's), ``"rope"`` or ``"none"``; applied to q and k only.
        rope_theta, xpos_scale_base: position hyper-parameters.
        xpos_block: XPos reference block (see :mod:`longnet.nn.positions`); default: the largest
            segment length when every segment length divides it, else ``None``.
        sub_ln: MAGNETO's sub-LayerNorm on the attention output, before the output projection.
        norm_eps: epsilon of that LayerNorm.
        dense: use dense attention (``F.scaled_dot_product_attention``) instead of the pattern.
        backend: kernel family passed to :func:`longnet.dilated_attention`.
        semantics: ``"paper"``, or ``"torchscale"`` for torchscale's rule
            (:func:`longnet.interop.torchscale_dilated_attention`).
        device, dtype: factory arguments for the parameters.

    Shapes: ``forward(x (B, N, E)) -> (B, N, E)``.
    """

    def __init__(self, embed_dim: int, num_heads: int, *, segment_lengths=None,
                 dilation_rates=None, num_kv_heads: int | None = None, bias: bool = True,
                 dropout: float = 0.0, is_causal: bool = False, position: str = "xpos",
                 rope_theta: float = 10000.0, xpos_scale_base: float = 512.0,
                 xpos_block: int | None = None, sub_ln: bool = True, norm_eps: float = 1e-5,
                 dense: bool = False, backend: str = "auto", semantics: str = "paper",
                 device=None, dtype=None):
        super().__init__()
        embed_dim = _positive_int("embed_dim", embed_dim)
        num_heads = _positive_int("num_heads", num_heads)
        num_kv_heads = num_heads if num_kv_heads is None else _positive_int(
            "num_kv_heads", num_kv_heads)
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads "
                             f"({num_kv_heads})")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.embed_dim, self.num_heads, self.num_kv_heads = embed_dim, num_heads, num_kv_heads
        self.head_dim = embed_dim // num_heads
        self.dropout = float(dropout)
        self.is_causal = bool(is_causal)
        self.dense = bool(dense)
        self.backend = backend
        if semantics not in ("paper", "torchscale") or (semantics == "torchscale" and dense):
            raise ValueError(f"semantics must be 'paper' or (not dense) 'torchscale', got {semantics!r}")
        self.semantics = semantics
        if self.dense:
            self.pattern = None
        else:
            if segment_lengths is None:
                raise ValueError("segment_lengths is required unless dense=True")
            self.pattern = DilatedPattern.coerce(segment_lengths, dilation_rates)
            if xpos_block is None:
                xpos_block = default_xpos_block(self.pattern.segment_lengths)
        fk = {"device": device, "dtype": dtype}
        kv_dim = num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **fk)
        self.k_proj = nn.Linear(embed_dim, kv_dim, bias=bias, **fk)
        self.v_proj = nn.Linear(embed_dim, kv_dim, bias=bias, **fk)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **fk)
        self.sub_ln = nn.LayerNorm(embed_dim, eps=norm_eps, **fk) if sub_ln else None
        self.positions = build_positions(position, self.head_dim, theta=rope_theta,
                                         xpos_scale_base=xpos_scale_base, xpos_block=xpos_block)
        self.position = position
        # set from outside by longnet.parallel.parallelize_sequence (plain attributes, so a
        # compiled forward reads them without a graph break)
        self.attention_fn = None  # None: longnet.dilated_attention
        self.sequence_rank = 0  # this module's chunk of the sequence under sequence parallelism

    # ------------------------------------------------------------------------------- pieces
    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, N, E) -> q (B, H, N, D), k and v (B, Hkv, N, D)."""
        B, N, _ = x.shape
        q = self.q_proj(x).view(B, N, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, N, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, N, self.num_kv_heads, self.head_dim).transpose(1, 2)
        return q, k, v

    def apply_positions(self, q: torch.Tensor, k: torch.Tensor, position_offset: int = 0, *,
                        positions: torch.Tensor | None = None, block_origin: int | None = None):
        """Positions ``position_offset + arange(N)`` (or explicit ``positions``, (N,) or (B, N))
        applied to q and k (B, *, N, D); see :meth:`RotaryPositions.rotate`."""
        return self.positions(q, k, position_offset, positions=positions,
                              block_origin=block_origin)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, is_causal: bool,
               key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Attention over (B, H, N, D) q and (B, Hkv, N, D) k, v -> (B, H, N, D)."""
        gqa = self.num_kv_heads < self.num_heads
        p = self.dropout if self.training else 0.0
        if self.semantics == "torchscale":
            if self.attention_fn is not None:
                raise ValueError("torchscale semantics cannot run sequence-parallel")
            return torchscale_dilated_attention(q, k, v, segment_lengths=self.pattern, is_causal=is_causal,
                                                key_padding_mask=key_padding_mask, dropout_p=p,
                                                enable_gqa=gqa, backend=self.backend)
        if not self.dense:  # after longnet.parallel.parallelize_sequence: the distributed operator
            fn = dilated_attention if self.attention_fn is None else self.attention_fn
            return fn(q, k, v, segment_lengths=self.pattern, is_causal=is_causal,
                      key_padding_mask=key_padding_mask, dropout_p=p, enable_gqa=gqa,
                      backend=self.backend)
        if key_padding_mask is None:
            return F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=is_causal,
                                                  enable_gqa=gqa)
        N = q.shape[2]
        allowed = key_padding_mask[:, None, None, :]  # (B, 1, 1, N)
        if is_causal:
            allowed = allowed & torch.ones(N, N, dtype=torch.bool, device=q.device).tril()
        # a row with no key (a padded query before any real token) reads itself: finite output
        eye = torch.eye(N, dtype=torch.bool, device=q.device)
        allowed = allowed | (eye & ~allowed.any(-1, keepdim=True))  # (B, 1, N, N)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=p,
                                              enable_gqa=gqa)

    def output(self, attn: torch.Tensor) -> torch.Tensor:
        """(B, H, N, D) -> (B, N, E): merge heads, sub-LN, output projection."""
        B, H, N, D = attn.shape
        y = attn.transpose(1, 2).reshape(B, N, H * D)
        if self.sub_ln is not None:
            y = self.sub_ln(y)
        return self.out_proj(y)

    # ------------------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, *, key_padding_mask: torch.Tensor | None = None,
                is_causal: bool | None = None, position_offset: int = 0, cache=None,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        """Self-attention over x (B, N, E).

        Args:
            key_padding_mask: (B, N) bool, True = real token; padded keys are never read.
            is_causal: override the module's default.
            position_offset: absolute position of ``x[:, 0]`` (continuing a sequence).
            cache: a layer cache (``attend(q, k, v, positions, valid)``, see
                :mod:`longnet.models.cache`): x holds new tokens that continue the sequences in
                the cache, attention reads the cache and updates it (causal).
            positions: with ``cache``, (B, N) each new token's position in its own sequence
                (padding columns may hold anything; ``key_padding_mask`` marks them).
        """
        if x.dim() != 3 or x.shape[-1] != self.embed_dim:
            raise ValueError(f"x must be (batch, length, {self.embed_dim}), got {tuple(x.shape)}")
        q, k, v = self.project(x)
        if cache is not None:
            if positions is None:
                raise ValueError("positions (B, N) are required with a cache")
            valid = key_padding_mask
            if valid is None:
                valid = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
            # per-sequence absolute positions (segments and XPos blocks start at position 0, as
            # in a forward over the whole sequence); padding columns get 0 (never read)
            q, k = self.apply_positions(q, k, positions=positions.clamp(min=0))
            return self.output(cache.attend(q, k, v, positions, valid))
        causal = self.is_causal if is_causal is None else bool(is_causal)
        # under sequence parallelism this module's tokens start at rank * N of the full sequence;
        # XPos blocks stay anchored at the sequence start, like the operator's segments
        sp_offset = self.sequence_rank * x.shape[1]
        q, k = self.apply_positions(q, k, position_offset + sp_offset,
                                    block_origin=position_offset if sp_offset else None)
        attn = self.attend(q, k, v, is_causal=causal, key_padding_mask=key_padding_mask)
        return self.output(attn)

    def extra_repr(self) -> str:
        core = "dense" if self.dense else repr(self.pattern)
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, "
                f"num_kv_heads={self.num_kv_heads}, {core}, position={self.position!r}, "
                f"is_causal={self.is_causal}")


def default_xpos_block(segment_lengths) -> int | None:
    """The largest segment length when every segment length divides it, else ``None``."""
    top = max(segment_lengths)
    return top if all(top % w == 0 for w in segment_lengths) else None

"""The LongNet block (MAGNETO: pre-LN + sub-LN) and its initialisation.

Block, as MAGNETO (Wang et al., 2022, "Foundation Transformers")::

    x = x + drop(out_proj(subLN(attn(q_proj(LN(x)), k_proj(LN(x)), v_proj(LN(x))))))
    x = x + drop(fc2(subLN(act(fc1(LN(x))))))

Initialisation (:func:`magneto_init_`): every linear weight Xavier-uniform (q/k/v with gain
``1/sqrt(2)``, as fairseq), biases 0, LayerNorms (1, 0); then ``fc1``, ``fc2``, ``v_proj`` and
``out_proj`` weights are multiplied by ``gamma = sqrt(log(2 * num_layers))`` (MAGNETO's scale for
encoder-only and decoder-only models). Embeddings ~ N(0, embed_dim^-1/2).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from longnet.models.config import LongNetConfig
from longnet.nn.multihead import MultiheadDilatedAttention

__all__ = ["FeedForward", "LongNetBlock", "magneto_init_"]


class FeedForward(nn.Module):
    """``fc2(subLN(act(fc1(x))))``, (B, N, E) -> (B, N, E)."""

    def __init__(self, embed_dim: int, ffn_dim: int, *, activation: str = "gelu",
                 bias: bool = True, sub_ln: bool = True, norm_eps: float = 1e-5,
                 dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(embed_dim, ffn_dim, bias=bias)
        self.fc2 = nn.Linear(ffn_dim, embed_dim, bias=bias)
        self.sub_ln = nn.LayerNorm(ffn_dim, eps=norm_eps) if sub_ln else None
        self.activation = activation
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)  # (B, N, F)
        h = F.gelu(h) if self.activation == "gelu" else F.relu(h)
        h = F.dropout(h, self.dropout, self.training)
        if self.sub_ln is not None:
            h = self.sub_ln(h)
        return self.fc2(h)


class LongNetBlock(nn.Module):
    """One pre-LN block: dilated self-attention and feed-forward, each with a residual."""

    def __init__(self, config: LongNetConfig, *, is_causal: bool, layer: int = 0):
        super().__init__()
        c = config
        pattern = c.pattern(layer)
        self.attn_norm = nn.LayerNorm(c.embed_dim, eps=c.norm_eps)
        self.attn = MultiheadDilatedAttention(
            c.embed_dim, c.num_heads, segment_lengths=pattern, num_kv_heads=c.num_kv_heads,
            bias=c.bias, dropout=c.attention_dropout, is_causal=is_causal, position=c.position,
            rope_theta=c.rope_theta, xpos_scale_base=c.xpos_scale_base, sub_ln=c.sub_ln,
            norm_eps=c.norm_eps, dense=pattern is None, backend=c.backend)
        self.ffn_norm = nn.LayerNorm(c.embed_dim, eps=c.norm_eps)
        self.ffn = FeedForward(c.embed_dim, c.ffn_dim, activation=c.activation, bias=c.bias,
                               sub_ln=c.sub_ln, norm_eps=c.norm_eps, dropout=c.dropout)
        self.dropout = c.dropout

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None,
                position_offset: int = 0, *, cache=None,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, N, E) -> (B, N, E); with a layer ``cache`` (and per-row ``positions``) x holds new
        tokens continuing the cached sequences (see :meth:`MultiheadDilatedAttention.forward`)."""
        a = self.attn(self.attn_norm(x), key_padding_mask=key_padding_mask,
                      position_offset=position_offset, cache=cache, positions=positions)
        x = x + F.dropout(a, self.dropout, self.training)
        f = self.ffn(self.ffn_norm(x))
        return x + F.dropout(f, self.dropout, self.training)


@torch.no_grad()
def magneto_init_(module: nn.Module, gamma: float) -> None:
    """MAGNETO initialisation of every block under ``module`` (see module docstring)."""
    for sub in module.modules():
        if isinstance(sub, MultiheadDilatedAttention):
            for lin, gain in ((sub.q_proj, 2 ** -0.5), (sub.k_proj, 2 ** -0.5),
                              (sub.v_proj, 2 ** -0.5), (sub.out_proj, 1.0)):
                nn.init.xavier_uniform_(lin.weight, gain=gain)
            sub.v_proj.weight.mul_(gamma)
            sub.out_proj.weight.mul_(gamma)
        elif isinstance(sub, FeedForward):
            for lin in (sub.fc1, sub.fc2):
                nn.init.xavier_uniform_(lin.weight)
                lin.weight.mul_(gamma)
        elif isinstance(sub, nn.LayerNorm):
            if sub.weight is not None:
                nn.init.ones_(sub.weight)
            if sub.bias is not None:
                nn.init.zeros_(sub.bias)
        elif isinstance(sub, nn.Embedding):
            nn.init.normal_(sub.weight, std=sub.embedding_dim ** -0.5)
        if isinstance(sub, nn.Linear) and sub.bias is not None:
            nn.init.zeros_(sub.bias)


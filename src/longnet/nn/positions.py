"""Relative positions applied to queries and keys: RoPE and XPos (never added to embeddings).

Both rotate each pair of channels ``(i, i + D/2)`` (the "rotate-half" layout) by the angle
``p * theta^(-2i/D)`` at position ``p``, so a query at ``m`` and a key at ``n`` score
``q . R(n - m) k``: only the distance matters.

XPos (Sun et al., 2022, the position scheme of LongNet) also scales channel pair ``i`` of the query
by ``zeta_i^(p/s)`` and of the key by ``zeta_i^(-p/s)``, with
``zeta_i = (2i/D + gamma) / (1 + gamma)`` (``gamma = 0.4``, scale base ``s = 512``), so the score
carries ``zeta_i^((m - n)/s)``: a decay with distance for causal attention (``m >= n``).

The exponent grows with the absolute position and overflows float32 near position 35K. Only
``m - n`` matters, so any reference point ``c`` common to query and key may be subtracted. With
``block`` set (the models use the largest segment length when every segment length divides it),
``c`` is the centre of the ``block``-long block holding the position (blocks counted from the
first position of the chunk, like the operator's segments): a query and a key in the same segment
of any branch are in the same block, so scores are unchanged and the exponent stays within
``block / 2``. Positions that would still overflow the dtype raise ``ValueError``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["RotaryPositions", "XPosPositions", "NoPositions", "build_positions", "rotate_half"]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``[x1, x2] -> [-x2, x1]`` over the last dim (halves)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class NoPositions(nn.Module):
    """No positional information: queries and keys pass through unchanged."""

    def rotate(self, x: torch.Tensor, position_offset: int = 0, *, is_query: bool,
               positions: torch.Tensor | None = None,
               block_origin: int | None = None) -> torch.Tensor:
        return x

    def forward(self, query: torch.Tensor, key: torch.Tensor, position_offset: int = 0, *,
                positions: torch.Tensor | None = None, block_origin: int | None = None):
        return query, key


class RotaryPositions(nn.Module):
    """Rotary position embedding (RoPE) applied to (B, H, N, D) queries and keys.

    Args:
        head_dim: D, even.
        theta: base of the frequencies ``theta^(-2i/D)``.
    """

    def __init__(self, head_dim: int, theta: float = 10000.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary positions, got {head_dim}")
        if not theta > 1.0:
            raise ValueError(f"theta must be > 1, got {theta}")
        self.head_dim = int(head_dim)
        self.theta = float(theta)

    def _angles(self, pos: torch.Tensor) -> torch.Tensor:
        """(..., N) float64 positions -> (..., N, D) float64 angles (rotate-half layout)."""
        i = torch.arange(0, self.head_dim, 2, device=pos.device, dtype=torch.float64)
        inv_freq = self.theta ** (-i / self.head_dim)  # (D/2,)
        ang = pos[..., None] * inv_freq  # (..., N, D/2)
        return torch.cat((ang, ang), dim=-1)

    def _scale(self, pos: torch.Tensor, origin: int, span: tuple[int, int] | None,
               dtype: torch.dtype) -> torch.Tensor | None:
        """Per-position query scale (..., N, D) (keys use its inverse); ``None``: no scale."""
        return None

    def rotate(self, x: torch.Tensor, position_offset: int = 0, *, is_query: bool,
               positions: torch.Tensor | None = None,
               block_origin: int | None = None) -> torch.Tensor:
        """Apply positions to ``x`` (B, H, N, D).

        Args:
            position_offset: positions are ``position_offset + arange(N)``.
            is_query: queries and keys differ for XPos (inverse scales).
            positions: instead, explicit integer positions, (N,) or per sequence (B, N)
                (a cache decoding sequences of different lengths).
            block_origin: XPos only, where the grid of reference blocks starts. Default:
                ``position_offset`` (the operator's segments start at the chunk's first
                position), or 0 with explicit ``positions`` (absolute segments, as a cache).
        """
        if x.dim() != 4 or x.shape[-1] != self.head_dim:
            raise ValueError(f"x must be (batch, heads, length, {self.head_dim}), "
                             f"got {tuple(x.shape)}")
        N = x.shape[-2]
        if positions is None:
            if isinstance(position_offset, bool) or int(position_offset) != position_offset \
                    or position_offset < 0:
                raise ValueError(f"position_offset must be a non-negative int, "
                                 f"got {position_offset}")
            offset = int(position_offset)
            origin = offset if block_origin is None else int(block_origin)
            pos = torch.arange(offset, offset + N, device=x.device, dtype=torch.float64)
            span = (offset - origin, offset - origin + N - 1)  # relative to the block grid
        else:
            if not isinstance(positions, torch.Tensor) or positions.is_floating_point() or \
                    positions.dtype == torch.bool or positions.shape not in ((N,), (x.shape[0], N)):
                raise ValueError(f"positions must be an integer tensor of shape ({N},) or "
                                 f"({x.shape[0]}, {N}), got {positions!r:.80}")
            origin = 0 if block_origin is None else int(block_origin)
            pos = positions.to(device=x.device, dtype=torch.float64)
            span = None
        ang = self._angles(pos)  # (N, D) or (B, N, D)
        cos, sin = ang.cos(), ang.sin()
        scale = self._scale(pos, origin, span, x.dtype)
        if scale is not None:
            scale = scale if is_query else 1.0 / scale
            cos, sin = cos * scale, sin * scale
        if pos.dim() == 2:  # per sequence: broadcast over heads
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, N, D)
        work = torch.float64 if x.dtype == torch.float64 else torch.float32
        xf = x.to(work)
        out = xf * cos.to(work) + rotate_half(xf) * sin.to(work)
        return out.to(x.dtype)

    def forward(self, query: torch.Tensor, key: torch.Tensor, position_offset: int = 0, *,
                positions: torch.Tensor | None = None, block_origin: int | None = None):
        """``(query, key)`` (B, H, N, D) and (B, Hkv, N, D) with positions applied."""
        return (self.rotate(query, position_offset, is_query=True, positions=positions,
                            block_origin=block_origin),
                self.rotate(key, position_offset, is_query=False, positions=positions,
                            block_origin=block_origin))

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, theta={self.theta}"


class XPosPositions(RotaryPositions):
    """XPos: RoPE plus a per-channel exponential decay with distance (see module docstring).

    Args:
        head_dim: D, even.
        theta: RoPE base.
        scale_base: ``s`` in ``zeta^(p / s)``.
        gamma: ``gamma`` in ``zeta_i = (2i/D + gamma) / (1 + gamma)``.
        block: reference block length (see module docstring); ``None`` measures from position 0.
    """

    def __init__(self, head_dim: int, theta: float = 10000.0, scale_base: float = 512.0,
                 gamma: float = 0.4, block: int | None = None):
        super().__init__(head_dim, theta)
        if not scale_base > 0:
            raise ValueError(f"scale_base must be positive, got {scale_base}")
        if not gamma > 0:
            raise ValueError(f"gamma must be positive, got {gamma}")
        if block is not None and (isinstance(block, bool) or int(block) != block or block < 1):
            raise ValueError(f"block must be a positive int or None, got {block}")
        self.scale_base = float(scale_base)
        self.gamma = float(gamma)
        self.block = None if block is None else int(block)

    def _log_zeta(self, device) -> torch.Tensor:
        i = torch.arange(0, self.head_dim, 2, device=device, dtype=torch.float64)
        zeta = (i / self.head_dim + self.gamma) / (1.0 + self.gamma)  # (D/2,)
        return torch.cat((zeta, zeta)).log()  # (D,)

    def relative(self, pos: torch.Tensor, origin: int = 0) -> torch.Tensor:
        """Positions minus their reference point (their block's centre, blocks starting at
        ``origin``; or 0 without blocks)."""
        if self.block is None:
            return pos
        local = pos - origin
        start = torch.div(local, self.block, rounding_mode="floor") * self.block
        return local - start - (self.block // 2)

    def max_exponent(self, first: int, last: int) -> float:
        """Largest ``|log scale|`` over the positions ``first..last`` counted from the block
        origin (plain arithmetic, no tensor is read)."""
        if last < first:
            return 0.0
        if self.block is None:
            far = max(abs(first), abs(last))
        elif first // self.block != last // self.block:
            far = self.block // 2
        else:
            centre = first // self.block * self.block + self.block // 2
            far = max(abs(first - centre), abs(last - centre))
        return far / self.scale_base * -math.log(self.gamma / (1.0 + self.gamma))

    def _scale(self, pos: torch.Tensor, origin: int, span: tuple[int, int] | None,
               dtype: torch.dtype) -> torch.Tensor:
        if span is None:  # explicit positions: read their range (one sync)
            rel = pos - origin
            span = (int(rel.min()), int(rel.max())) if rel.numel() else (0, -1)
        worst = self.max_exponent(*span) if self.block is not None else self.max_exponent(
            span[0] + origin, span[1] + origin)
        limit = math.log(torch.finfo(dtype).max) - 4.0  # keep e^4 headroom for |q|, |k|
        if worst > limit:
            raise ValueError(
                f"XPos scaling reaches e^{worst:.0f} at these positions, beyond what {dtype} "
                f"holds (e^{limit:.0f}); use segment lengths that divide the largest one (so "
                f"positions are measured inside blocks), a larger xpos_scale_base, a wider dtype, "
                f"or position='rope'")
        rel = self.relative(pos, origin)
        return (rel[..., None] / self.scale_base * self._log_zeta(pos.device)).exp()  # (..., N, D)

    def extra_repr(self) -> str:
        return (f"head_dim={self.head_dim}, theta={self.theta}, scale_base={self.scale_base}, "
                f"gamma={self.gamma}, block={self.block}")


def build_positions(kind: str, head_dim: int, *, theta: float = 10000.0,
                    xpos_scale_base: float = 512.0, xpos_block: int | None = None) -> nn.Module:
    """``"xpos"`` -> :class:`XPosPositions`, ``"rope"`` -> :class:`RotaryPositions`,
    ``"none"`` -> :class:`NoPositions`."""
    if kind == "xpos":
        return XPosPositions(head_dim, theta, xpos_scale_base, block=xpos_block)
    if kind == "rope":
        return RotaryPositions(head_dim, theta)
    if kind == "none":
        return NoPositions()
    raise ValueError(f"position must be 'xpos', 'rope' or 'none', got {kind!r}")

"""Prov-GigaPath's 2-D sin-cos tile positions, computed for the given coordinates only.

GigaPath cuts a slide into a ``grid x grid`` lattice of ``tile_size``-pixel cells (1000 x 1000 of
256 px: level-0 images up to 256,000 px a side). A tile at level-0 pixel coordinates ``(x, y)``
sits in cell ``(i, j) = (floor(x / tile_size), floor(y / tile_size))`` and its position vector
(width E) is, in halves of E/2:

- dims ``[0, E/2)``: the 1-D code of ``j`` (the y cell), dims ``[E/2, E)``: the 1-D code of ``i``;
- the 1-D code of ``p`` is ``sin(p * w_k)`` for ``k < E/4`` followed by ``cos(p * w_k)``, with
  ``w_k = 10000^(-k / (E/4))``.

That is row ``i * grid + j + 1`` of GigaPath's ``pos_embed`` table (row 0, the class token's, is
zero). The table is built in float64 and stored in float32, so :class:`SlidePositions` keeps the
float32 values of the 1-D codes (``grid`` rows, 1.5 MB at E = 768) instead of the
``grid^2 + 1``-row table (about 3 GB).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

__all__ = ["SlidePositions", "axis_codes"]


def axis_codes(grid: int, width: int) -> torch.Tensor:
    """(grid, width) float32: the 1-D sin-cos code of every cell index ``0..grid-1``."""
    if width % 2:
        raise ValueError(f"width must be even, got {width}")
    half = width // 2
    omega = 1.0 / 10000.0 ** (torch.arange(half, dtype=torch.float64) / half)  # (width/2,)
    angle = torch.arange(grid, dtype=torch.float64)[:, None] * omega[None, :]  # (grid, width/2)
    return torch.cat((angle.sin(), angle.cos()), dim=1).float()


class SlidePositions(nn.Module):
    """Tile coordinates (B, N, 2) -> GigaPath position vectors (B, N, E).

    Args:
        embed_dim: E, a multiple of 4.
        grid: cells per side (GigaPath: 1000).
        tile_size: cell side in level-0 pixels (GigaPath: 256).
    """

    def __init__(self, embed_dim: int = 768, grid: int = 1000, tile_size: int = 256):
        super().__init__()
        for name, v in (("embed_dim", embed_dim), ("grid", grid), ("tile_size", tile_size)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if embed_dim % 4:
            raise ValueError(f"embed_dim must be a multiple of 4, got {embed_dim}")
        self.embed_dim, self.grid, self.tile_size = embed_dim, grid, tile_size
        self.register_buffer("codes", axis_codes(grid, embed_dim // 2), persistent=False)

    def cells(self, coords: torch.Tensor, key_padding_mask: torch.Tensor | None = None):
        """``(i, j)`` long (B, N): the grid cell of each tile; checks the real tiles' coords."""
        if not isinstance(coords, torch.Tensor) or coords.dim() != 3 or coords.shape[-1] != 2:
            got = tuple(coords.shape) if isinstance(coords, torch.Tensor) else type(coords).__name__
            raise ValueError(f"coords must be a (batch, tiles, 2) tensor of level-0 pixel (x, y), "
                             f"got {got}")
        if coords.dtype == torch.bool or coords.is_complex():
            raise TypeError(f"coords must be a real or integer tensor, got {coords.dtype}")
        c = coords.to(torch.float64)
        if key_padding_mask is not None:
            c = torch.where(key_padding_mask.unsqueeze(-1), c, torch.zeros_like(c))
        if not bool(torch.isfinite(c).all()):
            b, n = (~torch.isfinite(c)).any(-1).nonzero()[0].tolist()
            raise ValueError(f"coords must be finite; slide {b}, tile {n} has {coords[b, n].tolist()}")
        cell = torch.floor(c / self.tile_size).long()  # (B, N, 2)
        bad = (cell < 0) | (cell >= self.grid)
        if bool(bad.any()):
            b, n = bad.any(-1).nonzero()[0].tolist()
            limit = self.grid * self.tile_size
            raise ValueError(
                f"coords must be level-0 pixel coordinates (x, y) in [0, {limit}) (a "
                f"{self.grid} x {self.grid} grid of {self.tile_size}-px cells); slide {b}, tile {n} "
                f"has {coords[b, n].tolist()}")
        self._warn_one_cell(cell, key_padding_mask)
        return cell[..., 0], cell[..., 1]

    def _warn_one_cell(self, cell, key_padding_mask) -> None:
        flat = cell[..., 0] * self.grid + cell[..., 1]  # (B, N)
        for b in range(flat.shape[0]):
            row = flat[b] if key_padding_mask is None else flat[b][key_padding_mask[b]]
            if row.numel() > 1 and bool((row == row[0]).all()):
                warnings.warn(
                    f"all {row.numel()} tiles of slide {b} fall into one {self.tile_size}-px grid "
                    f"cell: GigaPath expects level-0 pixel coordinates, not tile indices or "
                    f"coordinates at another magnification", stacklevel=3)

    def forward(self, coords: torch.Tensor, key_padding_mask: torch.Tensor | None = None
                ) -> torch.Tensor:
        """(B, N, 2) coordinates -> (B, N, E) in the dtype of :attr:`codes` (0 at padding)."""
        i, j = self.cells(coords, key_padding_mask)
        out = torch.cat((self.codes[j], self.codes[i]), dim=-1)  # y code first, then x
        if key_padding_mask is not None:
            out = out * key_padding_mask.unsqueeze(-1).to(out.dtype)
        return out

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, grid={self.grid}, tile_size={self.tile_size}"

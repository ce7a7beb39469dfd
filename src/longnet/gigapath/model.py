"""Prov-GigaPath's slide encoder (``gigapath_slide_enc12l768d``) on longnet's blocks.

The computation, as GigaPath's ``LongNetViT`` (Xu et al., Nature 2024):

1. ``x = patch_embed(features) + positions(coords)``, features (B, N, 1536) from the tile encoder,
   positions from :class:`~longnet.gigapath.positions.SlidePositions`;
2. a learned class token is prepended (its position row is zero);
3. 12 LongNet layers (pre-LN, MAGNETO sub-LN, 16 heads, exact GELU, LayerNorm eps 1e-5) under
   torchscale's dilated attention (``compat="torchscale"``) or the paper's (``compat=None``);
4. the encoder's final LayerNorm, then ``norm`` (LayerNorm eps 1e-6): the slide embedding is
   ``norm(x)[:, 0]`` (the class token), or with ``global_pool`` ``norm(mean of x[:, 1:])``.

``all_layers=True`` gives GigaPath's ``all_layer_embed``: the same head applied to the 13 states
(the input embedding and each layer's output, without the encoder's final LayerNorm).
Per-tile contextual embeddings are ``norm(x)[:, 1:]`` of the same states.
"""

from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from longnet.gigapath.positions import SlidePositions
from longnet.models.config import LongNetConfig
from longnet.models.encoder import LongNetEncoder

__all__ = ["SlideEncoder", "SlideEncoderConfig", "GIGAPATH_SEGMENTS", "GIGAPATH_DILATIONS", "COMPAT"]

# LongNetViT's segment lengths for max_wsi_size 262144 and tile_size 256: 2^linspace(10, 20, 5)
GIGAPATH_SEGMENTS = (1024, 5792, 32768, 185363, 1048576)
GIGAPATH_DILATIONS = (1, 2, 4, 8, 16)
COMPAT = ("torchscale", None)


@dataclass
class SlideEncoderConfig:
    """Shape and semantics of a :class:`SlideEncoder` (defaults: the released model)."""

    in_dim: int = 1536
    """Width of the tile features (the tile encoder's output)."""
    embed_dim: int = 768
    """Model width."""
    depth: int = 12
    """LongNet layers."""
    num_heads: int = 16
    """Attention heads."""
    ffn_dim: int = 3072
    """Feed-forward hidden width."""
    segment_lengths: tuple[int, ...] = GIGAPATH_SEGMENTS
    dilation_rates: tuple[int, ...] = GIGAPATH_DILATIONS
    grid: int = 1000
    """Position grid cells per side."""
    tile_size: int = 256
    """Grid cell side in level-0 pixels."""
    norm_eps: float = 1e-5
    """Epsilon of the layers' LayerNorms and of the encoder's final LayerNorm."""
    head_norm_eps: float = 1e-6
    """Epsilon of the output LayerNorm ``norm``."""
    global_pool: bool = False
    """Default pooling: class token (False) or mean of the tiles (True)."""
    compat: str | None = "torchscale"
    """``"torchscale"``: the released model's attention; ``None``: the paper's rule."""

    def __post_init__(self) -> None:
        self.segment_lengths = tuple(self.segment_lengths)
        self.dilation_rates = tuple(self.dilation_rates)
        for name in ("in_dim", "embed_dim", "depth", "num_heads", "ffn_dim", "grid", "tile_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
                raise ValueError(f"SlideEncoderConfig.{name} must be a positive int, got {v!r}")
        if self.compat not in COMPAT:
            raise ValueError(f"compat must be 'torchscale' or None, got {self.compat!r}")
        if not isinstance(self.global_pool, bool):
            raise ValueError(f"global_pool must be a bool, got {self.global_pool!r}")
        self.longnet_config()  # validates the rest

    def longnet_config(self) -> LongNetConfig:
        """The configuration of the LongNet layers."""
        return LongNetConfig(
            vocab_size=None, embed_dim=self.embed_dim, num_layers=self.depth,
            num_heads=self.num_heads, ffn_dim=self.ffn_dim, segment_lengths=self.segment_lengths,
            dilation_rates=self.dilation_rates, position="none",
            max_train_length=max(self.segment_lengths), norm_eps=self.norm_eps,
            semantics="paper" if self.compat is None else "torchscale")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["segment_lengths"], d["dilation_rates"] = list(self.segment_lengths), list(self.dilation_rates)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SlideEncoderConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown SlideEncoderConfig keys {unknown}")
        return cls(**data)


class SlideEncoder(nn.Module):
    """Prov-GigaPath's slide encoder (see the module docstring); build it with
    :func:`longnet.gigapath.load_slide_encoder` to get the released weights."""

    def __init__(self, config: SlideEncoderConfig | None = None):
        super().__init__()
        self.config = SlideEncoderConfig() if config is None else config
        c = self.config
        self.patch_embed = nn.Linear(c.in_dim, c.embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.embed_dim))
        self.positions = SlidePositions(c.embed_dim, c.grid, c.tile_size)
        self.encoder = LongNetEncoder(c.longnet_config())
        self.norm = nn.LayerNorm(c.embed_dim, eps=c.head_norm_eps)

    # ------------------------------------------------------------------------------- checks
    def _check(self, features, coords, key_padding_mask):
        c = self.config
        if not isinstance(features, torch.Tensor) or features.dim() != 3 or features.shape[-1] != c.in_dim:
            got = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
            raise ValueError(f"features must be a (batch, tiles, {c.in_dim}) tensor, got {got}")
        if not features.is_floating_point():
            raise TypeError(f"features must be floating point, got {features.dtype}")
        B, N = features.shape[:2]
        if N < 1:
            raise ValueError("features has no tiles (a slide needs at least one)")
        if isinstance(coords, torch.Tensor) and tuple(coords.shape[:2]) != (B, N):
            raise ValueError(f"coords must be (batch, tiles, 2) = {(B, N, 2)}, got {tuple(coords.shape)}")
        if key_padding_mask is not None:
            if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool \
                    or tuple(key_padding_mask.shape) != (B, N):
                raise ValueError(f"key_padding_mask must be a bool tensor of shape {(B, N)} "
                                 f"(True = real tile)")
            empty = (~key_padding_mask.any(1)).nonzero().flatten().tolist()
            if empty:
                raise ValueError(f"key_padding_mask: slides {empty} have no real tile")

    # ------------------------------------------------------------------------------ forward
    def embed(self, features: torch.Tensor, coords: torch.Tensor,
              key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The encoder's input (B, 1 + N, E): class token, then tiles with their positions."""
        self._check(features, coords, key_padding_mask)
        if key_padding_mask is not None:  # NaN/inf in padding must not reach the projection
            features = torch.where(key_padding_mask.unsqueeze(-1), features, torch.zeros_like(features))
        x = self.patch_embed(features)  # (B, N, E)
        x = x + self.positions(coords, key_padding_mask).to(x.dtype)
        cls = self.cls_token.to(x.dtype).expand(x.shape[0], -1, -1)
        return torch.cat((cls, x), dim=1)

    def hidden_states(self, features, coords, key_padding_mask=None, *, all_states: bool = True
                      ) -> list[torch.Tensor]:
        """The input embedding and each layer's output, (B, 1 + N, E) each (depth + 1 of them);
        with ``all_states=False`` only the last layer's (a list of one), so that a forward that
        reads only it does not hold depth + 1 copies of the sequence (2 GB at 50,000 tiles)."""
        x = self.embed(features, coords, key_padding_mask)
        mask = None
        if key_padding_mask is not None:
            mask = torch.cat((key_padding_mask.new_ones(x.shape[0], 1), key_padding_mask), dim=1)
            x = torch.where(mask.unsqueeze(-1), x, torch.zeros_like(x))
        states = [x]
        ckpt = self.encoder.config.grad_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.encoder.blocks:
            x = checkpoint(block, x, mask, use_reentrant=False) if ckpt else block(x, mask)
            if all_states:
                states.append(x)
            else:
                states[0] = x
        return states

    def _slide(self, h, mask, global_pool):
        if not global_pool:
            return self.norm(h)[:, 0]
        tiles = h[:, 1:]
        if mask is None:
            return self.norm(tiles.mean(dim=1))
        real = mask.unsqueeze(-1)
        total = torch.where(real, tiles, torch.zeros_like(tiles)).sum(1)
        return self.norm(total / real.sum(1).to(tiles.dtype))

    def _tiles(self, h, mask):
        t = self.norm(h)[:, 1:]
        return t if mask is None else torch.where(mask.unsqueeze(-1), t, torch.zeros_like(t))

    def forward(self, features: torch.Tensor, coords: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, all_layers: bool = False, *,
                global_pool: bool | None = None, return_tiles: bool = False):
        """Slide embeddings of ``features`` (B, N, in_dim) at ``coords`` (B, N, 2).

        Args:
            coords: level-0 pixel coordinates ``(x, y)`` of each tile (as GigaPath's).
            key_padding_mask: (B, N) bool, True = real tile, real tiles first in every row
                (:func:`longnet.gigapath.pad_slides` builds it); each slide gets its batch-1 output.
            all_layers: GigaPath's ``all_layer_embed``: one output per state (depth + 1).
            global_pool: pool by the mean of the tiles instead of the class token; default the
                config's (the released model: False).
            return_tiles: also return per-tile contextual embeddings (``norm`` of the states'
                tile rows; 0 at padding).

        Returns:
            (B, E), or (depth + 1, B, E) with ``all_layers``; with ``return_tiles`` a pair
            ``(slide, tiles)``, tiles (B, N, E) or (depth + 1, B, N, E).
        """
        states = self.hidden_states(features, coords, key_padding_mask, all_states=bool(all_layers))
        return self.readout(states, key_padding_mask, all_layers=all_layers, global_pool=global_pool,
                            return_tiles=return_tiles)

    def readout(self, states: list[torch.Tensor], key_padding_mask: torch.Tensor | None = None, *,
                all_layers: bool = False, global_pool: bool | None = None, return_tiles: bool = False):
        """The outputs of :meth:`forward` from :meth:`hidden_states` (read them out more than once
        without running the encoder again)."""
        pool = self.config.global_pool if global_pool is None else bool(global_pool)
        if all_layers and len(states) != len(self.encoder.blocks) + 1:
            raise ValueError(f"all_layers=True needs the {len(self.encoder.blocks) + 1} states of "
                             f"hidden_states(..., all_states=True), got {len(states)}")
        chosen = states if all_layers else [self.encoder.norm(states[-1])]
        slide = [self._slide(h, key_padding_mask, pool) for h in chosen]
        slide = torch.stack(slide) if all_layers else slide[0]
        if not return_tiles:
            return slide
        tiles = [self._tiles(h, key_padding_mask) for h in chosen]
        return slide, (torch.stack(tiles) if all_layers else tiles[0])

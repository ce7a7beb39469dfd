"""Random Prov-GigaPath models in GigaPath's own code, and inputs for them (tests only)."""

from __future__ import annotations

from functools import partial

import numpy as np
import torch
from torch import nn

X_CELLS = 10  # x < 10 * 256 px: the reference's position table holds rows up to 10,000 only


def reference_table(gp, rows: int) -> torch.Tensor:
    """Rows ``0..rows-1`` of GigaPath's (1, 1000^2 + 1, 768) table, built by its own function."""
    m = np.arange(rows - 1)
    grid = np.stack([m % 1000, m // 1000]).astype(np.float32).reshape(2, 1, rows - 1)
    table = gp.pos_embed.get_2d_sincos_pos_embed_from_grid(768, grid)
    table = np.concatenate([np.zeros([1, 768]), table], axis=0)
    return torch.from_numpy(table).float().unsqueeze(0)


def reference_model(gp, depth: int, seed: int = 0, keep_layers: int | None = None) -> nn.Module:
    """GigaPath's LongNetViT (released width) with random weights, biases and norms, float64.

    ``depth`` must be one GigaPath names (3, 6, 8, 12 at width 768); ``keep_layers`` then keeps
    only the first layers (a shorter float64 run of the same code).
    """
    torch.manual_seed(seed)
    # slide_ngrids=1 skips the 3 GB table; the index rule uses slide_ngrids, so it is set back
    model = gp.LongNetViT(in_chans=1536, embed_dim=768, depth=depth, mlp_ratio=4,
                          norm_layer=partial(nn.LayerNorm, eps=1e-6), slide_ngrids=1)
    if keep_layers is not None:
        model.encoder.layers = model.encoder.layers[:keep_layers]
    model.slide_ngrids = 1000
    model.pos_embed = reference_table(gp, X_CELLS * 1000 + 1)
    with torch.no_grad():
        model.cls_token.normal_()
    return randomise_norms_and_biases(model)


def randomise_norms_and_biases(model: nn.Module) -> nn.Module:
    """Non-trivial LayerNorm weights and biases and Linear biases (a fresh model has 1 and 0s,
    which would hide a swapped or missing norm); returns the model in float64, eval mode."""
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.LayerNorm):
                mod.weight.copy_(1 + 0.2 * torch.randn_like(mod.weight))
                mod.bias.normal_(0, 0.2)
            elif isinstance(mod, nn.Linear) and mod.bias is not None:
                mod.bias.normal_(0, 0.2)
    return model.double().eval()


def slide_inputs(n: int, batch: int = 1, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(batch, n, 1536, generator=g, dtype=torch.float64)
    x = torch.rand(batch, n, generator=g) * (X_CELLS * 256 - 1)
    y = torch.rand(batch, n, generator=g) * (256000 - 1)
    return feats, torch.stack([x, y], -1).float()


def reference_outputs(model, feats, coords):
    """GigaPath's 13 (depth + 1) slide outputs, last-layer output, and per-tile outputs."""
    seen = {}
    handle = model.encoder.register_forward_hook(lambda mod, inp, out: seen.update(out))
    try:
        with torch.no_grad():
            layers = torch.stack(model(feats, coords, all_layer_embed=True))
    finally:
        handle.remove()
    with torch.no_grad():
        last = model.norm(seen["encoder_out"])
        states = torch.stack([model.norm(s)[:, 1:] for s in seen["encoder_states"]])
    return {"layers": layers, "last": last[:, 0], "tiles": last[:, 1:], "layer_tiles": states}

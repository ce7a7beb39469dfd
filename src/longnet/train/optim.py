"""AdamW with the paper's recipe and the usual weight-decay exclusions.

Weight decay applies to the weight matrices of linear layers only; biases, normalization weights
(LayerNorm) and embeddings (hence a tied LM head) are not decayed. Tied parameters appear once.
"""

from __future__ import annotations

import torch
from torch import nn

from longnet.paper import PAPER_BETAS, PAPER_WEIGHT_DECAY


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: ``decay`` (linear weights) and ``no_decay`` (everything else).

    Returns groups with a ``"name"`` key; parameters that do not require gradients are left out.
    """
    no_decay_ids: set[int] = set()
    for module in model.modules():
        if isinstance(module, nn.Embedding) or "Norm" in type(module).__name__:
            no_decay_ids.update(id(p) for p in module.parameters(recurse=False))
    decay, no_decay, seen = [], [], set()
    for param in model.parameters():  # parameters() yields a tied tensor once
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        if id(param) in no_decay_ids or param.dim() < 2:
            no_decay.append(param)
        else:
            decay.append(param)
    return [
        {"name": "decay", "params": decay, "weight_decay": weight_decay},
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(
    model: nn.Module,
    *,
    lr: float,
    betas: tuple[float, float] = PAPER_BETAS,
    weight_decay: float = PAPER_WEIGHT_DECAY,
    eps: float = 1e-8,
    fused: bool | None = None,
) -> torch.optim.AdamW:
    """AdamW over :func:`parameter_groups` (the paper: betas 0.9/0.98, weight decay 0.01).

    ``foreach`` implementation on every device (deterministic on CPU); ``fused`` may be asked for
    on CUDA.
    """
    if lr <= 0:
        raise ValueError(f"lr must be positive, got {lr}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    groups = parameter_groups(model, weight_decay)
    if fused:
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=True)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)

"""The two numeric rules every dilated-attention path shares: the accumulator dtype and the
log-sum-exp merge of partial attention results (see ``docs/design.md``, "Merging branches").

Partial results ``(O_a, L_a)`` and ``(O_b, L_b)`` over disjoint key sets combine exactly into
``L = logaddexp(L_a, L_b)``, ``O = exp(L_a - L) O_a + exp(L_b - L) O_b``; a row with no key on
either side (``L = -inf``) stays ``O = 0``.
"""

from __future__ import annotations

import torch

__all__ = ["acc_dtype", "merge_partials", "NEG_INF"]

NEG_INF = float("-inf")


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of outputs, log-sum-exps and gradients while branches accumulate: float64 for
    float64 inputs, float32 for every other floating dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def merge_partials(o_a: torch.Tensor, l_a: torch.Tensor, o_b: torch.Tensor, l_b: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two partial attention results: ``o`` (..., m, D) with ``l`` (..., m)."""
    l_new = torch.logaddexp(l_a, l_b)
    safe = torch.where(torch.isfinite(l_new), l_new, torch.zeros_like(l_new))
    o_new = o_a * torch.exp(l_a - safe).unsqueeze(-1) + o_b * torch.exp(l_b - safe).unsqueeze(-1)
    return o_new, l_new

"""The interface every attention kernel family implements.

A backend runs dense attention on rows that the operator already gathered: query (B, G, L, D),
key/value (B, G, L, D), an optional additive float mask broadcastable to (B, G, L, L), and
returns the output with its log-sum-exp. Its backward takes the output and log-sum-exp to use,
which may be the *merged* ones of several branches (that is what makes the branch mixture exact).
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

__all__ = ["AttentionBackend"]


class AttentionBackend(Protocol):
    """What :mod:`longnet.ops.dilated` needs from a kernel family."""

    name: str
    needs_forward_state: bool
    """True when :meth:`backward` needs the ``aux`` of a forward on the same rows (the caller then
    re-runs the forward where it kept none); False when ``aux`` may be ``None``."""

    def unsupported_reason(self, query: torch.Tensor, *, has_mask: bool) -> str | None:
        """``None`` when this backend can run these inputs, else why not (shown to users)."""

    def forward(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
        mask: torch.Tensor | None, is_causal: bool, scale: float,
    ) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """``(out (B, G, L, D), lse (B, G, L) float32/64, aux)``; ``aux`` goes to backward.

        Rows whose keys are all masked may give any finite output and lse; the caller fixes them.
        """

    # Optional: ``forward_into(query, key, value, out, lse, *, merge, is_causal, scale) -> bool``
    # writes the forward into views of the operator's accumulators (or, with ``merge``, combines it
    # with what they hold by :func:`longnet.ops.merge.merge_partials`' rule) and returns True, or
    # returns False having touched nothing; it is used only for calls without a mask, and only
    # when ``needs_forward_state`` is False.

    def backward(
        self, grad_out: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
        out: torch.Tensor, lse: torch.Tensor, aux: Any, mask: torch.Tensor | None,
        is_causal: bool, scale: float,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Gradients of attention evaluated with the given ``out`` and ``lse`` (natural log).

        ``lse`` may hold ``+inf`` for rows that must contribute nothing.
        """

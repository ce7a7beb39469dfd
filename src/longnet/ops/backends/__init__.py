"""Attention kernel families behind dilated attention, one small module each.

``get_backend(name, query, has_mask)`` resolves a name: ``"auto"`` picks the fastest exact kernel
for the device and dtype (on CPU ``cpu_kernel``, longnet's own, for float32 calls without a padding
mask, causal or not, else ``cpu_flash``; ``cuda`` on GPU; ``math`` when none applies);
any other name is taken literally, and a backend that cannot run raises ``ValueError`` (never a
silent fallback).
"""

from __future__ import annotations

import torch

from longnet.ops.backends.base import AttentionBackend
from longnet.ops.backends.cpu_flash import CpuFlashBackend
from longnet.ops.backends.cpu_kernel import CpuKernelBackend, enabled_for_auto, warn_unavailable_once
from longnet.ops.backends.cuda import CudaBackend, CudaEfficientBackend, CudaFlashBackend
from longnet.ops.backends.math import MathBackend

__all__ = ["AttentionBackend", "BACKENDS", "get_backend"]

BACKENDS: dict[str, AttentionBackend] = {
    b.name: b
    for b in (MathBackend(), CpuFlashBackend(), CpuKernelBackend(), CudaBackend(), CudaFlashBackend(),
              CudaEfficientBackend())
}


def get_backend(name: str, query: torch.Tensor, *, has_mask: bool = True) -> AttentionBackend:
    """The backend called ``name`` for inputs like ``query`` (see module docstring)."""
    if not isinstance(name, str):
        raise TypeError(f"backend must be a str, got {type(name).__name__}")
    if name == "auto":
        # causal: ours wastes fewer masked scores; non-causal: it merges branches in its own epilogue,
        # is level with PyTorch's flash kernel in the forward and faster in fwd+bwd (docs/benchmarks.md)
        if query.device.type == "cpu" and query.dtype == torch.float32 and not has_mask and enabled_for_auto():
            reason = BACKENDS["cpu_kernel"].unsupported_reason(query, has_mask=has_mask)
            if reason is None:
                return BACKENDS["cpu_kernel"]
            warn_unavailable_once(reason)
        preferred = {"cpu": "cpu_flash", "cuda": "cuda"}.get(query.device.type, "math")
        be = BACKENDS[preferred]
        if be.unsupported_reason(query, has_mask=has_mask) is None:
            return be
        return BACKENDS["math"]
    if name not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {sorted(BACKENDS)}, got {name!r}")
    be = BACKENDS[name]
    reason = be.unsupported_reason(query, has_mask=has_mask)
    if reason is not None:
        raise ValueError(f"backend {name!r} cannot run these inputs: {reason}")
    return be

"""PyTorch's fused flash attention kernel for CPU (private aten op, with log-sum-exp)."""

from __future__ import annotations

import torch

from longnet.ops.merge import acc_dtype

__all__ = ["CpuFlashBackend"]

_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _ops():
    aten = torch.ops.aten
    fwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    bwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    return fwd, bwd


class CpuFlashBackend:
    name = "cpu_flash"
    needs_forward_state = False

    def unsupported_reason(self, query, *, has_mask):
        fwd, bwd = _ops()
        if fwd is None or bwd is None:
            return f"torch {torch.__version__} has no CPU flash attention op"
        if query.device.type != "cpu":
            return f"cpu_flash runs on CPU tensors, got device {query.device}"
        if query.dtype not in _DTYPES:
            return f"cpu_flash does not support dtype {query.dtype}"
        return None

    def forward(self, query, key, value, mask, is_causal, scale):
        fwd, _ = _ops()
        if mask is not None:
            mask = mask.to(query.dtype)
        out, lse = fwd(query, key, value, 0.0, is_causal, attn_mask=mask, scale=scale)
        return out, lse, None

    def backward(self, grad_out, query, key, value, out, lse, aux, mask, is_causal, scale):
        _, bwd = _ops()
        if mask is not None:
            mask = mask.to(query.dtype)
        lse = lse.to(acc_dtype(query.dtype))
        # the kernel takes strided views (the operator passes them) as they are
        return bwd(grad_out, query, key, value, out, lse, 0.0, is_causal, attn_mask=mask,
                   scale=scale)

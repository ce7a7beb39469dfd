"""PyTorch's fused CUDA attention kernels (flash and memory-efficient), through private aten ops.

The public SDPA does not return the log-sum-exp, which merging branches needs, so these call the
aten ops behind it: ``_scaled_dot_product_flash_attention`` (float16/bfloat16, no mask) and
``_scaled_dot_product_efficient_attention`` (float32 too, additive mask). ``cuda`` picks flash
where it applies and the efficient kernel otherwise.
"""

from __future__ import annotations

import torch

__all__ = ["CudaFlashBackend", "CudaEfficientBackend", "CudaBackend"]


def _on_cuda(query) -> str | None:
    if not torch.cuda.is_available():
        return "CUDA is not available"
    if query.device.type != "cuda":
        return f"CUDA kernels need CUDA tensors, got device {query.device}"
    return None


class CudaFlashBackend:
    name = "cuda_flash"
    needs_forward_state = True  # backward takes the forward's RNG/sequence state

    def unsupported_reason(self, query, *, has_mask):
        reason = _on_cuda(query)
        if reason:
            return reason
        if has_mask:
            return "cuda_flash takes no mask (padding or uneven segments need cuda_efficient)"
        if query.dtype not in (torch.float16, torch.bfloat16):
            return f"cuda_flash needs float16 or bfloat16, got {query.dtype}"
        D = query.shape[-1]
        if D % 8 or D > 256:
            return f"cuda_flash needs a head dim that is a multiple of 8 and <= 256, got {D}"
        return None

    def forward(self, query, key, value, mask, is_causal, scale):
        res = torch.ops.aten._scaled_dot_product_flash_attention(
            query, key, value, 0.0, is_causal, False, scale=scale)
        out, lse, cum_q, cum_k, max_q, max_k, rng_state, unused = res[:8]
        return out, lse, (cum_q, cum_k, max_q, max_k, rng_state, unused)

    def backward(self, grad_out, query, key, value, out, lse, aux, mask, is_causal, scale):
        cum_q, cum_k, max_q, max_k, rng_state, unused = aux
        return torch.ops.aten._scaled_dot_product_flash_attention_backward(
            grad_out.contiguous(), query, key, value, out.contiguous(),
            lse.to(torch.float32).contiguous(), cum_q, cum_k, max_q, max_k, 0.0, is_causal,
            rng_state, unused, scale=scale)


def _aligned_bias(mask: torch.Tensor | None, query: torch.Tensor, L: int, S: int):
    """The mask expanded to (B, G, L, S) over storage whose rows are 16-element aligned."""
    if mask is None:
        return None
    pad = (-S) % 16
    lead = mask.shape[:-1]
    base = torch.zeros(*lead, S + pad, dtype=query.dtype, device=query.device)
    base[..., :S] = mask
    return base[..., :S].expand(query.shape[0], query.shape[1], L, S)


class CudaEfficientBackend:
    name = "cuda_efficient"
    needs_forward_state = True  # backward takes the forward's RNG state and padded lse

    def unsupported_reason(self, query, *, has_mask):
        reason = _on_cuda(query)
        if reason:
            return reason
        if query.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            return f"cuda_efficient needs float16, bfloat16 or float32, got {query.dtype}"
        return None

    def forward(self, query, key, value, mask, is_causal, scale):
        L, S = query.shape[2], key.shape[2]
        bias = _aligned_bias(mask, query, L, S)
        out, lse, seed, offset = torch.ops.aten._scaled_dot_product_efficient_attention(
            query, key, value, bias, True, 0.0, is_causal, scale=scale)
        return out, lse[..., :L], (seed, offset, lse.shape[-1])

    def backward(self, grad_out, query, key, value, out, lse, aux, mask, is_causal, scale):
        seed, offset, lse_len = aux
        L, S = query.shape[2], key.shape[2]
        padded = torch.zeros(*lse.shape[:-1], lse_len, dtype=torch.float32, device=lse.device)
        padded[..., :L] = lse
        bias = _aligned_bias(mask, query, L, S)
        grads = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
            grad_out.contiguous(), query, key, value, bias, out.contiguous(), padded, seed,
            offset, 0.0, [True, True, True, False], is_causal, scale=scale)
        return grads[0], grads[1], grads[2]


class CudaBackend:
    """Flash where it applies, the efficient kernel otherwise (decided per call)."""

    name = "cuda"
    needs_forward_state = True

    def __init__(self):
        self.flash = CudaFlashBackend()
        self.efficient = CudaEfficientBackend()

    def _pick(self, query, has_mask):
        return self.flash if self.flash.unsupported_reason(query, has_mask=has_mask) is None \
            else self.efficient

    def unsupported_reason(self, query, *, has_mask):
        return self.efficient.unsupported_reason(query, has_mask=has_mask)

    def forward(self, query, key, value, mask, is_causal, scale):
        be = self._pick(query, mask is not None)
        out, lse, aux = be.forward(query, key, value, mask, is_causal, scale)
        return out, lse, (be, aux)

    def backward(self, grad_out, query, key, value, out, lse, aux, mask, is_causal, scale):
        be, inner = aux
        return be.backward(grad_out, query, key, value, out, lse, inner, mask, is_causal, scale)

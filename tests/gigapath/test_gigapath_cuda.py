"""CUDA float16/bfloat16 through longnet's kernels (no flash-attn), against CPU float64."""

from __future__ import annotations

import pytest
import torch

from longnet.gigapath import SlideEncoder, SlideEncoderConfig

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_half_precision_close_to_float64(dtype):
    torch.manual_seed(0)
    config = SlideEncoderConfig(depth=2)
    model = SlideEncoder(config).eval()
    feats = torch.randn(2, 3000, 1536)
    coords = torch.rand(2, 3000, 2) * 255999
    mask = torch.ones(2, 3000, dtype=torch.bool)
    mask[1, 1700:] = False
    with torch.no_grad():
        want = model.double()(feats.double(), coords, mask)
        got = model.to("cuda", dtype)(feats.to("cuda", dtype), coords.cuda(), mask.cuda()).double().cpu()
        with torch.autocast("cuda", dtype=dtype):
            auto = model.float()(feats.cuda(), coords.cuda(), mask.cuda()).double().cpu()
    for out in (got, auto):
        assert bool(torch.isfinite(out).all())
        cos = torch.nn.functional.cosine_similarity(out, want)
        assert float(cos.min()) > 0.999

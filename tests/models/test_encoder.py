"""LongNetEncoder: padding invariance (batching different lengths), pooling, projections."""

import pytest
import torch

from longnet import LongNetConfig, LongNetEncoder

D64 = torch.float64


def _config(**kw):
    base = dict(vocab_size=None, embed_dim=32, num_layers=2, num_heads=4, ffn_dim=48,
                segment_lengths=(4, 8, 16), dilation_rates=(1, 2, 4), position="rope")
    base.update(kw)
    return LongNetConfig(**base)


def _encoder(input_dim=None, **kw):
    torch.manual_seed(2)
    return LongNetEncoder(_config(**kw), input_dim=input_dim).to(D64).eval()


@pytest.mark.parametrize("kw", [dict(), dict(position="none", num_kv_heads=2),
                                dict(attention="dense"), dict(attention="sparse", sparse_block=4)])
def test_different_lengths_batch_together(kw):
    enc = _encoder(input_dim=20, **kw)
    lengths = [37, 23, 8, 1]
    seqs = [torch.randn(1, n, 20, dtype=D64) for n in lengths]
    N = max(lengths)
    batch = torch.full((len(lengths), N, 20), float("nan"), dtype=D64)  # garbage padding
    mask = torch.zeros(len(lengths), N, dtype=torch.bool)
    for i, (s, n) in enumerate(zip(seqs, lengths)):
        batch[i, :n] = s[0]
        mask[i, :n] = True
    hidden, pooled = enc(batch, mask, return_pooled=True)
    assert hidden.shape == (4, N, 32) and pooled.shape == (4, 32)
    assert torch.isfinite(hidden).all()
    for i, (s, n) in enumerate(zip(seqs, lengths)):
        alone, alone_pooled = enc(s, return_pooled=True)
        torch.testing.assert_close(hidden[i, :n], alone[0], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(pooled[i], alone_pooled[0], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(alone_pooled[0], alone[0].mean(0))


def test_bidirectional():
    enc = _encoder()
    x = torch.randn(1, 12, 32, dtype=D64)
    y = x.clone()
    y[0, 10] = torch.randn(32, dtype=D64)
    assert not torch.allclose(enc(x)[0, :10], enc(y)[0, :10])


def test_input_projection_only_when_needed():
    assert _encoder().input_proj is None
    enc = _encoder(input_dim=7)
    assert enc.input_proj.in_features == 7
    with pytest.raises(ValueError, match="embeddings"):
        enc(torch.randn(1, 4, 32, dtype=D64))
    with pytest.raises(ValueError, match="input_dim"):
        LongNetEncoder(_config(), input_dim=0)


def test_xpos_is_refused_for_an_encoder():
    with pytest.raises(ValueError, match="xpos"):
        LongNetEncoder(_config(position="xpos"))


def test_gradients_reach_every_parameter_and_skip_padding():
    enc = _encoder(input_dim=10).train()
    x = torch.randn(2, 19, 10, dtype=D64, requires_grad=True)
    mask = torch.ones(2, 19, dtype=torch.bool)
    mask[1, 11:] = False
    h, pooled = enc(x, mask, return_pooled=True)
    pooled.sum().backward()
    for name, p in enc.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert torch.all(x.grad[1, 11:] == 0)

"""Shifted segments (LongNetConfig.shift_segments): alternate layers move their boundaries, so a
causal model reads across every boundary; refused where it is not supported."""

import pytest
import torch

from longnet import DilatedPattern, LongNetConfig, LongNetLM


def _lm(shift, layers=6):
    torch.manual_seed(0)
    cfg = LongNetConfig(vocab_size=23, embed_dim=16, num_layers=layers, num_heads=4, ffn_dim=32,
                        segment_lengths=[8, 16, 32], dilation_rates=[1, 2, 4], position="rope",
                        shift_segments=shift)
    return LongNetLM(cfg).double().eval()


def test_odd_layers_are_shifted_by_half_the_shortest_segment():
    cfg = _lm(True).config
    assert [p.shift for p in cfg.patterns()] == [0, 4, 0, 4, 0, 4]
    assert all(p.shift == 0 for p in _lm(False).config.patterns())
    assert [b.attn.pattern for b in _lm(True).blocks] == cfg.patterns()


def _influence(model, source, target, N=40):
    """|d logits[target] / d embedding[source]| through the whole model (float64)."""
    ids = torch.randint(0, 23, (1, N), generator=torch.Generator().manual_seed(1))
    x = model.embed(ids).detach().requires_grad_()
    h = model._trunk(x, None, 0)  # (1, N, E), layer-normed: project, since a plain sum is constant
    (h[0, target] * torch.linspace(-1, 1, h.shape[-1], dtype=h.dtype)).sum().backward()
    return x.grad[0, source].abs().max().item()


def test_shifted_layers_carry_a_token_across_a_segment_start():
    # unshifted: position 8 starts a segment of every branch, and causal paths only move forward,
    # so token 7 never reaches it, whatever the depth; shifted layers put 7 and 8 in one segment
    assert _influence(_lm(False), 7, 8) == 0.0
    assert _influence(_lm(True), 7, 8) > 1e-6


def test_shifted_model_stays_causal_and_trains():
    model = _lm(True).train()
    ids = torch.randint(0, 23, (2, 37), generator=torch.Generator().manual_seed(2))
    out = model(ids[:, :-1], labels=ids[:, 1:])
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    for t in (5, 12, 30):
        assert _influence(_lm(True), t, t - 1) == 0.0  # no position reads a later one


def test_flops_count_each_layers_pattern():
    model = _lm(True)
    c = model.config
    attn = sum(p.flops(64, c.head_dim, c.num_heads, is_causal=True, backward=True) for p in c.patterns())
    assert model.flops_per_token(64) == pytest.approx(6.0 * model._matmul_params() + attn / 64)


def test_unsupported_uses_are_refused():
    with pytest.raises(ValueError, match="generation cache does not support shifted segments"):
        _lm(True).make_cache(1)
    with pytest.raises(ValueError, match="shift_segments"):
        LongNetConfig(vocab_size=5, attention="dense", shift_segments=True)
    from longnet.parallel.layout import place_branches
    with pytest.raises(ValueError, match="not supported under sequence parallelism"):
        place_branches(DilatedPattern([8], [1], shift=4), 64, 2)
    from longnet.parallel.runtime import ParallelSettingsError, check_pattern_split
    with pytest.raises(ParallelSettingsError, match="shifted segments"):
        check_pattern_split(_lm(True).config, 64, 2)

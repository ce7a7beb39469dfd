"""LongNetLM and LongNetEncoder compile to one graph (no breaks) and compiled equals eager."""

import pytest
import torch

from longnet import LongNetConfig, LongNetEncoder, LongNetLM

V = 41


def _lm():
    torch.manual_seed(0)
    return LongNetLM(LongNetConfig(vocab_size=V, embed_dim=32, num_layers=2, num_heads=4,
                                   num_kv_heads=2, ffn_dim=64, segment_lengths=[8, 16, 32],
                                   dilation_rates=[1, 2, 4]))


def _encoder():
    torch.manual_seed(0)
    cfg = LongNetConfig(embed_dim=32, num_layers=2, num_heads=4, ffn_dim=64,
                        segment_lengths=[8, 32], dilation_rates=[1, 4], position="rope")
    return LongNetEncoder(cfg, input_dim=12)


def _lm_loss(model, ids):
    return model(ids[:, :-1], labels=ids[:, 1:]).loss


def _enc_out(model, x, mask):
    hidden, pooled = model(x, key_padding_mask=mask, return_pooled=True)
    return hidden.square().mean() + pooled.sum()


def _inputs():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (2, 53), generator=g)
    x = torch.randn(2, 45, 12, generator=g)
    mask = torch.ones(2, 45, dtype=torch.bool)
    mask[1, 30:] = False
    return ids, x, mask


@pytest.mark.parametrize("which", ["lm", "encoder"])
def test_one_graph_no_breaks(which):
    ids, x, mask = _inputs()
    torch._dynamo.reset()
    if which == "lm":
        explained = torch._dynamo.explain(_lm().train())(ids[:, :-1], labels=ids[:, 1:])
    else:
        explained = torch._dynamo.explain(_encoder())(x, key_padding_mask=mask, return_pooled=True)
    assert explained.break_reasons == []
    assert (explained.graph_count, explained.graph_break_count) == (1, 0)


@pytest.mark.parametrize("which", ["lm", "encoder"])
@pytest.mark.parametrize("autocast", [False, True])
def test_compiled_forward_and_backward_equal_eager(which, autocast):
    ids, x, mask = _inputs()
    model = _lm() if which == "lm" else _encoder()
    fn = (lambda: _lm_loss(model, ids)) if which == "lm" else (lambda: _enc_out(model, x, mask))
    torch._dynamo.reset()
    compiled_model = torch.compile(model, fullgraph=True, backend="aot_eager")
    fn_c = ((lambda: _lm_loss(compiled_model, ids)) if which == "lm"
            else (lambda: _enc_out(compiled_model, x, mask)))
    params = [p for p in model.parameters() if p.requires_grad]
    results = []
    for f in (fn_c, fn):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = f()
        results.append((loss, torch.autograd.grad(loss, params)))
    (loss_c, grads_c), (loss_e, grads_e) = results
    tol = dict(rtol=2e-2, atol=2e-3) if autocast else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss_c, loss_e, **tol)
    for a, b in zip(grads_c, grads_e):
        torch.testing.assert_close(a, b, **tol)


def test_lm_exports_with_the_registered_op():
    ids, _, _ = _inputs()
    model = _lm().eval()
    ep = torch.export.export(model, (ids,))
    assert "longnet.dilated_attention.default" in [str(n.target) for n in ep.graph.nodes]
    torch.testing.assert_close(ep.module()(ids).logits, model(ids).logits)

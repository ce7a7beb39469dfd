"""LongNetLM: causality across segments, dense equivalence, loss convention, gradients, autocast."""


import pytest
import torch
import torch.nn.functional as F

from longnet import LMOutput, LongNetConfig, LongNetLM

D64 = torch.float64


def _config(**kw):
    base = dict(vocab_size=37, embed_dim=32, num_layers=2, num_heads=4, ffn_dim=48,
                segment_lengths=(4, 8, 16), dilation_rates=(1, 2, 4), max_train_length=16)
    base.update(kw)
    return LongNetConfig(**base)


def _model(**kw):
    torch.manual_seed(1)
    return LongNetLM(_config(**kw)).to(D64).eval()


@pytest.mark.parametrize("kw", [
    dict(position="xpos"), dict(position="rope", num_kv_heads=2), dict(position="none"),
    dict(attention="sparse", sparse_block=4, sparse_stride=2), dict(attention="dense")])
def test_no_position_sees_a_later_one(kw):
    """N = 45 spans several segments of every branch, with a short tail segment.

    Without dense attention a position is read only inside its own segment of the largest
    branch (16 here): dilated attention is blockwise at the top level.
    """
    model = _model(**kw)
    ids = torch.randint(0, 37, (1, 45))
    base = model(ids).logits
    for t in (0, 3, 4, 7, 8, 15, 16, 23, 31, 32, 44):
        changed = ids.clone()
        changed[0, t] = (ids[0, t] + 1) % 37
        out = model(changed).logits
        assert torch.equal(out[:, :t], base[:, :t]), f"position < {t} saw token {t}"
        assert not torch.allclose(out[:, t], base[:, t])
        if (t + 1) % 16 and t < 44:  # later positions of its largest segment read it
            end = (t // 16 + 1) * 16
            assert not torch.allclose(out[:, t + 1:end], base[:, t + 1:end])
        # the largest segment (16) isolates: nothing after it reads position t
        end = min(45, (t // 16 + 1) * 16)
        assert torch.equal(out[:, end:], base[:, end:]) or model.config.attention == "dense"


@pytest.mark.parametrize("position", ["xpos", "rope"])
def test_single_full_branch_equals_dense_attention(position):
    dil = _model(position=position, segment_lengths=(64,), dilation_rates=(1,))
    dense = LongNetLM(_config(position=position, attention="dense")).to(D64).eval()
    dense.load_state_dict(dil.state_dict())
    ids = torch.randint(0, 37, (2, 41))
    mask = torch.ones(2, 41, dtype=torch.bool)
    mask[1, 30:] = False
    for m in (None, mask):
        a, b = dil(ids, key_padding_mask=m).logits, dense(ids, key_padding_mask=m).logits
        keep = slice(None) if m is None else m
        torch.testing.assert_close(a[keep], b[keep], rtol=1e-10, atol=1e-10)


def test_blockwise_eval_config_reuses_the_weights():
    dense = _model(attention="dense")
    block = LongNetLM(dense.config.for_eval_length(40)).to(D64).eval()
    block.load_state_dict(dense.state_dict())
    ids = torch.randint(0, 37, (1, 40))
    # the first training window is unchanged; later ones restart their context
    torch.testing.assert_close(block(ids).logits[:, :16], dense(ids[:, :16]).logits)
    torch.testing.assert_close(block(ids).logits[:, 16:32], dense(ids[:, 16:32]).logits)


def test_loss_convention_aligned_labels_ignore_and_padding():
    model = _model()
    ids = torch.randint(0, 37, (2, 19))
    labels = torch.randint(0, 37, (2, 19))
    labels[0, 3] = -100
    mask = torch.ones(2, 19, dtype=torch.bool)
    mask[1, 12:] = False
    out = model(ids, labels=labels, key_padding_mask=mask)
    assert isinstance(out, LMOutput) and out.logits.shape == (2, 19, 37)
    keep = mask & (labels != -100)
    want = F.cross_entropy(out.logits[keep], labels[keep])  # labels[t] is the target AT t
    torch.testing.assert_close(out.loss, want.float())
    assert int(out.num_tokens) == int(keep.sum())
    none = model(ids, labels=torch.full_like(labels, -100))
    assert none.loss.item() == 0.0 and int(none.num_tokens) == 0


def test_padding_does_not_change_real_logits():
    model = _model()
    ids = torch.randint(0, 37, (1, 21))
    padded = torch.cat([ids, torch.randint(0, 37, (1, 6))], 1)
    mask = torch.ones(1, 27, dtype=torch.bool)
    mask[:, 21:] = False
    torch.testing.assert_close(model(padded, key_padding_mask=mask).logits[:, :21],
                               model(ids).logits, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("position", ["xpos", "rope"])
def test_position_offset_changes_nothing_for_relative_positions(position):
    model = _model(position=position)
    ids = torch.randint(0, 37, (2, 23))
    torch.testing.assert_close(model(ids, position_offset=1000).logits, model(ids).logits,
                               rtol=1e-8, atol=1e-8)


def test_every_parameter_gets_a_gradient_and_ties_hold():
    model = _model(num_kv_heads=2).train()
    assert model.lm_head.weight is model.embed.weight
    ids = torch.randint(0, 37, (2, 30))
    model(ids, labels=torch.roll(ids, -1, 1)).loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_untied_head():
    model = _model(tie_embeddings=False)
    assert model.lm_head.weight is not model.embed.weight
    tied = _model()
    assert model.num_parameters() == tied.num_parameters() + 37 * 32


def test_grad_checkpointing_gives_the_same_gradients():
    ref = _model(dropout=0.0).train()
    ckpt = LongNetLM(_config(grad_checkpointing=True)).to(D64).train()
    ckpt.load_state_dict(ref.state_dict())
    ids = torch.randint(0, 37, (2, 33))
    labels = torch.roll(ids, -1, 1)
    for m in (ref, ckpt):
        m.zero_grad()
        m(ids, labels=labels).loss.backward()
    for (name, a), b in zip(ref.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-10, atol=1e-12, msg=name)


def test_bf16_autocast_runs():
    torch.manual_seed(0)
    model = LongNetLM(_config(num_kv_heads=2)).train()
    ids = torch.randint(0, 37, (2, 40))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, labels=torch.roll(ids, -1, 1))
    assert out.logits.dtype == torch.bfloat16 and out.loss.dtype == torch.float32
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    with torch.no_grad():
        full = model(ids, labels=torch.roll(ids, -1, 1)).loss
    assert abs(out.loss.item() - full.item()) < 0.05


def test_dropout_trains_and_eval_is_deterministic():
    model = LongNetLM(_config(dropout=0.1, attention_dropout=0.1))
    ids = torch.randint(0, 37, (1, 20))
    model.train()
    a, b = model(ids).logits, model(ids).logits
    assert not torch.equal(a, b)
    model.eval()
    assert torch.equal(model(ids).logits, model(ids).logits)


def test_magneto_init_scales():
    model = LongNetLM(_config(num_layers=6))
    gamma = model.config.gamma
    blk = model.blocks[0]
    # Xavier-uniform variance 2 / (fan_in + fan_out), times gamma^2 on fc1/fc2/v/out
    var_fc1 = 2 / (32 + 48) * gamma ** 2
    assert blk.ffn.fc1.weight.var().item() == pytest.approx(var_fc1, rel=0.15)
    var_q = 2 / 64 * 0.5
    assert blk.attn.q_proj.weight.var().item() == pytest.approx(var_q, rel=0.15)
    assert blk.attn.v_proj.weight.var().item() == pytest.approx(var_q * gamma ** 2, rel=0.15)
    assert blk.attn.q_proj.bias.abs().sum() == 0


def test_flops_per_token():
    model = _model()
    c = model.config
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    attn = c.num_layers * c.pattern().flops(64, c.head_dim, c.num_heads, is_causal=True,
                                            backward=True) / 64
    assert model.flops_per_token(64) == pytest.approx(6 * linear + attn)
    dense = _model(attention="dense")
    assert dense.flops_per_token(64) > model.flops_per_token(64)
    with pytest.raises(ValueError, match="seq_len"):
        model.flops_per_token(0)


def test_input_errors():
    model = _model()
    with pytest.raises(ValueError, match="input_ids"):
        model(torch.randn(2, 5))
    with pytest.raises(ValueError, match="labels"):
        model(torch.zeros(2, 5, dtype=torch.long), labels=torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="key_padding_mask"):
        model(torch.zeros(2, 5, dtype=torch.long), key_padding_mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match="vocab_size"):
        LongNetLM(_config(vocab_size=None))


def test_deep_model_starts_sane():
    """48 layers with MAGNETO init: loss near log(vocab), finite gradients in every layer."""
    import math
    model = LongNetLM(_config(num_layers=48, embed_dim=16, num_heads=2, ffn_dim=32))
    ids = torch.randint(0, 37, (2, 32))
    out = model(ids, labels=torch.roll(ids, -1, 1))
    assert abs(out.loss.item() - math.log(37)) < 1.0
    out.loss.backward()
    norms = torch.stack([b.ffn.fc1.weight.grad.norm() for b in model.blocks])
    assert torch.isfinite(norms).all() and (norms > 0).all()
    assert norms.max() / norms.min() < 100


@pytest.mark.parametrize("bad, match", [
    (37, r"input_ids holds token id 37 \(the largest\), but the model's vocabulary has 37 ids"),
    (1000, r"token id 1000 \(the largest\).* 37 ids"),
    (-1, r"input_ids holds token id -1 \(the smallest\); token ids lie in \[0, 37\)"),
])
@pytest.mark.parametrize("entry", ["forward", "cached_forward", "generate"])
def test_token_ids_outside_the_vocabulary_are_a_clear_error(bad, match, entry):
    model = _model()
    ids = torch.randint(0, 37, (2, 9))
    ids[1, 4] = bad
    with pytest.raises(ValueError, match=match):
        if entry == "forward":
            model(ids)
        elif entry == "cached_forward":
            from longnet.models.generation import cached_forward

            cached_forward(model, ids, model.make_cache(2))
        else:
            model.generate(ids, 2)
    ids[1, 4] = 36
    model(ids.to(torch.int32))  # the largest legal id, int32 ids: fine

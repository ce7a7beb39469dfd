"""Learning-rate schedule and AdamW parameter groups."""

from __future__ import annotations

import math

import pytest
import torch

from longnet.train import build_optimizer, learning_rate, parameter_groups


def test_warmup_then_cosine_to_floor():
    kw = dict(peak_lr=1e-3, warmup_steps=10, decay_steps=110, decay="cosine", min_lr_ratio=0.1)
    lrs = [learning_rate(s, **kw) for s in range(130)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a < b for a, b in zip(lrs[:9], lrs[1:10]))  # rising warmup
    assert all(a >= b for a, b in zip(lrs[10:110], lrs[11:111]))  # non-increasing decay
    assert lrs[60] == pytest.approx(1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lrs[110] == pytest.approx(1e-4) and lrs[129] == pytest.approx(1e-4)


def test_linear_and_constant():
    kw = dict(peak_lr=2.0, warmup_steps=0, decay_steps=10, min_lr_ratio=0.0)
    assert [learning_rate(s, decay="linear", **kw) for s in (0, 5, 10, 20)] == [2.0, 1.0, 0.0, 0.0]
    assert learning_rate(7, decay="constant", **kw) == 2.0


@pytest.mark.parametrize("bad", [dict(decay="step"), dict(step=-1), dict(decay_steps=0), dict(min_lr_ratio=2.0)])
def test_schedule_rejects(bad):
    kw = dict(step=0, peak_lr=1.0, warmup_steps=1, decay_steps=5, decay="cosine", min_lr_ratio=0.1) | bad
    step = kw.pop("step")
    with pytest.raises(ValueError):
        learning_rate(step, **kw)


def test_no_decay_on_norms_biases_embeddings(micro_model):
    from longnet.models import LongNetConfig, LongNetLM

    model = LongNetLM(LongNetConfig.from_preset("tiny", **(micro_model | {"vocab_size": 50})))
    decay, no_decay = parameter_groups(model, 0.01)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    kept = {names[id(p)] for p in no_decay["params"]}
    assert decayed and kept and not decayed & kept
    assert decayed | kept == set(names.values())  # every parameter once (tied head included once)
    assert "embed.weight" in kept
    for name in decayed:
        assert name.endswith(".weight") and "norm" not in name.lower() and "ln" not in name.split(".")[-2].lower()
    for module_name, module in model.named_modules():
        if isinstance(module, torch.nn.LayerNorm):
            assert all(f"{module_name}.{n}" in kept for n, _ in module.named_parameters())
    assert all(n.endswith("bias") is False for n in decayed)
    optimizer = build_optimizer(model, lr=1e-3)
    assert optimizer.defaults["betas"] == (0.9, 0.98)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.01, 0.0]

"""``LongNetConfig`` counts parameters without building a model: equal to the model's own count."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from longnet.models import PRESETS, LongNetConfig, LongNetEncoder, LongNetLM


def _walked(model: nn.Module) -> tuple[int, int]:
    """(parameters, weights of nn.Linear layers), each tensor once, counted from the modules."""
    params = {id(p): p.numel() for p in model.parameters()}
    linear = {id(m.weight): m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear)}
    return sum(params.values()), sum(linear.values())


def _check(config: LongNetConfig, input_dim: int | None = None) -> None:
    with torch.device("meta"):  # no memory, even for 2.7b
        lm = LongNetLM(config) if config.vocab_size is not None else None
        enc_config = LongNetConfig.from_dict(config.to_dict() | {"position": "rope"}
                                             if config.position == "xpos" else config.to_dict())
        enc = LongNetEncoder(enc_config, input_dim=input_dim)
    if lm is not None:
        total, linear = _walked(lm)
        assert config.num_parameters() == lm.num_parameters() == total
        assert config.num_parameters(exclude_embeddings=True) == lm.num_parameters(exclude_embeddings=True)
        assert config.matmul_parameters() == lm._matmul_params() == linear
    total, linear = _walked(enc)
    assert enc_config.num_parameters("encoder", input_dim=input_dim) == enc.num_parameters() == total
    assert enc_config.matmul_parameters("encoder", input_dim=input_dim) == enc._matmul_params() == linear


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_counts_like_its_model(name):
    _check(LongNetConfig.from_preset(name))
    _check(LongNetConfig.from_preset(name), input_dim=1536)


@settings(max_examples=30, deadline=None)
@given(heads=st.sampled_from([1, 2, 4]), kv_div=st.sampled_from([1, 2, 4]), head_dim=st.sampled_from([2, 6]),
       layers=st.integers(1, 3), ffn=st.integers(1, 40), vocab=st.integers(1, 50), bias=st.booleans(),
       sub_ln=st.booleans(), tie=st.booleans(), attention=st.sampled_from(["dilated", "dense", "sparse"]),
       input_dim=st.sampled_from([None, 5, 12]))
def test_counts_match_the_model_for_any_shape(heads, kv_div, head_dim, layers, ffn, vocab, bias, sub_ln, tie,
                                              attention, input_dim):
    kv = heads // kv_div if heads % kv_div == 0 else None
    config = LongNetConfig(vocab_size=vocab, embed_dim=heads * head_dim, num_layers=layers, num_heads=heads,
                           num_kv_heads=kv, ffn_dim=ffn, bias=bias, sub_ln=sub_ln, tie_embeddings=tie,
                           attention=attention, segment_lengths=(4, 8), dilation_rates=(1, 2),
                           max_train_length=16, sparse_block=4)
    _check(config, input_dim=input_dim)


def test_bad_count_arguments():
    config = LongNetConfig.from_preset("tiny")
    with pytest.raises(ValueError, match="model must be 'lm' or 'encoder'"):
        config.num_parameters("decoder")
    with pytest.raises(ValueError, match="input_dim must be a positive int"):
        config.matmul_parameters("encoder", input_dim=0)
    with pytest.raises(ValueError, match="input_dim is for model='encoder'"):
        config.num_parameters("lm", input_dim=8)
    with pytest.raises(ValueError, match="vocab_size must be set"):
        LongNetConfig.from_preset("gigapath-slide").num_parameters()

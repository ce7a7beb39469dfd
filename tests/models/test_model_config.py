"""LongNetConfig: validation names the field, JSON round trip, presets and their sizes."""

import dataclasses
import json

import pytest
import torch

from longnet import LongNetConfig, LongNetEncoder, LongNetLM
from longnet.models import PRESETS


@pytest.mark.parametrize("name, target", [
    ("base", 125e6), ("350m", 350e6), ("760m", 760e6), ("2.7b", 2.7e9)])
def test_paper_presets_match_the_paper_sizes(name, target):
    """Counting every parameter once, the tied embedding/LM head included."""
    config = LongNetConfig.from_preset(name)
    with torch.device("meta"):
        model = LongNetLM(config)
    n = model.num_parameters()
    assert abs(n - target) / target < 0.03, n
    assert model.num_parameters(exclude_embeddings=True) == n - config.vocab_size * \
        config.embed_dim
    assert config.segment_lengths == (2048, 4096, 8192, 16384, 32768)
    assert config.dilation_rates == (1, 2, 4, 6, 12)


def test_paper_base_shape():
    c = LongNetConfig.from_preset("base")
    assert (c.num_layers, c.embed_dim, c.num_heads, c.ffn_dim) == (12, 768, 12, 3072)
    c = LongNetConfig.from_preset("2.7b")
    assert (c.num_layers, c.embed_dim, c.num_heads) == (32, 2560, 32)


def test_small_presets_build_and_take_a_vocab_override():
    tiny = LongNetConfig.from_preset("tiny", vocab_size=300)
    model = LongNetLM(tiny)
    assert 1e6 <= model.num_parameters() <= 3e6
    assert model.embed.num_embeddings == 300
    with torch.device("meta"):
        assert LongNetLM(LongNetConfig.from_preset("small")).num_parameters() < 30e6
        enc = LongNetEncoder(LongNetConfig.from_preset("gigapath-slide"), input_dim=1536)
    assert enc.config.num_heads == 16


def test_unknown_preset_lists_known_ones():
    with pytest.raises(ValueError, match="known presets") as err:
        LongNetConfig.from_preset("huge")
    for name in PRESETS:
        assert name in str(err.value)
    with pytest.raises(ValueError, match="bogus"):
        LongNetConfig.from_preset("tiny", bogus=1)


@pytest.mark.parametrize("field, value", [
    ("embed_dim", 0), ("num_layers", -1), ("num_heads", 5), ("num_kv_heads", 5),
    ("ffn_dim", 1.5), ("vocab_size", 0), ("position", "alibi"), ("attention", "linear"),
    ("activation", "swish"), ("dropout", 1.0), ("attention_dropout", -0.1), ("norm_eps", 0.0),
    ("segment_lengths", (2048, 0, 8192, 16384, 32768)), ("dilation_rates", (1, 2)),
    ("dilation_rates", (2, 2, 4, 6, 12)), ("tie_embeddings", 1), ("grad_checkpointing", "yes"),
    ("xpos_scale_base", 0.0), ("rope_theta", float("nan")), ("max_train_length", 0),
    ("sparse_block", True), ("init_gamma", -1.0)])
def test_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=f"LongNetConfig.{field} "):
        LongNetConfig(**{field: value})


def test_odd_head_dim_needs_no_positions():
    with pytest.raises(ValueError, match="position"):
        LongNetConfig(embed_dim=36, num_heads=4, position="rope")
    LongNetConfig(embed_dim=36, num_heads=4, position="none")


def test_dict_round_trip_is_json_safe():
    c = LongNetConfig.from_preset("tiny", num_kv_heads=2, attention="sparse")
    d = json.loads(json.dumps(c.to_dict()))
    assert LongNetConfig.from_dict(d) == c
    d["surprise"] = 1
    with pytest.raises(ValueError, match="unknown LongNetConfig keys \\['surprise'\\]"):
        LongNetConfig.from_dict(d)


def test_lists_become_tuples():
    c = LongNetConfig(segment_lengths=[8, 16], dilation_rates=[1, 2])
    assert c.segment_lengths == (8, 16) and c.dilation_rates == (1, 2)


def test_baselines_are_patterns():
    dense = LongNetConfig(attention="dense", max_train_length=2048)
    assert dense.pattern() is None
    assert dense.for_eval_length(2048) == dense
    long = dense.for_eval_length(8192)  # blockwise causal: one branch (train length, 1)
    assert long.attention == "dilated"
    assert long.pattern().branches == ((2048, 1),)
    sparse = LongNetConfig(attention="sparse", sparse_block=128, sparse_stride=8,
                           max_train_length=8192)
    assert sparse.pattern().branches == ((128, 1), (8192, 8))
    assert LongNetConfig(attention="sparse", sparse_block=64).pattern().branches[1][1] == 64
    dil = LongNetConfig()
    assert dil.for_eval_length(10 ** 6) == dil
    with pytest.raises(ValueError, match="length"):
        dil.for_eval_length(0)


def test_gamma_is_magneto_scale():
    import math
    assert LongNetConfig(num_layers=12).gamma == pytest.approx(math.sqrt(math.log(24)))
    assert LongNetConfig(init_gamma=1.0).gamma == 1.0


def test_config_is_a_dataclass_with_docs():
    import inspect
    src = inspect.getsource(LongNetConfig)
    for f in dataclasses.fields(LongNetConfig):
        # every field is followed by its docstring line
        i = src.index(f"    {f.name}: ")
        assert '"""' in src[i:].splitlines()[1], f.name

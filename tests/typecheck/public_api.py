"""Typed use of longnet's public API, checked by ``mypy --strict`` (tests/test_typing.py).

Not run by pytest: it only has to type-check. Each line is an ordinary use of a public name.
"""

from __future__ import annotations

import torch
from transformers import PretrainedConfig

import longnet
from longnet import (
    CheckpointError,
    DilatedAttention,
    DilatedKVCache,
    DilatedPattern,
    LMOutput,
    LongNetConfig,
    LongNetEncoder,
    LongNetLM,
    MultiheadDilatedAttention,
)
from longnet.analysis import max_hops


def operator(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    out: torch.Tensor = longnet.dilated_attention(q, k, v, segment_lengths=[8, 16], dilation_rates=[1, 2],
                                                  is_causal=True)
    module = DilatedAttention([8, 16], [1, 2], is_causal=True)
    mixed: torch.Tensor = module(q, k, v)  # nn.Module.__call__ returns Any in torch's stubs
    return out + mixed


def pattern() -> float:
    p = DilatedPattern([8, 16], [1, 2])
    return p.flops(1024, 4, 64, is_causal=True) / p.dense_flops(1024, 4, 64, is_causal=True) + max_hops(p, 64, 4)


def language_model(ids: torch.Tensor) -> torch.Tensor:
    config = LongNetConfig.from_preset("tiny", vocab_size=100)
    model = LongNetLM(config)
    out: LMOutput = model(ids[:, :-1], labels=ids[:, 1:])
    assert out.loss is not None
    cache: DilatedKVCache = model.make_cache(1)
    new: torch.Tensor = model.generate(ids[:1], 4, cache=cache)
    model.save_pretrained("ckpt")
    model = LongNetLM.from_pretrained("ckpt")
    return out.loss + new.sum() + cache.nbytes


def encoder(x: torch.Tensor) -> torch.Tensor:
    enc = LongNetEncoder(LongNetConfig.from_preset("tiny", position="rope"), input_dim=x.shape[-1])
    hidden: torch.Tensor = enc(x)
    mha = MultiheadDilatedAttention(32, 4, segment_lengths=[8, 16], dilation_rates=[1, 2])
    y: torch.Tensor = mha(torch.zeros(1, 16, 32))
    return hidden.sum() + y.sum()


def errors() -> type[ValueError]:
    return CheckpointError


def slide_encoder(features: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    from longnet.gigapath import SlideEncoder, load_slide_encoder, pad_slides

    model: SlideEncoder = load_slide_encoder("slide_encoder.pth")
    feats, xy, mask = pad_slides([(features, coords)])
    emb: torch.Tensor = model(feats, xy, mask)
    return emb


def hugging_face(config: PretrainedConfig) -> int:
    import longnet.hf

    name: str = longnet.hf.register()
    cache = longnet.hf.DilatedCache(config)
    return len(name) + cache.nbytes


def sequence_parallel(q: torch.Tensor) -> torch.Tensor:
    from longnet.parallel import dilated_attention, shard_sequence

    local = shard_sequence(q, 2)
    out: torch.Tensor = dilated_attention(local, local, local, segment_lengths=[8], dilation_rates=[1])
    return out

"""torchscale 4d1e0e8 LongNetEncoder / LongNetDecoder state dicts load into equal longnet models."""

from __future__ import annotations

import pytest
import torch
from gigapath_helpers import randomise_norms_and_biases
from torch import nn

from longnet.gigapath import encoder_from_torchscale, lm_from_torchscale
from longnet.models.checkpoint import CheckpointError

SEGMENTS, RATES = "[8, 16, 48]", "[1, 2, 4]"


def _randomise(model):
    torch.manual_seed(3)
    return randomise_norms_and_biases(model)


def _encoder_args(ts, **kw):
    args = dict(encoder_embed_dim=48, encoder_attention_heads=6, encoder_ffn_embed_dim=80,
                encoder_layers=2, flash_attention=True, segment_length=SEGMENTS, dilated_ratio=RATES)
    args.update(kw)
    return ts.EncoderConfig(**args)


@pytest.mark.parametrize("n", [1, 13, 45])
def test_encoder_matches_torchscale(torchscale_ref, n):
    args = _encoder_args(torchscale_ref)
    ref = _randomise(torchscale_ref.LongNetEncoder(args))
    ours = encoder_from_torchscale(ref.state_dict(), args)
    x = torch.randn(2, n, 48, dtype=torch.float64)
    with torch.no_grad():
        want = ref(src_tokens=None, token_embeddings=x)["encoder_out"]
        torch.testing.assert_close(ours(x), want, rtol=1e-10, atol=1e-10)
        # the paper's rule on the same weights differs (reported, not hidden)
        paper = encoder_from_torchscale(ref.state_dict(), vars(args), compat=None)
        if n > 8:
            assert (paper(x) - want).abs().max() > 1e-3


def test_encoder_padded_batch_matches_each_sequence_alone(torchscale_ref):
    args = _encoder_args(torchscale_ref)
    ref = _randomise(torchscale_ref.LongNetEncoder(args))
    ours = encoder_from_torchscale(ref.state_dict(), args)
    x = torch.randn(2, 30, 48, dtype=torch.float64)
    mask = torch.arange(30)[None] < torch.tensor([[30], [11]])
    with torch.no_grad():
        out = ours(x, mask)
        for i, n in enumerate((30, 11)):
            want = ref(src_tokens=None, token_embeddings=x[i:i + 1, :n])["encoder_out"]
            torch.testing.assert_close(out[i:i + 1, :n], want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("share", [False, True])
def test_decoder_matches_torchscale(torchscale_ref, share):
    args = torchscale_ref.DecoderConfig(
        decoder_embed_dim=48, decoder_attention_heads=6, decoder_ffn_embed_dim=80, decoder_layers=2,
        vocab_size=50, flash_attention=True, segment_length=SEGMENTS, dilated_ratio=RATES,
        share_decoder_input_output_embed=share)
    ref = _randomise(torchscale_ref.LongNetDecoder(args, embed_tokens=nn.Embedding(50, 48)))
    ours = lm_from_torchscale(ref.state_dict(), args)
    assert ours.config.tie_embeddings == share
    tokens = torch.randint(0, 50, (2, 41))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens).logits, ref(tokens)[0], rtol=1e-10, atol=1e-10)


def test_xpos_decoder_matches_torchscale(torchscale_ref):
    # torchscale computes XPos angles in float32 even in float64 models: float32 agreement
    args = torchscale_ref.DecoderConfig(
        decoder_embed_dim=48, decoder_attention_heads=4, decoder_ffn_embed_dim=80, decoder_layers=2,
        vocab_size=50, flash_attention=True, segment_length=SEGMENTS, dilated_ratio=RATES,
        xpos_rel_pos=True)
    ref = _randomise(torchscale_ref.LongNetDecoder(args, embed_tokens=nn.Embedding(50, 48)))
    ours = lm_from_torchscale(ref.state_dict(), args)
    assert ours.config.position == "xpos"
    tokens = torch.randint(0, 50, (1, 48))
    with torch.no_grad():
        want = ref(tokens)[0]
        assert (ours(tokens).logits - want).abs().max() < 1e-4 * want.abs().max()


def test_unsupported_or_mismatched_checkpoints_are_refused(torchscale_ref):
    args = _encoder_args(torchscale_ref)
    state = torchscale_ref.LongNetEncoder(args).state_dict()
    with pytest.raises(ValueError, match="deepnorm"):
        encoder_from_torchscale(state, {**vars(args), "deepnorm": True})
    with pytest.raises(ValueError, match="segment_length"):
        encoder_from_torchscale(state, {**vars(args), "segment_length": None})
    with pytest.raises(ValueError, match="segment_length .* is not a list"):
        encoder_from_torchscale(state, {**vars(args), "segment_length": "__import__('os')"})
    bad = dict(state)
    bad.pop("layers.1.ffn.fc1.weight")
    bad["embed_positions.weight"] = torch.zeros(3)
    with pytest.raises(CheckpointError, match=r"missing keys: blocks\.1\.ffn\.fc1\.weight.*unexpected keys: "
                                              r"embed_positions\.weight"):
        encoder_from_torchscale(bad, args)
    with pytest.raises(CheckpointError, match="embed_tokens"):
        lm_from_torchscale(state, {**vars(args)})

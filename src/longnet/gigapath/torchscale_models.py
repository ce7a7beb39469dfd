"""torchscale ``LongNetEncoder`` / ``LongNetDecoder`` checkpoints as longnet models.

A torchscale state dict does not say how it was configured, so the torchscale config comes with
it: the ``EncoderConfig`` / ``DecoderConfig`` object, or a dict of its fields (missing fields take
torchscale's defaults). The layers map one to one (:mod:`longnet.gigapath.keys`); options longnet's
blocks do not have (DeepNorm, post-LN, MoE, multiway, relative position buckets, embedding
LayerNorm or scaling, learned absolute positions) are refused with the option's name.

torchscale's XPos rotates interleaved channel pairs ``(2i, 2i + 1)`` and longnet's the halves
``(i, i + D/2)``: the query and key projections' rows are permuted within each head, which
leaves every score unchanged. (torchscale computes the XPos angles in float32 even for float64
models, so its XPos decoders agree with longnet to float32 rounding of the angles.)
"""

from __future__ import annotations

import ast
from typing import Any, Mapping

import torch

from longnet.gigapath.keys import load_strict, map_stack_key
from longnet.models.checkpoint import CheckpointError
from longnet.models.config import LongNetConfig
from longnet.models.encoder import LongNetEncoder
from longnet.models.lm import LongNetLM

__all__ = ["encoder_from_torchscale", "lm_from_torchscale", "longnet_config_from_torchscale"]

_DEFAULTS: dict[str, Any] = {
    "embed_dim": 768, "attention_heads": 12, "ffn_embed_dim": 3072, "layers": 12,
    "normalize_before": True, "normalize_output": True, "activation_fn": "gelu",
    "no_scale_embedding": True, "layernorm_embedding": False, "moe_freq": 0, "rel_pos_buckets": 0,
    "max_rel_pos": 0, "deepnorm": False, "subln": True, "multiway": False, "layernorm_eps": 1e-5,
    "xpos_rel_pos": False, "xpos_scale_base": 512, "segment_length": None, "dilated_ratio": None,
    "share_decoder_input_output_embed": False,
}


class _Args:
    def __init__(self, args, side: str):
        self.data = dict(args) if isinstance(args, Mapping) else dict(vars(args))
        self.side = side

    def get(self, name: str):
        for key in (f"{self.side}_{name}", name):
            if key in self.data:
                return self.data[key]
        return _DEFAULTS[name]


def _ints(name: str, value) -> tuple[int, ...]:
    if isinstance(value, str):
        try:
            value = ast.literal_eval(value)  # torchscale stores "[1024, 2048]"; never eval()
        except (ValueError, SyntaxError) as err:
            raise ValueError(f"torchscale config {name} {value!r} is not a list of ints") from err
    if value is None:
        raise ValueError(f"torchscale config {name} is required (LongNet's dilated attention)")
    return tuple(int(v) for v in value)


def longnet_config_from_torchscale(args, side: str, *, compat: str | None = "torchscale",
                                   vocab_size: int | None = None) -> LongNetConfig:
    """The :class:`LongNetConfig` of a torchscale ``side`` (``"encoder"`` or ``"decoder"``) config."""
    a = _Args(args, side)
    refused = {"deepnorm": True, "multiway": True, "layernorm_embedding": True,
               "normalize_before": False, "no_scale_embedding": False}
    for name, bad in refused.items():
        if bool(a.get(name)) == bad:
            raise ValueError(f"torchscale config {name}={a.get(name)!r} is not supported by longnet's blocks")
    for name in ("moe_freq", "rel_pos_buckets", "max_rel_pos"):
        if a.get(name):
            raise ValueError(f"torchscale config {name}={a.get(name)!r} is not supported (must be 0)")
    if side == "encoder" and not a.get("normalize_output"):
        raise ValueError("torchscale config normalize_output=False (no final LayerNorm) is not supported")
    if a.get("activation_fn") not in ("gelu", "relu"):
        raise ValueError(f"torchscale config activation_fn={a.get('activation_fn')!r}: "
                         f"longnet supports 'gelu' and 'relu'")
    xpos = bool(a.get("xpos_rel_pos"))
    if xpos and side == "encoder":
        raise ValueError("torchscale config xpos_rel_pos=True on an encoder is not supported")
    segments = _ints("segment_length", a.get("segment_length"))
    rates = _ints("dilated_ratio", a.get("dilated_ratio"))
    return LongNetConfig(
        vocab_size=vocab_size, embed_dim=int(a.get("embed_dim")),
        num_layers=int(a.get("layers")), num_heads=int(a.get("attention_heads")),
        ffn_dim=int(a.get("ffn_embed_dim")), segment_lengths=segments, dilation_rates=rates,
        position="xpos" if xpos else "none", xpos_scale_base=float(a.get("xpos_scale_base")),
        activation=a.get("activation_fn"), norm_eps=float(a.get("layernorm_eps")),
        sub_ln=bool(a.get("subln")), max_train_length=max(segments),
        tie_embeddings=bool(a.get("share_decoder_input_output_embed")),
        semantics="paper" if compat is None else "torchscale")


def _check_compat(compat) -> None:
    if compat not in ("torchscale", None):
        raise ValueError(f"compat must be 'torchscale' or None, got {compat!r}")


def _xpos_to_half_layout(state: dict[str, torch.Tensor], config: LongNetConfig) -> None:
    """Permute q/k projection rows per head from interleaved pairs to halves (in place)."""
    D, H = config.head_dim, config.num_heads
    perm = torch.cat((torch.arange(0, D, 2), torch.arange(1, D, 2)))
    want = (torch.arange(0, D, 2) + 0.4 * D) / (1.4 * D)
    for key in list(state):
        if key.endswith("self_attn.xpos.scale"):
            got = state.pop(key)
            if got.shape != want.shape or not torch.allclose(got.double(), want.double(), rtol=1e-6):
                raise CheckpointError(f"{key}: not torchscale's XPos scale for head dim {D}")
        elif any(key.endswith(f"self_attn.{p}_proj.{t}") for p in "qk" for t in ("weight", "bias")):
            v = state[key]
            state[key] = v.reshape(H, D, *v.shape[1:])[:, perm].reshape(v.shape)


def encoder_from_torchscale(state_dict: Mapping[str, torch.Tensor], args, *,
                            compat: str | None = "torchscale") -> LongNetEncoder:
    """A torchscale ``LongNetEncoder`` state dict (and its ``EncoderConfig`` or a dict of its
    fields) as a :class:`~longnet.LongNetEncoder` in eval mode.

    ``LongNetEncoder(embeddings)`` then equals torchscale's
    ``encoder(src_tokens=None, token_embeddings=embeddings)["encoder_out"]``.
    """
    _check_compat(compat)
    config = longnet_config_from_torchscale(args, "encoder", compat=compat)
    model = LongNetEncoder(config)
    load_strict(model, dict(state_dict), map_stack_key, "torchscale encoder state dict")
    return model.eval()


def _map_decoder_key(key: str) -> str | None:
    if key == "embed_tokens.weight":
        return "embed.weight"
    if key == "output_projection.weight":
        return "lm_head.weight"
    return map_stack_key(key)


def lm_from_torchscale(state_dict: Mapping[str, torch.Tensor], args, *,
                       compat: str | None = "torchscale") -> LongNetLM:
    """A torchscale ``LongNetDecoder`` state dict (built with ``embed_tokens``; its
    ``DecoderConfig`` or a dict of its fields) as a :class:`~longnet.LongNetLM` in eval mode.

    ``LongNetLM(tokens).logits`` then equals torchscale's ``decoder(tokens)[0]``.
    """
    _check_compat(compat)
    state = dict(state_dict)
    if "embed_tokens.weight" not in state:
        raise CheckpointError("torchscale decoder state dict: missing keys: embed_tokens.weight "
                              "(build the decoder with embed_tokens)")
    vocab = int(state["embed_tokens.weight"].shape[0])
    config = longnet_config_from_torchscale(args, "decoder", compat=compat, vocab_size=vocab)
    if config.tie_embeddings:  # one tensor under both names, as in torchscale's own state dict
        shared = state.setdefault("output_projection.weight", state["embed_tokens.weight"])
        if not torch.equal(shared, state["embed_tokens.weight"]):
            raise CheckpointError("share_decoder_input_output_embed=True but output_projection.weight "
                                  "differs from embed_tokens.weight")
    if config.position == "xpos":
        _xpos_to_half_layout(state, config)
    model = LongNetLM(config)
    load_strict(model, state, _map_decoder_key, "torchscale decoder state dict")
    return model.eval()

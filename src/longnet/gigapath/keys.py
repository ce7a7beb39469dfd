"""Parameter names: torchscale / Prov-GigaPath checkpoints -> longnet modules, strictly.

One torchscale layer (``EncoderLayer`` / ``DecoderLayer``, pre-LN with MAGNETO sub-LN) is one
:class:`~longnet.models.blocks.LongNetBlock`:

====================================  =====================
torchscale ``layers.{i}.``            longnet ``blocks.{i}.``
====================================  =====================
``self_attn_layer_norm``              ``attn_norm``
``self_attn.{q,k,v,out}_proj``        ``attn.{q,k,v,out}_proj``
``self_attn.inner_attn_ln``           ``attn.sub_ln``
``final_layer_norm``                  ``ffn_norm``
``ffn.fc1``, ``ffn.fc2``              ``ffn.fc1``, ``ffn.fc2``
``ffn.ffn_layernorm``                 ``ffn.sub_ln``
====================================  =====================

and the stack's final ``layer_norm`` is ``norm``. Any key that fits no rule, any expected key
that is absent and any shape that differs is an error that lists them all.
"""

from __future__ import annotations

import re
from typing import Callable, Mapping

import torch
from torch import nn

from longnet.models.checkpoint import CheckpointError

__all__ = ["LAYER_RULES", "map_stack_key", "map_slide_encoder_key", "load_strict"]

LAYER_RULES: dict[str, str] = {
    "self_attn_layer_norm": "attn_norm",
    "self_attn.q_proj": "attn.q_proj",
    "self_attn.k_proj": "attn.k_proj",
    "self_attn.v_proj": "attn.v_proj",
    "self_attn.out_proj": "attn.out_proj",
    "self_attn.inner_attn_ln": "attn.sub_ln",
    "final_layer_norm": "ffn_norm",
    "ffn.fc1": "ffn.fc1",
    "ffn.fc2": "ffn.fc2",
    "ffn.ffn_layernorm": "ffn.sub_ln",
}

_LAYER = re.compile(r"^layers\.(\d+)\.(.+)\.(weight|bias)$")


def map_stack_key(key: str) -> str | None:
    """A torchscale ``Encoder``/``Decoder`` stack key -> the longnet key, or ``None``."""
    m = _LAYER.match(key)
    if m:
        index, module, param = m.groups()
        ours = LAYER_RULES.get(module)
        return None if ours is None else f"blocks.{index}.{ours}.{param}"
    if key in ("layer_norm.weight", "layer_norm.bias"):
        return "norm." + key.rsplit(".", 1)[1]
    return None


def map_slide_encoder_key(key: str) -> str | None:
    """A Prov-GigaPath ``LongNetViT`` key -> the key of :class:`~longnet.gigapath.SlideEncoder`."""
    if key in ("cls_token", "norm.weight", "norm.bias"):
        return key
    if key in ("patch_embed.proj.weight", "patch_embed.proj.bias"):
        return "patch_embed." + key.rsplit(".", 1)[1]
    if key.startswith("encoder."):
        inner = map_stack_key(key[len("encoder."):])
        return None if inner is None else "encoder." + inner
    return None


def _listing(keys: list[str], limit: int = 12) -> str:
    more = f" (and {len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def load_strict(model: nn.Module, state: Mapping[str, torch.Tensor],
                mapper: Callable[[str], str | None] | None, source: str) -> None:
    """Map ``state``'s keys with ``mapper`` (``None``: keys are already longnet's) and load them
    into ``model``; raise :class:`CheckpointError` listing unknown, missing and mis-shaped keys."""
    mapped: dict[str, torch.Tensor] = {}
    unknown = []
    for k, v in state.items():
        ours = k if mapper is None else mapper(k)
        if ours is None:
            unknown.append(k)
        elif not isinstance(v, torch.Tensor):
            raise CheckpointError(f"{source}: {k} is a {type(v).__name__}, not a tensor")
        else:
            mapped[ours] = v
    expected = model.state_dict()
    missing = sorted(set(expected) - set(mapped))
    unexpected = sorted(unknown + [k for k in mapped if k not in expected])
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys: {_listing(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_listing(unexpected)}")
        raise CheckpointError(f"{source}: does not match the model; " + "; ".join(parts))
    wrong = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
             for k, v in mapped.items() if tuple(v.shape) != tuple(expected[k].shape)]
    if wrong:
        raise CheckpointError(f"{source}: shapes do not match the model: {_listing(wrong)}")
    not_float = [k for k, v in mapped.items() if not v.is_floating_point()]
    if not_float:
        raise CheckpointError(f"{source}: expected floating point tensors, got {_listing(not_float)}")
    dtypes = {v.dtype for v in mapped.values()}
    if len(dtypes) == 1:
        model.to(dtypes.pop())
    model.load_state_dict(mapped, strict=True)

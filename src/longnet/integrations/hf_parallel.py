"""What :func:`longnet.parallel.parallelize_sequence` sets on a transformers model.

A transformers causal LM with ``attn_implementation="dilated"`` becomes sequence parallel through
plain attributes read at forward time (no global state, nothing patched):

* every attention module (the ``self_attn`` of each decoder layer) gets
  ``longnet_attention_fn`` (the exact distributed operator over the group) and
  ``longnet_sequence_rank``; :func:`longnet.integrations.transformers.dilated_attention_forward`
  runs the operator when the first is set;
* every :class:`~longnet.integrations.hf_train.HFCausalLM` gets ``sequence_rank``, and passes
  ``position_ids = sequence_rank * n + arange(n)`` to the model, so RoPE rotates each chunk by its
  global positions. A bare transformers model has no such owner: its caller passes those
  ``position_ids`` (the attention function refuses others).

:func:`sequence_parallel_targets` finds the modules and refuses models that cannot run sequence
parallel (another attention implementation, attention dropout).
"""

from __future__ import annotations

from torch import nn
from transformers import PreTrainedModel

from longnet.integrations.hf_pattern import is_dilated_implementation, pattern_from_config
from longnet.integrations.hf_train import HFCausalLM

__all__ = ["sequence_parallel_targets"]


def sequence_parallel_targets(model: nn.Module) -> tuple[list[nn.Module], list[HFCausalLM]]:
    """The transformers attention modules inside ``model`` and the :class:`HFCausalLM` adapters
    that own their positions; ``([], [])`` when ``model`` holds no transformers model.

    Raises:
        ValueError: an attention module whose implementation is not longnet's dilated attention
            (naming the module and saying how to switch it), or with attention dropout.
    """
    roots = [m for m in model.modules() if isinstance(m, PreTrainedModel)]
    seen: set[int] = set()
    attention: list[tuple[str, nn.Module]] = []
    names = {id(m): name for name, m in model.named_modules()}
    for root in roots:
        for layer in root.modules():
            attn = getattr(layer, "self_attn", None)
            if isinstance(attn, nn.Module) and id(attn) not in seen:
                seen.add(id(attn))
                attention.append((names.get(id(attn), type(attn).__name__), attn))
    for name, attn in attention:
        config = getattr(attn, "config", None)
        impl = getattr(config, "_attn_implementation", None)
        if not is_dilated_implementation(impl):
            raise ValueError(f"{name} uses attention implementation {impl!r}, which cannot run sequence "
                             "parallel; switch the model to dilated attention first "
                             "(longnet.hf.register(); model.set_attn_implementation('dilated'), or wrap "
                             "it in HFCausalLM)")
        pattern_from_config(config)  # the config's own message when the pattern is missing
        dropout = float(getattr(attn, "attention_dropout", 0.0) or 0.0)
        if dropout:
            raise ValueError(f"{name} has attention dropout {dropout}, which sequence-parallel attention "
                             "does not apply; set config.attention_dropout = 0.0")
    owners = [m for m in model.modules() if isinstance(m, HFCausalLM)]
    return [attn for _, attn in attention], owners

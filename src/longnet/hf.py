"""Dilated attention as a Hugging Face transformers attention implementation.

Usage::

    import longnet.hf
    longnet.hf.register()                   # once per process; returns "dilated"
    config.segment_lengths = [2048, 4096]   # any transformers config (Llama, Mistral, Qwen2, ...)
    config.dilation_rates = [1, 2]
    model = AutoModelForCausalLM.from_config(config, attn_implementation="dilated")
    # or: model.set_attn_implementation("dilated") on a loaded model
    cache = longnet.hf.DilatedCache(model.config)   # bounded KV cache for generate
    model.generate(ids, attention_mask=mask, max_new_tokens=100, cache=cache); cache.nbytes

Needs the optional dependency: ``pip install 'longnet-torch[hf]'``. The code lives in
:mod:`longnet.integrations.transformers`.
"""

try:
    import transformers  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised in a subprocess test
    raise ImportError(
        "longnet.hf needs Hugging Face transformers (>= 5.24): pip install 'longnet-torch[hf]'"
    ) from exc
from packaging.version import Version  # noqa: E402  (a dependency of transformers)

if Version(transformers.__version__).release[:2] < (5, 24):
    raise ImportError(
        f"longnet.hf needs transformers >= 5.24 (found {transformers.__version__}): "
        "pip install -U 'longnet-torch[hf]'"
    )

from longnet.integrations.hf_cache import DilatedCache, cache_argument  # noqa: E402
from longnet.integrations.hf_pattern import pattern_from_config, registered_names  # noqa: E402
from longnet.integrations.transformers import (  # noqa: E402
    dilated_attention_forward,
    dilated_attention_mask,
    register,
    unregister,
)

__all__ = [
    "DilatedCache",
    "cache_argument",
    "register",
    "unregister",
    "registered_names",
    "pattern_from_config",
    "dilated_attention_forward",
    "dilated_attention_mask",
]

"""longnet.integrations: other ecosystems, each behind an optional dependency.

* :mod:`longnet.integrations.transformers` (needs ``transformers>=5``; public face
  :mod:`longnet.hf`): dilated attention as a transformers attention implementation.
* :mod:`longnet.integrations.hf_cache` (needs ``transformers``): :class:`DilatedCache`, a bounded
  KV cache for ``generate`` with dilated attention.
* :mod:`longnet.integrations.hf_pattern` (needs ``transformers``): what the two modules above
  share (the pattern of a config, the registered names), so that neither imports the other's
  functions back.
* :mod:`longnet.integrations.hf_train` (needs ``transformers``): the adapter behind
  ``longnet train --hf-model`` (fine-tuning a transformers causal LM with dilated attention).
* :mod:`longnet.ops.dilated_rows` (torch only): exact dilated attention for the last rows
  of a sequence, used for decoding over a full KV cache.

Importing this package imports no optional dependency.
"""

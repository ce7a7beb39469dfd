"""longnet: LongNet (Ding et al., 2023) in PyTorch.

Exact dilated attention (:func:`dilated_attention`), LongNet models, a sequence-parallel trainer
and the tools to train, evaluate, generate and benchmark with them.
"""

__version__ = "0.1.0"

from longnet.models import CheckpointError, DilatedKVCache, LMOutput, LongNetConfig, LongNetEncoder, LongNetLM
from longnet.nn.attention import DilatedAttention
from longnet.nn.multihead import MultiheadDilatedAttention
from longnet.ops.dilated import dilated_attention
from longnet.ops.pattern import DilatedPattern

__all__ = ["__version__", "DilatedPattern", "dilated_attention", "DilatedAttention"]
__all__ += ["MultiheadDilatedAttention", "LongNetConfig", "LongNetLM", "LMOutput",
            "LongNetEncoder", "CheckpointError"]
__all__ += ["DilatedKVCache"]

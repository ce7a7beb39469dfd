"""LongNet models: configuration and presets, the decoder LM, the encoder, checkpoint files."""

from longnet.models.cache import DilatedKVCache
from longnet.models.checkpoint import CheckpointError
from longnet.models.config import PRESETS, LongNetConfig
from longnet.models.encoder import LongNetEncoder
from longnet.models.lm import LMOutput, LongNetLM

__all__ = ["CheckpointError", "LongNetConfig", "PRESETS", "LongNetLM", "LMOutput",
           "LongNetEncoder", "DilatedKVCache"]

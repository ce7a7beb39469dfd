"""Prov-GigaPath's slide encoder and torchscale LongNet checkpoints on longnet.

- :func:`load_slide_encoder`: ``slide_encoder.pth`` -> :class:`SlideEncoder`, the released
  model's outputs on CPU or GPU, batched, without flash-attn (``compat="torchscale"``), or the
  paper's dilated attention on the same weights (``compat=None``).
- :func:`convert_checkpoint`: the same weights as one safetensors file.
- :func:`encoder_from_torchscale`, :func:`lm_from_torchscale`: torchscale ``LongNetEncoder`` /
  ``LongNetDecoder`` state dicts as :class:`~longnet.LongNetEncoder` / :class:`~longnet.LongNetLM`.
"""

from longnet.gigapath.checkpoint import convert_checkpoint, load_slide_encoder, read_checkpoint
from longnet.gigapath.model import SlideEncoder, SlideEncoderConfig
from longnet.gigapath.positions import SlidePositions
from longnet.gigapath.slides import pad_slides
from longnet.gigapath.torchscale_models import encoder_from_torchscale, lm_from_torchscale

__all__ = ["load_slide_encoder", "convert_checkpoint", "read_checkpoint", "SlideEncoder",
           "SlideEncoderConfig", "SlidePositions", "pad_slides", "encoder_from_torchscale",
           "lm_from_torchscale"]

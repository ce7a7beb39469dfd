"""Other libraries' attention rules on longnet's kernels, so their checkpoints give their outputs.

- :func:`torchscale_dilated_attention`: dilated attention as Microsoft's torchscale computes it
  (Prov-GigaPath's slide encoder and other torchscale LongNet checkpoints), with
  :func:`torchscale_head_offset` (its head-to-offset rule) and :func:`check_torchscale_length`
  (the lengths where torchscale's outputs stay in place). Modules select it with
  ``semantics="torchscale"`` (:class:`~longnet.MultiheadDilatedAttention`, ``LongNetConfig``).

This package sits between :mod:`longnet.ops` (which it builds on) and :mod:`longnet.nn` (which
dispatches to it); it imports nothing above ``ops``.
"""

from longnet.interop.torchscale import check_torchscale_length, torchscale_dilated_attention, torchscale_head_offset

__all__ = ["torchscale_dilated_attention", "torchscale_head_offset", "check_torchscale_length"]

"""Training defaults that differ by model family or preset (read by the config's help and by
the model families that apply them)."""

from __future__ import annotations

from typing import Any

PRESET_DEFAULTS: dict[str, dict[str, Any]] = {
    # CPU-sized: a small token batch and a higher peak rate so a few hundred steps learn something
    "tiny": {"lr": 2e-3, "batch_tokens": 4096},
    "small": {"lr": 1e-3, "batch_tokens": 65_536},
}
"""Per-preset defaults that differ from the paper's recipe (its learning rate and 0.5M-token batches)."""
HF_LR = 2e-5
"""Default peak rate when fine-tuning a Hugging Face model (``--hf-model``)."""

"""Pretrained-model files: ``model.safetensors`` (weights) + ``config.json`` (configuration).

No pickle anywhere. Each file is written atomically (:mod:`longnet.utils.atomic`), so a reader
never sees a half-written file. Tied parameters are
stored once (the tied copy, e.g. ``lm_head.weight``, is left out) and re-tied by the model's own
constructor on load. Anything that does not fit the model the config describes raises
:class:`CheckpointError` naming the file and the problem.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from longnet.models.config import LongNetConfig
from longnet.utils.atomic import atomic_save, atomic_write_json

__all__ = ["CheckpointError", "save_model", "read_config", "load_weights", "WEIGHTS_NAME", "CONFIG_NAME"]

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt, truncated or does not match its model."""


def save_model(model: torch.nn.Module, directory: str | os.PathLike, *, model_type: str,
               config: LongNetConfig, extra: dict[str, Any], tied: tuple[str, ...]) -> Path:
    """Write ``model``'s weights (minus the ``tied`` copies) and config into ``directory``."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()
             if k not in tied}
    if any(t.device.type == "meta" for t in model.state_dict().values()):
        raise ValueError("cannot save a model whose parameters are on the meta device")
    meta = {"format": "pt", "model_type": model_type, "format_version": str(FORMAT_VERSION)}
    atomic_save(out / WEIGHTS_NAME, lambda p: save_file(state, p, metadata=meta))
    doc = {"model_type": model_type, "format_version": FORMAT_VERSION,
           "config": config.to_dict(), "extra": extra}
    atomic_write_json(out / CONFIG_NAME, doc, indent=2)
    return out


def read_config(directory: str | os.PathLike, model_type: str) -> tuple[LongNetConfig, dict]:
    """``(config, extra)`` from ``directory/config.json``, checked to hold a ``model_type``."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(doc, dict) or not {"model_type", "config"} <= set(doc):
        raise CheckpointError(f"{path}: expected an object with 'model_type' and 'config'")
    if doc["model_type"] != model_type:
        raise CheckpointError(f"{path}: holds a {doc['model_type']!r}, not a {model_type!r}")
    if doc.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {doc.get('format_version')!r} is not "
                              f"{FORMAT_VERSION}")
    try:
        config = LongNetConfig.from_dict(doc["config"])
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: invalid config ({err})") from err
    extra = doc.get("extra", {})
    if not isinstance(extra, dict):
        raise CheckpointError(f"{path}: 'extra' must be an object")
    return config, extra


def load_weights(model: torch.nn.Module, directory: str | os.PathLike,
                 tied: tuple[str, ...]) -> None:
    """Load ``directory/model.safetensors`` into ``model``, refusing any mismatch."""
    path = Path(directory) / WEIGHTS_NAME
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        state = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, RuntimeError, ValueError) as err:
        raise CheckpointError(f"{path}: unreadable or corrupt safetensors file ({err})") from err
    expected = {k: v for k, v in model.state_dict().items() if k not in tied}
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        raise CheckpointError(f"{path}: does not match the model of config.json: "
                              f"missing keys {missing[:8]}{'...' if len(missing) > 8 else ''}, "
                              f"unexpected keys {extra[:8]}{'...' if len(extra) > 8 else ''}")
    wrong = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
             for k, v in expected.items() if tuple(state[k].shape) != tuple(v.shape)]
    if wrong:
        raise CheckpointError(f"{path}: shapes do not match the model of config.json: "
                              + "; ".join(wrong[:8]))
    bad_dtype = [k for k, v in state.items() if v.is_floating_point() != expected[k].is_floating_point()]
    if bad_dtype:
        raise CheckpointError(f"{path}: wrong dtype kind for {bad_dtype[:8]}")
    float_dtypes = {v.dtype for v in state.values() if v.is_floating_point()}
    if len(float_dtypes) == 1:
        model.to(float_dtypes.pop())
    result = model.load_state_dict(state, strict=False)
    left = sorted(set(result.missing_keys) - set(tied))
    if left or result.unexpected_keys:  # cannot happen after the checks above
        raise CheckpointError(f"{path}: load_state_dict left {left} / {result.unexpected_keys}")

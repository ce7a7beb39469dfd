"""Load Prov-GigaPath's ``slide_encoder.pth``, and convert it to one safetensors file.

``slide_encoder.pth`` is ``{"model": state_dict}`` written by ``torch.save``; it is read with
``torch.load(..., weights_only=True)``, which refuses any pickled object that is not plain tensors
and containers (a pickle that carries code is refused, never run). The architecture (width,
depth, tile-feature width, FFN width) is read from the tensors' shapes; the head count is not in
the file (16 in every released model).

:func:`convert_checkpoint` writes the weights under longnet's names into one ``.safetensors``
file whose metadata holds the :class:`~longnet.gigapath.model.SlideEncoderConfig` (no pickle).
"""

from __future__ import annotations

import json
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Mapping

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from longnet.gigapath.keys import load_strict, map_slide_encoder_key
from longnet.gigapath.model import SlideEncoder, SlideEncoderConfig
from longnet.models.checkpoint import CheckpointError, verify_weights
from longnet.utils.atomic import atomic_save

__all__ = ["load_slide_encoder", "convert_checkpoint", "read_checkpoint", "FORMAT"]

FORMAT = "longnet-gigapath-slide-encoder"
_LAYER = re.compile(r"^encoder\.layers\.(\d+)\.")


def unpickle_reason(err: Exception) -> str:
    """The useful line of torch's weights_only refusal (e.g. ``Unsupported global: posix.system``)."""
    lines = [x.strip() for x in str(err).splitlines() if x.strip()]
    for i, line in enumerate(lines):
        if line.startswith("WeightsUnpickler error"):
            rest = line.split(":", 1)[1].strip()
            return rest or (lines[i + 1] if i + 1 < len(lines) else line)
        if "GLOBAL" in line or "Unsupported" in line:
            return line
    return lines[0] if lines else type(err).__name__


def _read_pickle(path: Path) -> Mapping[str, torch.Tensor]:
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{path}: refused to unpickle ({unpickle_reason(err)}): torch.load(weights_only=True) "
            f"only reads tensors and plain containers and never runs code from a file; this "
            f"file is not a plain state dict (or is not a torch checkpoint at all)") from err
    except (RuntimeError, OSError, EOFError, zipfile.BadZipFile, ValueError) as err:
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({err})") from err
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]  # the released layout: {"model": state_dict}
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a state dict (or {{'model': state_dict}}), "
                              f"got {type(obj).__name__}")
    return obj


def read_checkpoint(source, *, verify: bool = True) -> tuple[dict[str, torch.Tensor], SlideEncoderConfig | None]:
    """``(state, config)``: GigaPath-named tensors with ``config=None``, or a converted file's
    longnet-named tensors and its config.

    ``verify``: a file is checked by :func:`longnet.models.checkpoint.verify_weights` (against
    a ``manifest.json`` beside it that lists it, and every tensor finite)."""
    if isinstance(source, Mapping):
        return dict(source), None
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"checkpoint must be a path or a state dict, got {type(source).__name__}")
    path = Path(source)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    state, config = _read_file(path)
    if verify:
        verify_weights({k: v for k, v in state.items() if isinstance(v, torch.Tensor)}, path, companions=())
    return state, config


def _read_file(path: Path) -> tuple[dict[str, torch.Tensor], SlideEncoderConfig | None]:
    if path.suffix != ".safetensors":
        return dict(_read_pickle(path)), None
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, RuntimeError, ValueError) as err:
        raise CheckpointError(f"{path}: unreadable safetensors file ({err})") from err
    if meta.get("format") != FORMAT:
        return state, None  # GigaPath's keys saved as safetensors
    try:
        config = SlideEncoderConfig.from_dict(json.loads(meta["config"]))
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: invalid slide encoder config in the metadata ({err})") from err
    return state, config


def _infer_config(state: Mapping[str, torch.Tensor], num_heads: int, source: str) -> SlideEncoderConfig:
    needed = ("cls_token", "patch_embed.proj.weight", "encoder.layers.0.ffn.fc1.weight")
    absent = [k for k in needed if k not in state or not isinstance(state[k], torch.Tensor)]
    if absent:
        raise CheckpointError(f"{source}: not a Prov-GigaPath slide encoder: missing keys {absent}")
    layers = {int(m.group(1)) for k in state if (m := _LAYER.match(k))}
    try:
        return SlideEncoderConfig(
            in_dim=int(state["patch_embed.proj.weight"].shape[1]),
            embed_dim=int(state["cls_token"].shape[-1]), depth=max(layers) + 1,
            num_heads=num_heads, ffn_dim=int(state["encoder.layers.0.ffn.fc1.weight"].shape[0]))
    except (ValueError, IndexError) as err:
        raise CheckpointError(f"{source}: unexpected tensor shapes ({err})") from err


def load_slide_encoder(checkpoint, *, compat: str | None = "torchscale", num_heads: int = 16,
                       global_pool: bool = False, device=None, dtype: torch.dtype | None = None,
                       verify: bool = True) -> SlideEncoder:
    """Prov-GigaPath's slide encoder with the weights of ``checkpoint``, in eval mode.

    Args:
        checkpoint: ``slide_encoder.pth`` (or any ``torch.save`` of the state dict, bare or under
            ``"model"``), a file written by :func:`convert_checkpoint`, or a state dict.
        compat: ``"torchscale"`` gives the released model's outputs (to float rounding);
            ``None`` runs the paper's dilated attention on the same weights (for fine-tuning).
        num_heads: attention heads (not stored in the file; 16 for every released model).
        global_pool: default pooling of :meth:`SlideEncoder.forward`.
        device, dtype: where and in what dtype to put the model (default: CPU, the file's dtype).
        verify: check a file against a ``manifest.json`` beside it that lists it (SHA-256) and
            refuse non-finite weights (:func:`longnet.models.checkpoint.verify_weights`); it
            costs one more read and hash of the file and one pass over the weights.

    Raises:
        CheckpointError: (a ``ValueError``, :class:`~longnet.CheckpointError`) naming the file and
            every missing, unexpected or mis-shaped key, a non-finite tensor, or a refused pickle.
    """
    name = "state dict" if isinstance(checkpoint, Mapping) else str(checkpoint)
    state, config = read_checkpoint(checkpoint, verify=verify)
    mapper = None
    if config is None:
        config = _infer_config(state, num_heads, name)
        mapper = map_slide_encoder_key
    config.compat, config.global_pool = compat, bool(global_pool)
    config = SlideEncoderConfig.from_dict(config.to_dict())  # validate compat
    model = SlideEncoder(config)
    load_strict(model, state, mapper, name)
    return model.to(device=device, dtype=dtype).eval()


def convert_checkpoint(checkpoint, destination: str | os.PathLike, *, num_heads: int = 16) -> Path:
    """Write ``checkpoint`` (see :func:`load_slide_encoder`) as one ``.safetensors`` file.

    The weights are checked by loading them first; the file is written atomically.
    """
    dest = Path(destination)
    if dest.suffix != ".safetensors":
        raise ValueError(f"destination must end in .safetensors, got {dest}")
    model = load_slide_encoder(checkpoint, num_heads=num_heads)
    meta = {"format": FORMAT, "config": json.dumps(model.config.to_dict())}
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    dest.parent.mkdir(parents=True, exist_ok=True)
    return atomic_save(dest, lambda tmp: save_file(state, tmp, metadata=meta))

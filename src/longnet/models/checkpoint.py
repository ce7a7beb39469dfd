"""Pretrained-model files: ``model.safetensors`` (weights) + ``config.json`` (configuration).

Every load verifies what it read with :func:`verify_weights`, the one rule all loaders share
(``from_pretrained``, ``longnet eval`` / ``generate`` / ``slide-embed``, the Hugging Face
adapter): the files are checked against ``manifest.json`` (size and SHA-256, written by the
trainer into each checkpoint and the top of its run folder) when the folder has one, and every
floating-point tensor must be finite. No pickle anywhere. Each file is written atomically
(:mod:`longnet.utils.atomic`), so a reader never sees a half-written file. Tied parameters are
stored once (the tied copy, e.g. ``lm_head.weight``, is left out) and re-tied by the model's own
constructor on load. Anything that does not fit the model the config describes raises
:class:`CheckpointError` naming the file and the problem.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from longnet.models.config import LongNetConfig
from longnet.utils.atomic import atomic_save, atomic_write_json

__all__ = ["CheckpointError", "save_model", "read_config", "load_weights", "verify_weights",
           "check_manifest", "check_finite", "build_manifest", "file_sha256", "WEIGHTS_NAME",
           "CONFIG_NAME", "MANIFEST_FILE"]

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
MANIFEST_FILE = "manifest.json"
FORMAT_VERSION = 1
MANIFEST_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt, truncated or does not match its model."""


def save_model(model: torch.nn.Module, directory: str | os.PathLike, *, model_type: str,
               config: LongNetConfig, extra: dict[str, Any], tied: tuple[str, ...],
               state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write ``model``'s weights (minus the ``tied`` copies) and config into ``directory``.

    ``state_dict``: the weights to write instead of ``model.state_dict()`` (the full weights
    gathered from shards)."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    source = model.state_dict() if state_dict is None else state_dict
    state = {k: v.detach().to("cpu").contiguous() for k, v in source.items() if k not in tied}
    if any(t.device.type == "meta" for t in source.values()):
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


# ------------------------------------------------------------------------------ verification
def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of the file at ``path`` (hex), read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def build_manifest(folder: str | os.PathLike, names: Iterable[str] | None = None) -> dict[str, Any]:
    """The ``manifest.json`` document of ``folder``: size and SHA-256 of ``names`` (relative
    paths), or of every file below it but the manifest itself when ``names`` is None."""
    folder = Path(folder)
    if names is None:
        names = [p.relative_to(folder).as_posix() for p in sorted(folder.rglob("*"))
                 if p.is_file() and p.name != MANIFEST_FILE]
    files = {name: {"bytes": (folder / name).stat().st_size, "sha256": file_sha256(folder / name)}
             for name in names}
    return {"format_version": MANIFEST_VERSION, "files": files}


def read_manifest(folder: str | os.PathLike) -> dict[str, dict] | None:
    """The ``files`` entries of ``folder/manifest.json``; None when the folder has no manifest."""
    path = Path(folder) / MANIFEST_FILE
    if not path.exists():
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: checkpoint manifest is corrupt or truncated "
                              f"({err.__class__.__name__})") from err
    files = doc.get("files") if isinstance(doc, dict) else None
    if not isinstance(files, dict) or not files or not all(isinstance(e, dict) for e in files.values()):
        raise CheckpointError(f"{path}: not a checkpoint manifest")
    return files


def check_manifest(folder: str | os.PathLike, names: Iterable[str] | None = None) -> bool:
    """Check files of ``folder`` against its ``manifest.json``: size, then SHA-256.

    ``names``: the files to check (those the manifest does not list are skipped); None checks
    every file it lists. Returns False when the folder has no manifest (nothing was checked).
    Raises :class:`CheckpointError` naming the first file that is missing, torn or changed.
    """
    folder = Path(folder)
    files = read_manifest(folder)
    if files is None:
        return False
    wanted = list(files) if names is None else [n for n in names if n in files]
    for name in wanted:
        entry, file = files[name], folder / name
        if not file.is_file():
            raise CheckpointError(f"{file}: file listed in the manifest is missing")
        size = file.stat().st_size
        if size != entry.get("bytes"):
            raise CheckpointError(f"{file}: torn or changed on disk ({size:,} bytes, the manifest "
                                  f"says {entry.get('bytes')!r})")
        if file_sha256(file) != entry.get("sha256"):
            raise CheckpointError(f"{file}: corrupted on disk (SHA-256 differs from "
                                  f"{folder / MANIFEST_FILE})")
    return True


def check_finite(state: Mapping[str, torch.Tensor], source: str | os.PathLike) -> None:
    """:class:`CheckpointError` naming ``source`` and the first tensor of ``state`` (in its
    order) holding a NaN or an infinity; tensors that are not floating point are skipped."""
    for name, tensor in state.items():
        if tensor.is_floating_point() and not _all_finite(tensor):
            count = int((~torch.isfinite(tensor)).sum())
            raise CheckpointError(f"{source}: tensor {name!r} holds {count:,} non-finite value(s) "
                                  "(NaN or inf): the file is corrupt, or was saved from a diverged model")


def _all_finite(tensor: torch.Tensor) -> bool:
    """Whether every value is finite. A finite sum proves it (a NaN or an infinity makes the sum
    NaN or infinite) at a fraction of ``isfinite`` 's cost; only a sum that overflows, or a tensor
    that is really bad, takes the element-wise check."""
    return bool(torch.isfinite(tensor.sum())) or bool(torch.isfinite(tensor).all())


def verify_weights(state: Mapping[str, torch.Tensor], weights: str | os.PathLike,
                   companions: Iterable[str] = (CONFIG_NAME,)) -> None:
    """The check every loader runs on the weights it read (one rule for all of them).

    ``weights`` is the file ``state`` was read from. When its folder holds ``manifest.json``
    (checkpoints and run folders written by ``longnet train``), that file and ``companions``
    (other files of the folder the loader reads, e.g. ``config.json``) are checked against it,
    size then SHA-256; then every floating-point tensor of ``state`` must be finite.

    Cost: one more read of the files plus SHA-256 (about 0.8 GB/s on one core) and one sum per
    tensor: +0.7 s on a 2.3 s load of the ``base`` preset (495 MB), +0.13 s on 0.26 s for
    ``small`` (``docs/design.md``, "Verified loads"). Loaders skip it with ``verify=False``.

    Raises:
        CheckpointError: naming the file that differs from the manifest, or the file and the
            first tensor that is not finite.
    """
    weights = Path(weights)
    check_manifest(weights.parent, [weights.name, *companions])
    check_finite(state, weights)


# ------------------------------------------------------------------------------------ load
def load_weights(model: torch.nn.Module, directory: str | os.PathLike,
                 tied: tuple[str, ...], *, verify: bool = True) -> None:
    """Load ``directory/model.safetensors`` into ``model``, refusing any mismatch.

    ``verify``: run :func:`verify_weights` (manifest hashes when present, finite tensors).
    """
    path = Path(directory) / WEIGHTS_NAME
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        state = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, RuntimeError, ValueError) as err:
        raise CheckpointError(f"{path}: unreadable or corrupt safetensors file ({err})") from err
    if verify:
        verify_weights(state, path)
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

"""Slides as tensors: batching slides of different lengths, reading tile-feature files.

A feature file holds one slide: ``features`` (N, D) and ``coords`` (N, 2), level-0 pixel (x, y).
``.pt`` files are ``torch.save`` of a dict with those keys (read with ``weights_only=True``);
``.h5`` files have datasets of those names (the layout of the common pathology feature extractors,
a leading batch axis of 1 is allowed), read with ``h5py`` (``pip install longnet-torch[gigapath]``).
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch

from longnet.gigapath.checkpoint import unpickle_reason

__all__ = ["pad_slides", "read_slide", "SlideFileError", "SUFFIXES"]

SUFFIXES = (".pt", ".pth", ".h5", ".hdf5")


class SlideFileError(ValueError):
    """A feature file that cannot be used (names the file and the problem)."""


def pad_slides(slides: list[tuple[torch.Tensor, torch.Tensor]]):
    """``[(features (N_i, D), coords (N_i, 2)), ...]`` -> ``(features (B, N, D), coords (B, N, 2),
    key_padding_mask (B, N))`` with N = max N_i, real tiles first (True) and zeros after."""
    if not slides:
        raise ValueError("slides must not be empty")
    n = max(f.shape[0] for f, _ in slides)
    D = slides[0][0].shape[1]
    feats = slides[0][0].new_zeros(len(slides), n, D)
    coords = slides[0][1].new_zeros(len(slides), n, 2)
    mask = torch.zeros(len(slides), n, dtype=torch.bool)
    for i, (f, c) in enumerate(slides):
        if f.dim() != 2 or f.shape[1] != D or c.shape != (f.shape[0], 2):
            raise ValueError(f"slide {i}: features (N, {D}) and coords (N, 2) expected, got "
                             f"{tuple(f.shape)} and {tuple(c.shape)}")
        feats[i, :f.shape[0]] = f
        coords[i, :f.shape[0]] = c.to(coords.dtype)
        mask[i, :f.shape[0]] = True
    return feats, coords, mask.to(feats.device)


def _read_pt(path: Path):
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise SlideFileError(f"{path}: refused to unpickle ({unpickle_reason(err)}); a .pt feature file must "
                             f"hold plain tensors (read with weights_only=True)") from err
    except (RuntimeError, OSError, EOFError, zipfile.BadZipFile, ValueError) as err:
        raise SlideFileError(f"{path}: not a readable torch file ({err})") from err
    if not isinstance(obj, dict) or "features" not in obj or "coords" not in obj:
        raise SlideFileError(f"{path}: expected a dict with 'features' and 'coords'")
    return obj["features"], obj["coords"]


def _read_h5(path: Path):
    try:
        import h5py
    except ImportError as err:
        raise SlideFileError(f"{path}: reading .h5 files needs h5py "
                             f"(pip install 'longnet-torch[gigapath]')") from err
    try:
        with h5py.File(path, "r") as f:
            missing = [k for k in ("features", "coords") if k not in f]
            if missing:
                raise SlideFileError(f"{path}: missing datasets {missing} (has {sorted(f.keys())})")
            return tuple(_h5_array(path, f, name, h5py) for name in ("features", "coords"))
    except OSError as err:
        raise SlideFileError(f"{path}: not a readable HDF5 file ({err})") from err


def _h5_array(path: Path, f, name: str, h5py) -> torch.Tensor:
    """Dataset ``name`` of an open HDF5 file as a tensor; a group, a scalar or non-numeric values
    (strings, compound records) are this file's error, not the run's."""
    obj = f[name]
    if not isinstance(obj, h5py.Dataset):
        raise SlideFileError(f"{path}: '{name}' is an HDF5 {type(obj).__name__.lower()}, not a dataset")
    if obj.ndim == 0 or obj.dtype.kind not in "fiub":
        raise SlideFileError(f"{path}: '{name}' must be an array of numbers, got {obj.dtype} {obj.shape}")
    try:
        return torch.from_numpy(obj[()])
    except TypeError as err:  # numeric kinds torch has no dtype for
        raise SlideFileError(f"{path}: '{name}' holds {obj.dtype} values, which torch cannot read") from err


def read_slide(path: str | Path, feature_dim: int | None = None):
    """``(features (N, D) float, coords (N, 2))`` of one slide file; raises :class:`SlideFileError`."""
    path = Path(path)
    if path.suffix not in SUFFIXES:
        raise SlideFileError(f"{path}: unknown file type (expected one of {', '.join(SUFFIXES)})")
    feats, coords = _read_h5(path) if path.suffix in (".h5", ".hdf5") else _read_pt(path)
    for name, t in (("features", feats), ("coords", coords)):
        if not isinstance(t, torch.Tensor):
            raise SlideFileError(f"{path}: {name} is a {type(t).__name__}, not an array")
    if feats.dim() == 3 and feats.shape[0] == 1:
        feats = feats[0]
    if coords.dim() == 3 and coords.shape[0] == 1:
        coords = coords[0]
    if feats.dim() != 2 or not feats.is_floating_point():
        raise SlideFileError(f"{path}: features must be a (tiles, dim) float array, got "
                             f"{feats.dtype} {tuple(feats.shape)}")
    if feature_dim is not None and feats.shape[1] != feature_dim:
        raise SlideFileError(f"{path}: features have width {feats.shape[1]}, the model takes {feature_dim}")
    if coords.dim() != 2 or coords.shape != (feats.shape[0], 2):
        raise SlideFileError(f"{path}: coords must be ({feats.shape[0]}, 2) to match the features, got "
                             f"{tuple(coords.shape)}")
    if feats.shape[0] == 0:
        raise SlideFileError(f"{path}: the slide has no tiles")
    if not bool(torch.isfinite(feats).all()):
        raise SlideFileError(f"{path}: features contain NaN or inf")
    return feats, coords

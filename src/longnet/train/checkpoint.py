"""Run-folder checkpoints, written so that a crash never leaves a torn one as the latest.

Layout of a run folder ``RUN``::

    run.json                  the run's settings (written once, at the start)
    latest.json               {"step": N, "checkpoint": "checkpoints/step-0000000N"}: the newest
                              *complete* checkpoint; replaced atomically after it is complete
    model.safetensors         copies of the latest checkpoint's model and tokenizer, so that
    config.json               ``LongNetLM.from_pretrained(RUN)`` loads the run folder itself
    tokenizer.json
    checkpoints/step-.../     model.safetensors, config.json (``save_pretrained`` format),
                              tokenizer.json, optimizer.safetensors (AdamW moments),
                              rng.safetensors (torch RNG states), trainer_state.json (step,
                              tokens seen, optimizer hyper-parameters, data sampler position)

A checkpoint is written into ``checkpoints/.tmp-step-...``, every file is fsynced, the folder is
renamed to its final name, and only then ``latest.json`` is replaced (an atomic ``os.replace``).
Older checkpoints are deleted after that, so the previous checkpoint survives until the new one
is complete. No pickle is used: tensors go to safetensors, everything else to JSON.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from longnet.models import CheckpointError
from longnet.utils.atomic import atomic_copy, atomic_write_json, file_mode, fsync_dir, fsync_file

FORMAT_VERSION = 1
LATEST_FILE = "latest.json"
CHECKPOINTS_DIR = "checkpoints"
TOP_LEVEL_FILES = ("model.safetensors", "config.json", "tokenizer.json")
OPTIMIZER_FILE = "optimizer.safetensors"
RNG_FILE = "rng.safetensors"
STATE_FILE = "trainer_state.json"


@dataclass
class TrainerCheckpoint:
    """What :func:`load_trainer_checkpoint` returns (the model is loaded separately)."""

    path: Path
    """The checkpoint folder (``RUN/checkpoints/step-...``)."""
    step: int
    """Optimizer steps completed."""
    state: dict[str, Any]
    """The content of ``trainer_state.json``."""
    optimizer: dict[str, Any]
    """An ``optimizer.load_state_dict`` argument."""
    rng: dict[str, torch.Tensor]
    """``"cpu"`` and ``"cuda:<i>"`` RNG states."""


# ------------------------------------------------------------------------------------- files
def read_json(path: Path, what: str) -> Any:
    """Parse ``path`` or raise :class:`CheckpointError` naming ``what`` it should be."""
    if not path.is_file():
        raise CheckpointError(f"{path}: {what} not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: {what} is corrupt or truncated ({err.__class__.__name__})") from err


# ---------------------------------------------------------------------- optimizer <-> files
def optimizer_to_files(state_dict: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer ``state_dict`` into tensors (safetensors) and JSON-safe values."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, param_state in state_dict["state"].items():
        for key, value in param_state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{key}"] = value.detach().to("cpu").contiguous()
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def optimizer_from_files(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`optimizer_to_files`."""
    state: dict[int, dict[str, Any]] = {}
    for name, tensor in tensors.items():
        _, index, key = name.split(".", 2)
        state.setdefault(int(index), {})[key] = tensor
    for index, values in meta.get("scalars", {}).items():
        state.setdefault(int(index), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_states() -> dict[str, torch.Tensor]:
    """The torch CPU RNG state and every CUDA device's."""
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            states[f"cuda:{i}"] = s
    return states


def restore_rng_states(states: dict[str, torch.Tensor]) -> None:
    """Set the RNG states saved by :func:`rng_states` (CUDA ones when the devices exist)."""
    torch.set_rng_state(states["cpu"])
    cuda = sorted((k for k in states if k.startswith("cuda:")), key=lambda k: int(k.split(":")[1]))
    if cuda and torch.cuda.is_available() and torch.cuda.device_count() >= len(cuda):
        torch.cuda.set_rng_state_all([states[k] for k in cuda])


# ------------------------------------------------------------------------------- save/load
def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def save_trainer_checkpoint(
    run_dir: Path,
    *,
    step: int,
    write_model: Callable[[Path], None],
    write_tokenizer: Callable[[Path], None],
    optimizer_state: dict[str, Any],
    trainer_state: dict[str, Any],
    keep: int = 1,
) -> Path:
    """Write a complete checkpoint of ``step`` into ``run_dir`` and make it the latest.

    ``write_model(folder)`` writes ``model.safetensors`` + ``config.json`` (``save_pretrained``)
    and ``write_tokenizer(folder)`` writes ``tokenizer.json``. ``keep`` complete checkpoints
    stay (the new one included); older ones are deleted once the new one is the latest.
    Returns the checkpoint folder.
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    run_dir = Path(run_dir)
    root = run_dir / CHECKPOINTS_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_name(step)
    tmp = root / f".tmp-{checkpoint_name(step)}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        write_model(tmp)
        write_tokenizer(tmp)
        tensors, meta = optimizer_to_files(optimizer_state)
        save_file(tensors, str(tmp / OPTIMIZER_FILE), metadata={"format_version": str(FORMAT_VERSION)})
        save_file(rng_states(), str(tmp / RNG_FILE))
        state = dict(trainer_state, step=step, format_version=FORMAT_VERSION, optimizer=meta)
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        mode = file_mode()
        for path in tmp.iterdir():
            os.chmod(path, mode)  # temp files are created 0600; a run folder is meant to be shared
            fsync_file(path)
        fsync_dir(tmp)
        if final.exists():  # a leftover of the same step that never became the latest
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_json(run_dir / LATEST_FILE, {"step": step, "checkpoint": f"{CHECKPOINTS_DIR}/{final.name}"})
    publish_top_level(run_dir, final)
    _prune(root, keep=keep, latest=final)
    return final


def publish_top_level(run_dir: Path, checkpoint: Path) -> None:
    """Copy the checkpoint's model, config and tokenizer to the top of the run folder.

    The config goes last so that a crash in between leaves a matching (older) pair or the new
    weights with an unchanged config (the config is the same for every checkpoint of a run).
    """
    for name in TOP_LEVEL_FILES:
        if (checkpoint / name).is_file():
            atomic_copy(checkpoint / name, run_dir / name)
    fsync_dir(run_dir)


def _prune(root: Path, *, keep: int, latest: Path) -> None:
    complete = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-"))
    stale = [p for p in complete if p != latest][: max(0, len(complete) - keep)]
    for path in stale:
        shutil.rmtree(path)
    for path in root.iterdir():  # temp folders of saves that were killed
        if path.name.startswith(".tmp-"):
            shutil.rmtree(path, ignore_errors=True)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The folder ``latest.json`` names, or None when the run has no checkpoint yet."""
    pointer = Path(run_dir) / LATEST_FILE
    if not pointer.exists():
        return None
    doc = read_json(pointer, "latest-checkpoint pointer")
    if not isinstance(doc, dict) or not isinstance(doc.get("checkpoint"), str):
        raise CheckpointError(f"{pointer}: expected an object with a 'checkpoint' path")
    path = Path(run_dir) / doc["checkpoint"]
    if not path.is_dir():
        raise CheckpointError(f"{pointer}: names {path}, which does not exist")
    return path


def load_trainer_checkpoint(path: Path, device: torch.device | str = "cpu") -> TrainerCheckpoint:
    """Read the optimizer, RNG and trainer state of a checkpoint folder (not the model)."""
    path = Path(path)
    state = read_json(path / STATE_FILE, "trainer state")
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION or "step" not in state:
        raise CheckpointError(f"{path / STATE_FILE}: not a longnet trainer state (format {FORMAT_VERSION})")
    tensors = {}
    for name in (OPTIMIZER_FILE, RNG_FILE):
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{file}: file not found")
        try:
            tensors[name] = load_file(str(file), device="cpu")
        except (SafetensorError, OSError, RuntimeError, ValueError) as err:
            raise CheckpointError(f"{file}: unreadable or corrupt safetensors file ({err})") from err
    optimizer = optimizer_from_files(tensors[OPTIMIZER_FILE], state["optimizer"])
    for param_state in optimizer["state"].values():
        for key, value in param_state.items():
            if isinstance(value, torch.Tensor) and key != "step":
                param_state[key] = value.to(device)
    return TrainerCheckpoint(path=path, step=int(state["step"]), state=state, optimizer=optimizer,
                             rng=tensors[RNG_FILE])

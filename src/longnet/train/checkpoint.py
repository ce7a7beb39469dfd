"""Run-folder checkpoints, written so that a crash never leaves a torn one as the latest.

Layout of a run folder ``RUN``::

    run.json                  the run's settings (written once, at the start)
    latest.json               {"step": N, "checkpoint": "checkpoints/step-0000000N"}: the newest
                              *complete* checkpoint; replaced atomically after it is complete
    model.safetensors         copies of the latest checkpoint's model and tokenizer, so that
    config.json               ``LongNetLM.from_pretrained(RUN)`` loads the run folder itself
    tokenizer.json
    manifest.json             size and SHA-256 of those copies (the checkpoint's entries), which
                              every load checks (:func:`longnet.models.checkpoint.verify_weights`)
    checkpoints/step-.../     model.safetensors, config.json (``save_pretrained`` format),
                              tokenizer.json, optimizer.safetensors (AdamW moments),
                              rng.safetensors (torch RNG states), trainer_state.json (step,
                              tokens seen, optimizer hyper-parameters, data sampler position),
                              manifest.json (size and SHA-256 of every other file)
                              FSDP runs: dcp/ (model and AdamW state, one shard file per rank,
                              ``torch.distributed.checkpoint``) instead of optimizer.safetensors;
                              model.safetensors still holds the full weights

A checkpoint is written into ``checkpoints/.tmp-step-...`` (under FSDP every rank writes its
shards there first, :func:`stage_checkpoint`), every file is fsynced, the folder is renamed to its
final name, and only then ``latest.json`` is replaced (an atomic ``os.replace``). The two newest
checkpoints are kept: older ones are deleted after that, so the previous checkpoint survives
until the new one is complete, and one more stays as a fallback. At resume,
:func:`resume_checkpoint` checks the chosen checkpoint against its manifest; a torn or corrupted
one is reported and the previous good one is used. No pickle is used by this module: tensors go to
safetensors, everything else to JSON (the ``dcp/`` folder is ``torch.distributed.checkpoint``'s
own format).
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
from longnet.models.checkpoint import MANIFEST_FILE, build_manifest, check_manifest, read_manifest
from longnet.utils.atomic import atomic_copy, atomic_write_json, file_mode, fsync_dir, fsync_file

FORMAT_VERSION = 1
LATEST_FILE = "latest.json"
CHECKPOINTS_DIR = "checkpoints"
TOP_LEVEL_FILES = ("model.safetensors", "config.json", "tokenizer.json", "special_tokens.json")
"""What :func:`publish_top_level` copies (``special_tokens.json`` only exists for a Hugging Face
model's own tokenizer)."""
OPTIMIZER_FILE = "optimizer.safetensors"
RNG_FILE = "rng.safetensors"
STATE_FILE = "trainer_state.json"
SHARDS_DIR = "dcp"
KEEP_CHECKPOINTS = 2
"""Complete checkpoints kept: the latest and one fallback (:func:`resume_checkpoint`)."""


@dataclass
class TrainerCheckpoint:
    """What :func:`load_trainer_checkpoint` returns (the model is loaded separately)."""

    path: Path
    """The checkpoint folder (``RUN/checkpoints/step-...``)."""
    step: int
    """Optimizer steps completed."""
    state: dict[str, Any]
    """The content of ``trainer_state.json``."""
    optimizer: dict[str, Any] | None
    """An ``optimizer.load_state_dict`` argument; None when the optimizer is in :attr:`shards`."""
    rng: dict[str, torch.Tensor]
    """``"cpu"`` and ``"cuda:<i>"`` RNG states."""
    shards: Path | None = None
    """The ``dcp/`` folder of a sharded (FSDP) checkpoint: model and optimizer, any layout reads it."""


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


def staged_folder(run_dir: Path, step: int) -> Path:
    """Where the checkpoint of ``step`` is written before it is complete."""
    return Path(run_dir) / CHECKPOINTS_DIR / f".tmp-{checkpoint_name(step)}"


def stage_checkpoint(run_dir: Path, step: int) -> Path:
    """A new, empty :func:`staged_folder` (one rank makes it, before the others write shards into
    it; :func:`save_trainer_checkpoint` with ``staged`` completes it)."""
    tmp = staged_folder(run_dir, step)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def save_trainer_checkpoint(
    run_dir: Path,
    *,
    step: int,
    write_model: Callable[[Path], None],
    write_tokenizer: Callable[[Path], None],
    optimizer_state: dict[str, Any] | None,
    trainer_state: dict[str, Any],
    keep: int = KEEP_CHECKPOINTS,
    staged: Path | None = None,
) -> Path:
    """Write a complete checkpoint of ``step`` into ``run_dir`` and make it the latest.

    ``write_model(folder)`` writes ``model.safetensors`` + ``config.json`` (``save_pretrained``)
    and ``write_tokenizer(folder)`` writes ``tokenizer.json``. ``optimizer_state`` None: the
    optimizer is in the ``dcp/`` shards of ``staged`` (the :func:`stage_checkpoint` folder other
    ranks already wrote into). ``keep`` complete checkpoints stay (the new one included); older ones
    are deleted once the new one is the latest. Returns the checkpoint folder.
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    run_dir = Path(run_dir)
    root = run_dir / CHECKPOINTS_DIR
    final = root / checkpoint_name(step)
    tmp = stage_checkpoint(run_dir, step) if staged is None else Path(staged)
    if optimizer_state is None and not (tmp / SHARDS_DIR).is_dir():
        raise ValueError("optimizer_state is None but the staged folder has no dcp/ shards")
    try:
        write_model(tmp)
        write_tokenizer(tmp)
        state = dict(trainer_state, step=step, format_version=FORMAT_VERSION)
        if optimizer_state is not None:
            tensors, meta = optimizer_to_files(optimizer_state)
            save_file(tensors, str(tmp / OPTIMIZER_FILE), metadata={"format_version": str(FORMAT_VERSION)})
            state["optimizer"] = meta
        else:
            state["sharded"] = SHARDS_DIR
        save_file(rng_states(), str(tmp / RNG_FILE))
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        mode = file_mode()
        for path in sorted(tmp.rglob("*")):
            if path.is_file():
                os.chmod(path, mode)  # temp files are created 0600; a run folder is meant to be shared
                fsync_file(path)
        (tmp / MANIFEST_FILE).write_text(json.dumps(build_manifest(tmp), indent=1, sort_keys=True) + "\n",
                                         encoding="utf-8")
        os.chmod(tmp / MANIFEST_FILE, mode)
        fsync_file(tmp / MANIFEST_FILE)
        for folder in [p for p in tmp.rglob("*") if p.is_dir()] + [tmp]:
            fsync_dir(folder)
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
    """Copy the checkpoint's model, config and tokenizer to the top of the run folder, with a
    ``manifest.json`` holding the checkpoint's entries for them (loads check it).

    The old top-level manifest is removed first and the new one written last, so a crash in
    between leaves no manifest (the copies then load with the finiteness check only), never a
    stale one. The config goes after the weights so that a crash in between leaves a matching
    (older) pair or the new weights with an unchanged config (the same for every checkpoint).
    """
    run_dir, checkpoint = Path(run_dir), Path(checkpoint)
    (run_dir / MANIFEST_FILE).unlink(missing_ok=True)
    fsync_dir(run_dir)
    copied = [name for name in TOP_LEVEL_FILES if (checkpoint / name).is_file()]
    for name in copied:
        atomic_copy(checkpoint / name, run_dir / name)
    entries = read_manifest(checkpoint) or {}
    if copied and all(name in entries for name in copied):
        atomic_write_json(run_dir / MANIFEST_FILE, {"format_version": FORMAT_VERSION,
                                                    "files": {name: entries[name] for name in copied}})
    fsync_dir(run_dir)


def _prune(root: Path, *, keep: int, latest: Path) -> None:
    complete = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-"))
    # later than the latest: a future abandoned by a resume from an older (fallback) checkpoint
    stale = [p for p in complete if p.name > latest.name]
    older = [p for p in complete if p.name < latest.name]
    stale += older[: max(0, len(older) - (keep - 1))]
    for path in stale:
        shutil.rmtree(path)
    for path in root.iterdir():  # temp folders of saves that were killed
        if path.name.startswith(".tmp-"):
            shutil.rmtree(path, ignore_errors=True)


def verify_checkpoint(path: Path) -> None:
    """:class:`CheckpointError` naming the first file of ``path`` that is missing, torn or changed.

    Checks every file listed in ``manifest.json`` (size, then SHA-256). Checkpoints written
    before manifests existed pass (their files are checked as they are read).
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: checkpoint folder not found")
    if not check_manifest(path) and not (path / STATE_FILE).exists():  # else an older checkpoint
        raise CheckpointError(f"{path / MANIFEST_FILE}: manifest not found (an incomplete checkpoint)")


def resume_checkpoint(run_dir: Path, log: Callable[[str], None] = print) -> Path | None:
    """The newest checkpoint of ``run_dir`` that passes :func:`verify_checkpoint`, or None.

    Starts from the one ``latest.json`` names; when it (or the pointer itself) is torn or
    corrupt, says so through ``log`` and falls back to the newest complete older checkpoint.
    Raises :class:`CheckpointError` when checkpoints exist but none is good (nothing is deleted).
    """
    run_dir = Path(run_dir)
    candidates: list[Path] = []
    problems: list[str] = []
    try:
        latest = latest_checkpoint(run_dir)
    except CheckpointError as err:
        latest = None
        problems.append(str(err))
    if latest is not None:
        candidates.append(latest)
    root = run_dir / CHECKPOINTS_DIR
    if root.is_dir():
        older = sorted((p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-")), reverse=True)
        limit = _step_of(latest) if latest is not None else None
        candidates += [p for p in older if p != latest and (limit is None or _step_of(p) < limit)]
    if not candidates:
        if problems:
            raise CheckpointError(problems[0])
        return None
    for path in candidates:
        try:
            verify_checkpoint(path)
        except CheckpointError as err:
            problems.append(str(err))
            continue
        if problems:
            log(f"warning: {'; '.join(problems)}; resuming from the previous good checkpoint {path} "
                f"(step {_step_of(path)}) instead")
        return path
    raise CheckpointError("no intact checkpoint to resume from: " + "; ".join(problems))


def _step_of(path: Path) -> int:
    try:
        return int(path.name.split("-", 1)[1])
    except (IndexError, ValueError):
        return -1


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
    shards = path / state["sharded"] if isinstance(state.get("sharded"), str) else None
    if shards is not None and not shards.is_dir():
        raise CheckpointError(f"{shards}: sharded model and optimizer state not found")
    tensors = {}
    for name in (RNG_FILE,) if shards is not None else (OPTIMIZER_FILE, RNG_FILE):
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{file}: file not found")
        try:
            tensors[name] = load_file(str(file), device="cpu")
        except (SafetensorError, OSError, RuntimeError, ValueError) as err:
            raise CheckpointError(f"{file}: unreadable or corrupt safetensors file ({err})") from err
    optimizer = None
    if shards is None:
        optimizer = optimizer_from_files(tensors[OPTIMIZER_FILE], state["optimizer"])
        for param_state in optimizer["state"].values():
            for key, value in param_state.items():
                if isinstance(value, torch.Tensor) and key != "step":
                    param_state[key] = value.to(device)
    return TrainerCheckpoint(path=path, step=int(state["step"]), state=state, optimizer=optimizer,
                             rng=tensors[RNG_FILE], shards=shards)

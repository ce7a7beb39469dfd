"""The run folder: what a new run may use, what a resumed run reads, ``run.json`` and ``train.toml``.

``run.json`` holds the resolved configuration tree (``config``, format 2; runs written before it
hold flat ``settings``, format 1, and still resume: :func:`longnet.train.config.stored_settings`)
and what describes the run (model config, parameters, data, layout). ``train.toml`` is the same
configuration as TOML, for reading and for ``longnet train --config``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from longnet.train.checkpoint import LATEST_FILE, read_json
from longnet.train.config import RUN_FORMAT
from longnet.utils.atomic import atomic_write_json, atomic_write_text

RUN_FILE = "run.json"
TOML_FILE = "train.toml"
RUN_FORMATS = (1, 2)
"""``run.json`` formats that resume: 1 (flat ``settings``) and 2 (the ``config`` tree)."""


class RunFolderError(ValueError):
    """``--out`` cannot be used as asked (it holds another run, or other files)."""


def open_run_dir(out: str | Path, resume: bool) -> tuple[Path, dict[str, Any] | None]:
    """Check ``--out`` and return ``(folder, stored run.json or None)``; never deletes anything.

    A new run needs a missing or empty folder. A folder holding a run is refused unless
    ``resume``; a non-empty folder that is not a run is always refused. A new folder is only
    created by :func:`write_run_file`, once the settings and data are known to be good.
    """
    path = Path(out).expanduser()
    if path.exists() and not path.is_dir():
        raise RunFolderError(f"--out {path} is a file, not a folder; choose a new folder for the run")
    run_file = path / RUN_FILE
    if run_file.is_file():
        stored = read_json(run_file, "run settings (run.json)")
        if not isinstance(stored, dict) or stored.get("format_version") not in RUN_FORMATS \
                or not ("settings" in stored or "config" in stored):
            raise RunFolderError(f"{run_file} is not a longnet run file; choose another --out")
        if not resume:
            step = _latest_step(path)
            at = f"at step {step}" if step is not None else "with no checkpoint yet"
            raise RunFolderError(
                f"--out {path} already holds a run ({at}); add --resume to continue it, "
                "or choose a new --out (nothing was overwritten)"
            )
        return path, stored
    if path.is_dir() and any(path.iterdir()):
        raise RunFolderError(
            f"--out {path} is not empty and holds no longnet run; choose a new or empty folder "
            "(nothing was overwritten)"
        )
    return path, None


def write_run_file(path: Path, config: Any, **info: Any) -> None:
    """Write ``run.json`` (the resolved config tree plus descriptive ``info``) and ``train.toml``,
    atomically."""
    doc = {"format_version": RUN_FORMAT, "config": config.to_dict(),
           "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **info}
    Path(path).mkdir(parents=True, exist_ok=True)
    atomic_write_json(Path(path) / RUN_FILE, doc)
    atomic_write_text(Path(path) / TOML_FILE, config.to_toml())


def find_run_file(checkpoint: Path) -> dict[str, Any] | None:
    """The ``run.json`` of a run folder or of the run a checkpoint folder belongs to, if any."""
    for folder in (checkpoint, checkpoint.parent.parent):
        if (folder / RUN_FILE).is_file():
            return read_json(folder / RUN_FILE, "run settings (run.json)")
    return None


def _latest_step(path: Path) -> int | None:
    try:
        return int(json.loads((path / LATEST_FILE).read_text(encoding="utf-8"))["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None

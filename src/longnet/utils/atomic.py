"""Atomic file writes: the one place longnet writes a file that must never be seen torn.

Every write goes to a temporary file in the target's folder (same filesystem, so the final
``os.replace`` is atomic), is flushed and fsynced, gets the permissions a plain ``open`` would
give (``0666`` minus the umask: run folders and caches are meant to be shared), replaces the
target, and then the folder entry is fsynced. A reader, or a crash at any point, sees the old
file or the new one, never a mix; on an exception the temporary file is removed and the target
is left as it was.

- :func:`atomic_open`: a binary handle to stream into (token files).
- :func:`atomic_write_bytes`, :func:`atomic_write_text`, :func:`atomic_write_json`: whole values.
- :func:`atomic_save`: for writers that want a path (safetensors, pickle, matplotlib).
- :func:`save_figure`: a matplotlib figure.
- :func:`atomic_copy`: make a file a copy of another (a hard link when possible).
- :func:`fsync_file`, :func:`fsync_dir`, :func:`file_mode`: the pieces, for callers that publish
  a whole folder at once (trainer checkpoints).

This module imports nothing from longnet outside ``longnet.utils``, so models, data, training,
parallel and benchmark code can all use it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Callable

from longnet.utils.strict_json import to_json

__all__ = ["atomic_open", "atomic_write_bytes", "atomic_write_text", "atomic_write_json", "atomic_save",
           "save_figure", "atomic_copy", "fsync_file", "fsync_dir", "file_mode"]


def file_mode() -> int:
    """``0666`` minus the process umask: what ``open`` gives a new file (``mkstemp`` gives 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def fsync_file(path: str | os.PathLike) -> None:
    """Flush a written file's content to disk."""
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a folder's entries (renames, new files) to disk; a no-op where unsupported."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on folders; the rename is still atomic
        pass
    finally:
        os.close(fd)


def _temp_beside(path: Path) -> str:
    """A new empty temporary file next to ``path``, ending like it (writers that read the suffix)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    return tmp


def _publish(tmp: str, path: Path) -> None:
    """fsync ``tmp``, give it the usual mode, move it onto ``path``, fsync the folder."""
    fsync_file(tmp)
    os.chmod(tmp, file_mode())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def atomic_save(path: str | os.PathLike, save: Callable[[str], Any]) -> Path:
    """Call ``save(temporary_path)`` to write the file, then make it ``path`` atomically.

    For writers that take a file name (``safetensors.torch.save_file``, ``fig.savefig``). The
    temporary name ends with ``path``'s suffix. Returns ``path``.
    """
    path = Path(path)
    tmp = _temp_beside(path)
    try:
        save(tmp)
        _publish(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


@contextmanager
def atomic_open(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """A binary file to write that replaces ``path`` only if the ``with`` block succeeds."""
    path = Path(path)
    tmp = _temp_beside(path)
    try:
        with open(tmp, "wb") as handle:
            yield handle
        _publish(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"data must be bytes, got {type(data).__name__}")
    with atomic_open(path) as handle:
        handle.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, value: Any, *, indent: int | None = 1, sort_keys: bool = True) -> None:
    """Write ``value`` as strict JSON (and a final newline) to ``path`` atomically.

    The value is serialized (:func:`~longnet.utils.strict_json.to_json`) before anything is
    written, so a value that is not JSON-safe raises ``TypeError``, and one holding NaN or
    infinity ``ValueError``, and ``path`` is left untouched.
    """
    atomic_write_text(path, to_json(value, indent=indent, sort_keys=sort_keys) + "\n")


def save_figure(fig: Any, path: str | os.PathLike, **savefig_kwargs: Any) -> Path:
    """Lay out ``fig`` (``tight_layout``), ``fig.savefig`` it into ``path`` atomically (the format is
    ``path``'s suffix unless given) and close it, also when saving fails."""
    import matplotlib.pyplot as plt

    path = Path(path)
    savefig_kwargs.setdefault("format", path.suffix.lstrip(".") or None)
    try:
        fig.tight_layout()
        return atomic_save(path, lambda tmp: fig.savefig(tmp, **savefig_kwargs))
    finally:
        plt.close(fig)


def atomic_copy(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """Make ``target`` a copy of ``source`` atomically: a hard link when possible, else a copy.

    A hard link shares the file; callers must never write into ``source`` in place afterwards
    (longnet only ever replaces files, so the link keeps the content it had).
    """
    source, target = Path(source), Path(target)

    def link_or_copy(tmp: str) -> None:
        os.unlink(tmp)  # os.link needs a free name
        try:
            os.link(source, tmp)
        except OSError:  # no hard links here (other filesystem, some network shares): copy instead
            shutil.copyfile(source, tmp)

    atomic_save(target, link_or_copy)

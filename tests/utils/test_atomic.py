"""Atomic writes: the new content or the old one, never a mix, and nothing left behind."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from longnet.utils import atomic
from longnet.utils.atomic import (
    atomic_copy,
    atomic_open,
    atomic_save,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    save_figure,
)

SRC = Path(__file__).resolve().parents[2] / "src"


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_whole_values_round_trip(tmp_path):
    atomic_write_bytes(tmp_path / "a.bin", b"\x00\xffdata")
    atomic_write_text(tmp_path / "b.txt", "héllo\n")
    atomic_write_json(tmp_path / "c.json", {"b": [1, 2], "a": None})
    atomic_write_json(tmp_path / "d.json", {"b": 1, "a": 2}, indent=None, sort_keys=False)
    assert (tmp_path / "a.bin").read_bytes() == b"\x00\xffdata"
    assert (tmp_path / "b.txt").read_text(encoding="utf-8") == "héllo\n"
    text = (tmp_path / "c.json").read_text()
    assert text == json.dumps({"a": None, "b": [1, 2]}, indent=1, sort_keys=True) + "\n"
    assert (tmp_path / "d.json").read_text() == '{"b": 1, "a": 2}\n'
    assert _names(tmp_path) == ["a.bin", "b.txt", "c.json", "d.json"]  # no temporary files left


@settings(max_examples=25, deadline=None)
@given(old=st.binary(max_size=300), chunks=st.lists(st.binary(min_size=1, max_size=50), min_size=1, max_size=8),
       fail_after=st.integers(0, 8))
def test_an_interrupted_stream_leaves_the_old_file(tmp_path_factory, old, chunks, fail_after):
    folder = tmp_path_factory.mktemp("stream")
    target = folder / "tokens.bin"
    target.write_bytes(old)
    interrupted = fail_after < len(chunks)
    try:
        with atomic_open(target) as handle:
            for i, chunk in enumerate(chunks):
                if i == fail_after:
                    raise KeyboardInterrupt  # Ctrl-C in the middle of the stream
                handle.write(chunk)
    except KeyboardInterrupt:
        assert interrupted
    assert target.read_bytes() == (old if interrupted else b"".join(chunks))
    assert _names(folder) == ["tokens.bin"]


def test_failing_writers_leave_the_old_file(tmp_path):
    target = tmp_path / "model.safetensors"
    target.write_bytes(b"old weights")

    def half_then_fail(path):
        Path(path).write_bytes(b"new wei")
        raise OSError("disk full (simulated)")

    with pytest.raises(OSError, match="simulated"):
        atomic_save(target, half_then_fail)
    with pytest.raises(TypeError):  # not JSON: fails before anything is written
        atomic_write_json(target, {"x": object()})
    with pytest.raises(TypeError, match="text must be a str"):
        atomic_write_text(target, b"bytes")
    with pytest.raises(TypeError, match="data must be bytes"):
        atomic_write_bytes(target, "text")
    assert target.read_bytes() == b"old weights" and _names(tmp_path) == ["model.safetensors"]


def test_a_killed_process_leaves_the_old_file(tmp_path):
    target = tmp_path / "latest.json"
    target.write_text('{"step": 6}\n')
    code = ("import os, signal, sys\n"
            "from longnet.utils.atomic import atomic_open\n"
            "with atomic_open(sys.argv[1]) as f:\n"
            "    f.write(b'{\"step\": 1')\n"
            "    f.flush()\n"
            "    os.kill(os.getpid(), signal.SIGKILL)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(target)], env=os.environ | {"PYTHONPATH": str(SRC)},
                          capture_output=True, timeout=60)
    assert proc.returncode == -9, proc.stderr
    assert target.read_text() == '{"step": 6}\n'
    leftovers = [n for n in _names(tmp_path) if n != "latest.json"]
    assert len(leftovers) == 1 and leftovers[0].startswith(".latest.json.")  # hidden, never the real name


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names fsynced files through /proc/self/fd")
def test_mode_is_what_open_would_give_and_everything_is_fsynced(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(atomic.os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")),
                                                        real_fsync(fd)))
    old_mask = os.umask(0o027)
    try:
        atomic_write_text(tmp_path / "run.json", "{}\n")
    finally:
        os.umask(old_mask)
    assert stat.S_IMODE((tmp_path / "run.json").stat().st_mode) == 0o640  # 0666 minus the umask
    assert len(synced) == 2 and synced[1] == str(tmp_path)  # the file (under its temp name), then the folder
    assert Path(synced[0]).parent == tmp_path and Path(synced[0]).name.startswith(".run.json.")


def test_save_figure_writes_a_png_and_keeps_the_old_one_on_failure(tmp_path):
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2, 2))
    ax.plot([0, 1], [1, 0])
    out = save_figure(fig, tmp_path / "loss.png", dpi=50)
    assert out == tmp_path / "loss.png" and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not plt.fignum_exists(fig.number)  # closed: callers do not leak figures
    png = out.read_bytes()
    fig, ax = plt.subplots(figsize=(2, 2))
    with pytest.raises(ValueError):  # an unknown format fails inside savefig
        save_figure(fig, out, format="no-such-format")
    assert not plt.fignum_exists(fig.number)  # closed on failure too
    assert out.read_bytes() == png and _names(tmp_path) == ["loss.png"]


@pytest.mark.parametrize("links", [True, False])
def test_atomic_copy_links_or_copies(tmp_path, monkeypatch, links):
    if not links:
        def no_links(src, dst):
            raise OSError("hard links not supported here (simulated)")
        monkeypatch.setattr(atomic.os, "link", no_links)
    source, target = tmp_path / "ckpt-model.bin", tmp_path / "model.bin"
    atomic_write_bytes(source, b"step 6")
    target.write_bytes(b"step 0")
    atomic_copy(source, target)
    assert target.read_bytes() == b"step 6"
    assert (source.stat().st_ino == target.stat().st_ino) == links
    atomic_write_bytes(source, b"step 12")  # replacing the source never changes the copy
    assert target.read_bytes() == b"step 6"
    with pytest.raises(FileNotFoundError):
        atomic_copy(tmp_path / "missing.bin", target)
    assert target.read_bytes() == b"step 6" and _names(tmp_path) == ["ckpt-model.bin", "model.bin"]

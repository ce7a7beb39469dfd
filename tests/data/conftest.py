"""Shared fixtures for the data tests."""

from __future__ import annotations

from pathlib import Path

import pytest

SAMPLE_TEXT = """\
def greet(name: str) -> str:
    \"\"\"Say hello — to anyone, even 日本語 users 🚀.\"\"\"
    return f"héllo {name}!"


class Counter:
    def __init__(self) -> None:
        self.count = 0

    def add(self, amount: int = 1) -> int:
        self.count += amount
        return self.count
"""


@pytest.fixture
def text_folder(tmp_path: Path) -> Path:
    """A folder of small text files (plus entries that must be skipped)."""
    root = tmp_path / "corpus"
    (root / "pkg" / "sub").mkdir(parents=True)
    (root / ".hidden").mkdir()
    for i in range(12):
        (root / "pkg" / f"mod{i:02d}.py").write_text(SAMPLE_TEXT.replace("greet", f"greet{i}") * (i + 1), encoding="utf-8")
    (root / "pkg" / "sub" / "notes.md").write_text("# Notes\n\nwörds and more wörds\n" * 5, encoding="utf-8")
    (root / "README.txt").write_text("A small corpus.\n", encoding="utf-8")
    (root / ".hidden" / "secret.txt").write_text("hidden\n", encoding="utf-8")
    (root / "image.bin").write_bytes(bytes(range(256)) * 4)
    (root / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1") * 3)
    return root


@pytest.fixture
def sample_text() -> str:
    """A short piece of Python with non-ASCII text."""
    return SAMPLE_TEXT


@pytest.fixture(scope="session")
def small_tokenizer():
    """A 400-id tokenizer trained on a small sample (session-wide, it takes ~0.1 s)."""
    from longnet.data import train_tokenizer

    texts = [SAMPLE_TEXT * 3, "wörds — 日本語 🚀\n\tx = 1\n" * 20]
    return train_tokenizer(texts, 400)

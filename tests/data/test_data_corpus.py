"""Corpus: built-in stdlib corpus, user files/folders/globs/JSONL, deterministic splits."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from longnet.data import SPLITS, load_corpus, split_of


def _keys_by_split(corpus) -> dict[str, list[str]]:
    return {split: [doc.key for doc in corpus.split(split)] for split in SPLITS}


def test_split_of_is_deterministic_and_follows_fractions():
    keys = [f"pkg/file{i}.py" for i in range(4000)]
    first = [split_of(k, 0.05, 0.05) for k in keys]
    assert first == [split_of(k, 0.05, 0.05) for k in keys]
    counts = Counter(first)
    assert 0.85 < counts["train"] / len(keys) < 0.95
    assert 0.03 < counts["validation"] / len(keys) < 0.07
    assert 0.03 < counts["test"] / len(keys) < 0.07
    assert {split_of(k, 0.0, 0.0) for k in keys} == {"train"}


@pytest.fixture(scope="module")
def stdlib_corpus():
    return load_corpus("stdlib")


def test_stdlib_corpus_is_found_and_split(stdlib_corpus):
    corpus = stdlib_corpus
    assert corpus.num_bytes > 5_000_000
    assert not any("site-packages" in str(p) for p in corpus.files)
    by_split = {split: corpus.keys(split) for split in SPLITS}
    assert all(by_split[split] for split in SPLITS), {s: len(k) for s, k in by_split.items()}
    everything = corpus.keys()
    assert sorted(sum(by_split.values(), [])) == sorted(everything)
    assert len(set(everything)) == len(everything)
    assert by_split == {split: corpus.keys(split) for split in SPLITS}  # stable across calls


def test_stdlib_documents_are_long_packages_with_headers(stdlib_corpus):
    corpus = stdlib_corpus
    sizes = {}
    headers = 0
    for split in ("validation", "test"):
        docs = list(corpus.split(split))
        assert [d.key for d in docs] == corpus.keys(split)
        assert max(len(d.text.encode()) for d in docs) > 100_000, split
        for doc in docs:
            sizes[doc.key] = len(doc.text)
            headers += doc.text.count("\n# file: ") + doc.text.startswith("# file: ")
    assert headers > 20
    json_split = corpus.split_of("json")
    json_doc = next(d for d in corpus.split(json_split) if d.key == "json")
    assert json_doc.text.startswith("# file: json/__init__.py\n")
    assert "\n# file: json/decoder.py\n" in json_doc.text
    assert json_doc.text.index("json/decoder.py") < json_doc.text.index("json/encoder.py")


def test_folder_skips_hidden_and_binary_files(text_folder):
    corpus = load_corpus(str(text_folder))
    keys = corpus.keys()
    assert "README.txt" in keys and "pkg/sub/notes.md" in keys and "pkg/mod00.py" in keys
    assert not any(k.startswith(".hidden") or k in ("image.bin", "latin1.txt") for k in keys)
    assert len(keys) == 14
    docs = {d.key: d.text for split in SPLITS for d in corpus.split(split)}
    assert docs["README.txt"] == "A small corpus.\n"
    assert set(docs) == set(keys)
    assert _keys_by_split(corpus) == _keys_by_split(load_corpus(str(text_folder)))


def test_glob_and_comma_list(text_folder):
    corpus = load_corpus(str(text_folder / "pkg" / "**" / "*.md"))
    assert corpus.keys() == ["sub/notes.md"]
    combined = load_corpus(f"{text_folder / 'README.txt'}, {text_folder / 'pkg' / 'mod0*.py'}")
    assert combined.keys() == ["README.txt"] + [f"mod{i:02d}.py" for i in range(10)]
    overlapping = load_corpus(f"{text_folder},{text_folder / 'README.txt'}")
    assert len(overlapping.keys()) == 14  # a file named twice is read once


def test_large_file_is_cut_into_pieces_at_line_boundaries(tmp_path):
    lines = [f"line {i}: " + "x" * (i % 37) + "\n" for i in range(3000)]
    path = tmp_path / "book.txt"
    path.write_text("".join(lines), encoding="utf-8")
    corpus = load_corpus(str(path), max_document_bytes=4096)
    pieces = {d.key: d.text for split in SPLITS for d in corpus.split(split)}
    order = sorted(pieces, key=lambda k: int(k.split("#")[1]))
    assert "".join(pieces[k] for k in order) == path.read_text(encoding="utf-8")
    assert all(text.endswith("\n") for text in pieces.values())
    assert all(corpus.split_of(k) == s for s in SPLITS for k in corpus.keys(s))
    assert len({corpus.split_of(k) for k in pieces}) == 3


def test_jsonl(tmp_path):
    path = tmp_path / "data.jsonl"
    rows = [{"text": f"document {i} — ünïcode\n", "id": i} for i in range(60)]
    path.write_text("\n".join(json.dumps(r) for r in rows[:30]) + "\n\n" + "\n".join(json.dumps(r) for r in rows[30:]) + "\n")
    corpus = load_corpus(str(path))
    docs = {d.key: d.text for split in SPLITS for d in corpus.split(split)}
    assert len(docs) == 60
    assert docs["data.jsonl:1"] == rows[0]["text"]
    assert docs["data.jsonl:32"] == rows[30]["text"]  # line 31 is blank
    assert sorted(docs) == sorted(corpus.keys())
    assert {corpus.split_of(k) for k in docs} == set(SPLITS)


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"txt": "no text field"}', 'no "text" field'),
        ("[1, 2]", 'no "text" field'),
        ("{not json", "not valid JSON"),
        ('{"text": 3}', "must be a string"),
    ],
)
def test_bad_jsonl_lines(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n' + line + "\n")
    corpus = load_corpus(str(path))
    with pytest.raises(ValueError, match=message) as info:
        for split in SPLITS:
            list(corpus.split(split))
    assert "bad.jsonl:2" in str(info.value)


def test_errors(tmp_path, text_folder):
    with pytest.raises(ValueError, match="does not exist"):
        load_corpus(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="matches no file"):
        load_corpus(str(tmp_path / "*.nothing"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no text files"):
        load_corpus(str(empty))
    (empty / "zero.txt").write_text("")
    with pytest.raises(ValueError, match="contains no text"):
        load_corpus(str(empty))
    with pytest.raises(ValueError, match="not a UTF-8 text file"):
        load_corpus(str(text_folder / "image.bin"))
    with pytest.raises(ValueError, match="--data is empty"):
        load_corpus(" , ")
    with pytest.raises(ValueError, match="validation_fraction"):
        load_corpus("stdlib", validation_fraction=1.5)
    with pytest.raises(TypeError, match="spec"):
        load_corpus(Path("stdlib"))
    with pytest.raises(ValueError, match="split name"):
        load_corpus(str(text_folder)).split("dev")

"""Corpora: documents from the Python standard library or from user files, split by path.

A corpus is resolved from a *spec* string (see :func:`load_corpus`) into a list of *sources*
whose sizes are known from ``stat`` alone; text is read lazily, one document at a time, each
time a split is iterated. Every document has a stable ``key`` (a path-like string) and its split
is a pure function of that key (:func:`split_of`), so adding or removing one file never moves
another file between splits.

Built-in corpus ``stdlib``: the ``.py`` files of the running interpreter's standard library
(``sysconfig.get_paths()["stdlib"]``), skipping ``site-packages``, ``__pycache__`` and hidden
folders. Test folders (``test``, ``idlelib/idle_test``, ...) are *kept*: they are real code and
triple the corpus. Files that are not valid UTF-8 are skipped when read. Documents are long on
purpose, for long-context training:

- each top-level module (``argparse.py``) is one document;
- each top-level package (``json``) is one document: its files in sorted path order, each
  preceded by a header line ``# file: json/decoder.py``;
- a package larger than ``max_document_bytes`` (only ``test`` for CPython 3.11 at the 2 MiB
  default) is split into one group per sub-package (recursively) plus its loose files packed in
  sorted order into runs of at most ``max_document_bytes`` (keys ``test/#0``, ``test/#1``, ...).

User data: plain text files are one document each (key: the path relative to the folder or
glob base, or the file name for a single file); a file larger than ``max_document_bytes`` is cut
at line boundaries into pieces of about that size (keys ``name#0``, ``name#1``, ...), so that even
a single large file gives validation and test data. A ``.jsonl`` file gives one document per
non-blank line, from its ``"text"`` field (keys ``name:LINE``, 1-based).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import sysconfig
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

SPLITS: tuple[str, ...] = ("train", "validation", "test")
"""Split names, in the order token files are built."""

DEFAULT_MAX_DOCUMENT_BYTES = 2 * 1024 * 1024
"""Documents (stdlib packages, user file pieces) are kept below about this size."""

STDLIB_SPEC = "stdlib"
SPLIT_SALT = "longnet-split-v1"
_SNIFF_BYTES = 8192
_SKIP_DIRS = frozenset({"site-packages", "__pycache__"})


@dataclass(frozen=True)
class Document:
    """One document: a stable ``key`` (decides its split) and its ``text``."""

    key: str
    text: str


def split_of(key: str, validation_fraction: float, test_fraction: float, salt: str = SPLIT_SALT) -> str:
    """Return the split (``"train"``, ``"validation"`` or ``"test"``) of a document key.

    The key is hashed with SHA-256 (salted) to a number u in [0, 1): u < validation_fraction is
    validation, the next test_fraction is test, the rest train.
    """
    digest = hashlib.sha256(f"{salt}\0{key}".encode("utf-8")).digest()
    u = int.from_bytes(digest[:8], "big") / 2.0**64
    if u < validation_fraction:
        return "validation"
    if u < validation_fraction + test_fraction:
        return "test"
    return "train"


# ----------------------------------------------------------------------------------------------
# Sources: what a corpus is made of, known without reading file contents.


@dataclass(frozen=True)
class _FileGroup:
    """Files under ``root`` concatenated into one document, each after a ``# file:`` header."""

    key: str
    root: Path
    files: tuple[str, ...]  # posix paths relative to root, sorted
    nbytes: int


@dataclass(frozen=True)
class _TextPiece:
    """The lines of a text file that start in the byte range [start, stop)."""

    key: str
    path: Path
    start: int
    stop: int

    @property
    def nbytes(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class _JsonlFile:
    """A JSON Lines file: one document per non-blank line, key ``f"{key}:{line}"``."""

    key: str
    path: Path
    nbytes: int


_Source = _FileGroup | _TextPiece | _JsonlFile


class Corpus:
    """Documents resolved from a spec, split deterministically by key.

    Build one with :func:`load_corpus`. ``corpus.split("train")`` is a re-iterable view that
    streams documents from disk each time it is iterated.
    """

    def __init__(
        self,
        spec: str,
        sources: list[_Source],
        files: list[Path],
        validation_fraction: float,
        test_fraction: float,
    ) -> None:
        self.spec = spec
        self.validation_fraction = validation_fraction
        self.test_fraction = test_fraction
        self._sources = sources
        self._files = files
        self.skipped_files: set[str] = set()
        """Files skipped while reading because they are not valid UTF-8 (filled lazily)."""

    def __repr__(self) -> str:
        return f"Corpus(spec={self.spec!r}, documents={len(self._sources)}, bytes={self.num_bytes:,})"

    @property
    def files(self) -> list[Path]:
        """Every file the corpus reads, sorted, deduplicated."""
        return list(self._files)

    @property
    def num_bytes(self) -> int:
        """Total size in bytes of the corpus files (before any UTF-8 skip)."""
        return sum(source.nbytes for source in self._sources)

    def split_of(self, key: str) -> str:
        """The split a document key belongs to."""
        return split_of(key, self.validation_fraction, self.test_fraction)

    def split(self, name: str) -> CorpusSplit:
        """A re-iterable, streaming view of the documents of split ``name``."""
        if name not in SPLITS:
            raise ValueError(f"split name must be one of {SPLITS}, got {name!r}")
        return CorpusSplit(self, name)

    def estimated_bytes(self, split: str) -> int:
        """Bytes of the split: exact for files, estimated from the fractions for JSONL."""
        fractions = {
            "validation": self.validation_fraction,
            "test": self.test_fraction,
            "train": 1.0 - self.validation_fraction - self.test_fraction,
        }
        total = 0
        for source in self._sources:
            if isinstance(source, _JsonlFile):
                total += int(source.nbytes * fractions[split])
            elif self.split_of(source.key) == split:
                total += source.nbytes
        return total

    def keys(self, split: str | None = None) -> list[str]:
        """Document keys of one split (or of all documents), in iteration order.

        Needs no reading except for JSONL files, whose lines are counted (not parsed). Keys of
        documents that turn out empty (empty files or ``"text": ""``) are listed here but not
        yielded by :meth:`split`.
        """
        keys: list[str] = []
        for source in self._sources:
            if isinstance(source, _JsonlFile):
                with open(source.path, "rb") as handle:
                    candidates = [f"{source.key}:{i}" for i, line in enumerate(handle, 1) if line.strip()]
            else:
                candidates = [source.key]
            keys.extend(k for k in candidates if split is None or self.split_of(k) == split)
        return keys

    def fingerprint(self) -> dict:
        """What identifies the corpus contents: spec, split settings, file sizes and mtimes."""
        stats = []
        for path in self._files:
            st = path.stat()
            stats.append([str(path), st.st_size, st.st_mtime_ns])
        return {
            "spec": self.spec,
            "split": {
                "salt": SPLIT_SALT,
                "validation_fraction": self.validation_fraction,
                "test_fraction": self.test_fraction,
            },
            "sources": [[type(s).__name__, s.key, s.nbytes] for s in self._sources],
            "files": stats,
        }

    def _documents(self, split: str) -> Iterator[Document]:
        for source in self._sources:
            if isinstance(source, _JsonlFile):
                yield from self._jsonl_documents(source, split)
                continue
            if self.split_of(source.key) != split:
                continue
            if isinstance(source, _FileGroup):
                text = self._read_group(source)
            else:
                text = self._read_piece(source)
            if text:
                yield Document(source.key, text)

    def _read_group(self, group: _FileGroup) -> str:
        parts = []
        for rel in group.files:
            try:
                content = (group.root / rel).read_bytes().decode("utf-8")
            except UnicodeDecodeError:
                self.skipped_files.add(str(group.root / rel))
                continue
            if content and not content.endswith("\n"):
                content += "\n"
            parts.append(f"# file: {rel}\n{content}")
        return "".join(parts)

    def _read_piece(self, piece: _TextPiece) -> str:
        with open(piece.path, "rb") as handle:
            if piece.start > 0:
                handle.seek(piece.start - 1)
                handle.readline()  # the line holding byte start-1 belongs to the previous piece
            position = handle.tell()
            if position >= piece.stop:
                return ""
            data = handle.read(piece.stop - position)
            if data and not data.endswith(b"\n"):
                data += handle.readline()  # finish the last line that starts before stop
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            self.skipped_files.add(str(piece.path))
            warnings.warn(f"skipping {piece.key}: {piece.path} is not valid UTF-8", stacklevel=3)
            return ""

    def _jsonl_documents(self, source: _JsonlFile, split: str) -> Iterator[Document]:
        with open(source.path, "rb") as handle:
            for number, raw in enumerate(handle, 1):
                if not raw.strip():
                    continue
                where = f"{source.path}:{number}"
                try:
                    record = json.loads(raw)
                except (json.JSONDecodeError, UnicodeDecodeError) as error:
                    raise ValueError(f"--data: {where} is not valid JSON: {error}") from error
                if not isinstance(record, dict) or "text" not in record:
                    raise ValueError(
                        f'--data: {where} has no "text" field (each JSONL line must be an object with "text")'
                    )
                text = record["text"]
                if not isinstance(text, str):
                    raise ValueError(f'--data: {where}: "text" must be a string, got {type(text).__name__}')
                key = f"{source.key}:{number}"
                if text and self.split_of(key) == split:
                    yield Document(key, text)


class CorpusSplit:
    """The documents of one split; each ``iter()`` streams them again from disk."""

    def __init__(self, corpus: Corpus, name: str) -> None:
        self.corpus = corpus
        self.name = name

    def __iter__(self) -> Iterator[Document]:
        return self.corpus._documents(self.name)

    def __repr__(self) -> str:
        return f"CorpusSplit(spec={self.corpus.spec!r}, name={self.name!r})"


# ----------------------------------------------------------------------------------------------
# Resolving a spec.


def load_corpus(
    spec: str,
    *,
    validation_fraction: float = 0.05,
    test_fraction: float = 0.05,
    max_document_bytes: int = DEFAULT_MAX_DOCUMENT_BYTES,
) -> Corpus:
    """Resolve a ``--data`` spec into a :class:`Corpus` (reads no file contents but a sniff).

    ``spec`` is ``"stdlib"`` (the built-in corpus) or a comma-separated list of items, each a
    file, a folder (searched recursively for text files; hidden entries, binaries and files that
    do not start as valid UTF-8 are skipped), or a glob pattern (``**`` recursive). Files ending
    in ``.jsonl`` are read as JSON Lines with a ``"text"`` field. A path literally named
    ``stdlib`` must be written ``./stdlib``. Paths containing commas are not supported.
    """
    if not isinstance(spec, str):
        raise TypeError(f"spec must be a str, got {type(spec).__name__}")
    for name, value in (("validation_fraction", validation_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {value}")
    if validation_fraction + test_fraction >= 1.0:
        raise ValueError(
            f"validation_fraction + test_fraction must be < 1, got {validation_fraction + test_fraction}"
        )
    if max_document_bytes < 1:
        raise ValueError(f"max_document_bytes must be positive, got {max_document_bytes}")
    items = [item.strip() for item in spec.split(",") if item.strip()]
    if not items:
        raise ValueError("--data is empty: give 'stdlib', a file, a folder, a glob or a comma list of those")

    sources: list[_Source] = []
    files: dict[Path, None] = {}
    used_keys: set[str] = set()
    for item in dict.fromkeys(items):  # an item named twice counts once
        if item == STDLIB_SPEC:
            item_sources, item_files = _stdlib_sources(max_document_bytes)
        else:
            item_sources, item_files = _user_sources(item, max_document_bytes)
        earlier = set(files)
        for source, path in zip(item_sources, item_files):
            if path in earlier and not isinstance(source, _FileGroup):
                continue  # the same file named twice (e.g. by a folder and a glob)
            if source.key in used_keys:
                source = _rekey(source, str(path))
            used_keys.add(source.key)
            sources.append(source)
            if isinstance(source, _FileGroup):
                files.update((source.root / rel, None) for rel in source.files)
            else:
                files[path] = None
    if not sources or sum(s.nbytes for s in sources) == 0:
        raise ValueError(f"--data {spec!r} contains no text: every file is empty or was skipped as binary")
    return Corpus(spec, sources, sorted(files), validation_fraction, test_fraction)


def _rekey(source: _Source, key: str) -> _Source:
    if isinstance(source, _TextPiece):
        suffix = source.key[source.key.rfind("#") :] if "#" in source.key else ""
        return _TextPiece(key + suffix, source.path, source.start, source.stop)
    if isinstance(source, _JsonlFile):
        return _JsonlFile(key, source.path, source.nbytes)
    return source


def stdlib_root() -> Path:
    """The standard library folder of the running interpreter."""
    return Path(sysconfig.get_paths()["stdlib"])


def _stdlib_sources(max_document_bytes: int) -> tuple[list[_Source], list[Path]]:
    root = stdlib_root()
    if not root.is_dir():
        raise ValueError(f"--data stdlib: standard library folder {root} not found")
    sizes: dict[str, int] = {}
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not d.startswith("."))
        for name in names:
            if name.endswith(".py") and not name.startswith("."):
                path = Path(folder) / name
                sizes[path.relative_to(root).as_posix()] = path.stat().st_size
    groups: list[_FileGroup] = []
    toplevel = sorted(rel for rel in sizes if "/" not in rel)
    groups.extend(_FileGroup(rel, root, (rel,), sizes[rel]) for rel in toplevel)
    packages = sorted({rel.split("/", 1)[0] for rel in sizes if "/" in rel})
    for package in packages:
        groups.extend(_group_package(root, package, sizes, max_document_bytes))
    groups.sort(key=lambda g: g.key)
    return list(groups), [root / g.files[0] for g in groups]


def _group_package(root: Path, package: str, sizes: dict[str, int], max_bytes: int) -> list[_FileGroup]:
    """One group for the package, or (if too large) loose-file runs plus sub-package groups."""
    prefix = package + "/"
    members = sorted(rel for rel in sizes if rel.startswith(prefix))
    total = sum(sizes[rel] for rel in members)
    if total <= max_bytes:
        return [_FileGroup(package, root, tuple(members), total)]
    groups: list[_FileGroup] = []
    run: list[str] = []
    run_bytes = 0
    for rel in (rel for rel in members if "/" not in rel[len(prefix) :]):
        if run and run_bytes + sizes[rel] > max_bytes:
            groups.append(_FileGroup(f"{package}/#{len(groups)}", root, tuple(run), run_bytes))
            run, run_bytes = [], 0
        run.append(rel)
        run_bytes += sizes[rel]
    if run:
        groups.append(_FileGroup(f"{package}/#{len(groups)}", root, tuple(run), run_bytes))
    subpackages = sorted({rel[len(prefix) :].split("/", 1)[0] for rel in members if "/" in rel[len(prefix) :]})
    for sub in subpackages:
        groups.extend(_group_package(root, prefix + sub, sizes, max_bytes))
    return groups


def _user_sources(item: str, max_document_bytes: int) -> tuple[list[_Source], list[Path]]:
    """Sources of one spec item: (source, file) pairs in sorted key order."""
    path = Path(item).expanduser()
    if path.is_file():
        if path.suffix != ".jsonl" and _is_binary(path):
            raise ValueError(f"--data: {item} is not a UTF-8 text file")
        pairs = [(path.name, path)]
    elif path.is_dir():
        pairs = [(rel, p) for rel, p in _walk_text_files(path)]
    elif glob.has_magic(item):
        matches = sorted(glob.glob(os.path.expanduser(item), recursive=True))
        if not matches:
            raise ValueError(f"--data: glob {item!r} matches no file")
        base = _glob_base(item)
        pairs = []
        for match in matches:
            match_path = Path(match)
            if match_path.is_dir():
                pairs.extend(_walk_text_files(match_path, base))
            elif match_path.is_file() and (match_path.suffix == ".jsonl" or not _is_binary(match_path)):
                pairs.append((_relative_key(match_path, base), match_path))
    else:
        raise ValueError(f"--data: {item!r} does not exist (expected 'stdlib', a file, a folder or a glob)")
    if not pairs:
        raise ValueError(f"--data: {item!r} contains no text files")
    sources: list[_Source] = []
    owners: list[Path] = []
    for key, file in sorted(pairs, key=lambda pair: pair[0]):
        for source in _file_sources(key, file, max_document_bytes):
            sources.append(source)
            owners.append(file.resolve())
    return sources, owners


def _file_sources(key: str, path: Path, max_bytes: int) -> list[_Source]:
    size = path.stat().st_size
    if path.suffix == ".jsonl":
        return [_JsonlFile(key, path, size)]
    if size <= max_bytes:
        return [_TextPiece(key, path, 0, size)]
    count = -(-size // max_bytes)
    return [_TextPiece(f"{key}#{i}", path, i * max_bytes, min((i + 1) * max_bytes, size)) for i in range(count)]


def _walk_text_files(folder: Path, base: Path | None = None) -> Iterator[tuple[str, Path]]:
    base = folder if base is None else base
    for current, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "__pycache__")
        for name in sorted(names):
            path = Path(current) / name
            if name.startswith(".") or not path.is_file():
                continue
            if path.suffix == ".jsonl" or not _is_binary(path):
                yield _relative_key(path, base), path


def _glob_base(pattern: str) -> Path:
    """The longest leading part of a glob pattern without wildcards."""
    parts = []
    for part in Path(os.path.expanduser(pattern)).parts:
        if glob.has_magic(part):
            break
        parts.append(part)
    return Path(*parts) if parts else Path(".")


def _relative_key(path: Path, base: Path) -> str:
    try:
        return path.relative_to(base).as_posix()
    except ValueError:
        return path.as_posix()


def _is_binary(path: Path) -> bool:
    """True if the first bytes hold a NUL or are not the start of valid UTF-8."""
    with open(path, "rb") as handle:
        head = handle.read(_SNIFF_BYTES)
    if b"\0" in head:
        return True
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as error:
        # A multi-byte character cut by the sniff limit is fine; anything earlier is not.
        return not (len(head) == _SNIFF_BYTES and error.start >= len(head) - 3)
    return False

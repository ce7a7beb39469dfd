"""Token files: each split tokenized once into a flat memory-mappable ``.bin`` file, cached.

Layout of a cache entry ``<cache_dir>/<key>/``, where ``key`` hashes the corpus fingerprint
(spec, split settings, every file's path, size and mtime) and the tokenizer settings::

    tokenizer.json      the tokenizer (trained on the training split unless one was given)
    train.bin           token ids, numpy ``uint16`` (vocab <= 65536) or ``uint32``, no header;
    validation.bin      each document's tokens followed by the EOS id
    test.bin
    manifest.json       written last: the entry is complete iff it exists and matches

Every file is written to a temporary name and moved into place with ``os.replace``; the manifest
comes last and records each file's size, so an interrupted build is never mistaken for a
finished one, and the next call rebuilds (keeping a complete ``tokenizer.json``). A lock file
serializes concurrent builders of the same entry (e.g. several ranks).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tokenizers
from tqdm import tqdm

from longnet.data.corpus import DEFAULT_MAX_DOCUMENT_BYTES, SPLITS, Corpus, Document, load_corpus
from longnet.data.loader import TokenStream
from longnet.data.tokenizer import (
    DEFAULT_MAX_TRAIN_BYTES,
    TOKENIZER_FILE,
    Tokenizer,
    check_vocab_size,
    train_tokenizer,
)
from longnet.utils.atomic import atomic_open, atomic_write_json

try:  # POSIX advisory locks; elsewhere concurrent builders rely on atomic replaces alone
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
ENCODE_CHUNK_CHARS = 64 * 1024
"""Documents are cut into pieces of about this many characters before batch encoding."""
ENCODE_BATCH_CHARS = 4 * 1024 * 1024
"""Characters handed to one ``encode_batch`` call."""
_SAMPLE_SALT = "longnet-tokenizer-sample-v1"


def token_dtype(vocab_size: int) -> np.dtype:
    """``uint16`` when every id fits (vocab_size <= 65536), else ``uint32``."""
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


@dataclass
class PreparedData:
    """Result of :func:`prepare_data`: where the token files are and what they hold."""

    directory: Path
    tokenizer: Tokenizer
    paths: dict[str, Path]
    num_tokens: dict[str, int]
    dtype: np.dtype
    manifest: dict = field(repr=False)
    reused: bool = False
    """True when the cache entry was complete and nothing was rebuilt."""

    def tokens(self, split: str) -> TokenStream:
        """The memory-mapped tokens of ``split``."""
        if split not in self.paths:
            raise ValueError(f"split must be one of {tuple(self.paths)}, got {split!r}")
        return TokenStream(self.paths[split], self.dtype, name=split)


def prepare_data(
    spec: str | Corpus,
    cache_dir: str | os.PathLike,
    vocab_size: int = 8192,
    *,
    tokenizer: Tokenizer | None = None,
    max_train_bytes: int | None = DEFAULT_MAX_TRAIN_BYTES,
    validation_fraction: float = 0.05,
    test_fraction: float = 0.05,
    max_document_bytes: int = DEFAULT_MAX_DOCUMENT_BYTES,
    progress: bool | None = None,
) -> PreparedData:
    """Corpus -> tokenizer -> token files, reusing a complete cache entry when nothing changed.

    Args:
        spec: a ``--data`` spec (see :func:`~longnet.data.corpus.load_corpus`) or a ``Corpus``.
        cache_dir: folder holding one sub-folder per (data, tokenizer) combination.
        vocab_size: size of the tokenizer to train (ignored when ``tokenizer`` is given).
        tokenizer: use this tokenizer instead of training one.
        max_train_bytes: text budget for tokenizer training: documents of the training split are
            sampled by key hash at the rate that fills about this many bytes (None: all).
        validation_fraction, test_fraction, max_document_bytes: corpus settings, used when
            ``spec`` is a string.
        progress: show a tqdm bar on stderr; None means only when stderr is a terminal.
    """
    if isinstance(spec, Corpus):
        corpus = spec
    elif isinstance(spec, str):
        corpus = load_corpus(
            spec,
            validation_fraction=validation_fraction,
            test_fraction=test_fraction,
            max_document_bytes=max_document_bytes,
        )
    else:
        raise TypeError(f"spec must be a str or a Corpus, got {type(spec).__name__}")
    if tokenizer is not None and not isinstance(tokenizer, Tokenizer):
        raise TypeError(f"tokenizer must be a longnet.data.Tokenizer, got {type(tokenizer).__name__}")
    if tokenizer is None:
        check_vocab_size(vocab_size)
        token_config = {
            "train": {"vocab_size": vocab_size, "max_train_bytes": max_train_bytes},
            "tokenizers": tokenizers.__version__,
        }
    else:
        token_config = {"given": tokenizer.sha256()}
    fingerprint = {"version": FORMAT_VERSION, "corpus": corpus.fingerprint(), "tokenizer": token_config}
    key = _sha256_json(fingerprint)[:20]
    directory = Path(cache_dir).expanduser() / key
    directory.mkdir(parents=True, exist_ok=True)
    show = sys.stderr.isatty() if progress is None else bool(progress)

    with _lock(directory / ".lock"):
        prepared = _load_complete(directory, key)
        if prepared is not None:
            return prepared
        (directory / MANIFEST_FILE).unlink(missing_ok=True)
        tokenizer = _obtain_tokenizer(corpus, directory, tokenizer, vocab_size, max_train_bytes)
        dtype = token_dtype(tokenizer.vocab_size)
        splits = {}
        for split in SPLITS:
            path = directory / f"{split}.bin"
            splits[split] = write_token_file(corpus, split, tokenizer, path, dtype, progress=show)
            splits[split]["file"] = path.name
        manifest = {
            "version": FORMAT_VERSION,
            "key": key,
            "source": corpus.spec,
            "corpus": fingerprint["corpus"],
            "tokenizer": {
                "file": TOKENIZER_FILE,
                "sha256": tokenizer.sha256(),
                "vocab_size": tokenizer.vocab_size,
                "eos_id": tokenizer.eos_id,
                "pad_id": tokenizer.pad_id,
                "config": token_config,
            },
            "dtype": dtype.name,
            "splits": splits,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        atomic_write_json(directory / MANIFEST_FILE, manifest, sort_keys=False)
    return _prepared(directory, tokenizer, manifest, reused=False)


def write_token_file(
    corpus: Corpus,
    split: str,
    tokenizer: Tokenizer,
    path: str | os.PathLike,
    dtype: np.dtype,
    *,
    progress: bool = False,
) -> dict:
    """Tokenize one split into ``path`` atomically; return its manifest entry.

    Documents are streamed, cut at exact boundaries (:func:`encoding_chunks`), encoded in
    batches, and each followed by the EOS id.
    """
    limit = np.iinfo(dtype).max
    if tokenizer.vocab_size - 1 > limit:
        raise ValueError(f"dtype {np.dtype(dtype).name} cannot hold ids up to {tokenizer.vocab_size - 1}")
    counts = {"num_tokens": 0, "num_documents": 0, "num_bytes": 0}
    digest = hashlib.sha256()
    bar = tqdm(
        total=corpus.estimated_bytes(split),
        unit="B",
        unit_scale=True,
        desc=f"tokenize {split}",
        disable=not progress,
        file=sys.stderr,
        leave=False,
    )
    with bar, atomic_open(path) as handle:
        for batch in _document_batches(corpus.split(split), ENCODE_BATCH_CHARS):
            pieces: list[str] = []
            owners: list[int] = []
            for index, document in enumerate(batch):
                chunks = encoding_chunks(document.text, ENCODE_CHUNK_CHARS)
                pieces.extend(chunks)
                owners.extend([index] * len(chunks))
            ids = tokenizer.encode_batch(pieces)
            flat: list[int] = []
            for i, piece_ids in enumerate(ids):
                flat.extend(piece_ids)
                if i + 1 == len(ids) or owners[i + 1] != owners[i]:
                    flat.append(tokenizer.eos_id)
            data = np.asarray(flat, dtype=dtype).tobytes()
            handle.write(data)
            digest.update(data)
            batch_bytes = sum(len(d.text.encode("utf-8")) for d in batch)
            counts["num_tokens"] += len(flat)
            counts["num_documents"] += len(batch)
            counts["num_bytes"] += batch_bytes
            bar.update(batch_bytes)
    counts["size"] = counts["num_tokens"] * np.dtype(dtype).itemsize
    counts["sha256"] = digest.hexdigest()
    return counts


def encoding_chunks(text: str, target: int) -> list[str]:
    """Cut ``text`` into pieces of about ``target`` characters that encode exactly as the whole.

    Cuts fall just before a newline whose previous character is not whitespace: no byte-level
    pre-token (GPT-2 regex) spans such a point, so encoding the pieces and concatenating gives
    the ids of the whole text, while long documents still spread over the batch's threads.
    """
    if target < 1:
        raise ValueError(f"target must be positive, got {target}")
    pieces = []
    start = 0
    while len(text) - start > target:
        cut = text.find("\n", start + target)
        while cut != -1 and text[cut - 1].isspace():
            cut = text.find("\n", cut + 1)
        if cut == -1:
            break
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


def _document_batches(documents: Iterable[Document], max_chars: int) -> Iterator[list[Document]]:
    batch: list[Document] = []
    size = 0
    for document in documents:
        batch.append(document)
        size += len(document.text)
        if size >= max_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _obtain_tokenizer(
    corpus: Corpus, directory: Path, given: Tokenizer | None, vocab_size: int, max_train_bytes: int | None
) -> Tokenizer:
    """The given tokenizer, one already in the entry (from an interrupted build) or a new one."""
    path = directory / TOKENIZER_FILE
    if given is not None:
        given.save(directory)
        return given
    if path.is_file():
        return Tokenizer.load(path)
    tokenizer = train_tokenizer(
        tokenizer_sample(corpus, max_train_bytes), vocab_size, max_train_bytes=max_train_bytes
    )
    tokenizer.save(directory)
    return tokenizer


def tokenizer_sample(corpus: Corpus, max_bytes: int | None) -> Iterator[str]:
    """Texts of training documents sampled by key hash at a rate filling about ``max_bytes``."""
    estimate = corpus.estimated_bytes("train")
    rate = 1.0 if max_bytes is None or estimate <= max_bytes else max_bytes / estimate
    seen = 0
    for document in corpus.split("train"):
        seen += 1
        digest = hashlib.sha256(f"{_SAMPLE_SALT}\0{document.key}".encode("utf-8")).digest()
        if int.from_bytes(digest[:8], "big") / 2.0**64 < rate:
            yield document.text
    if seen == 0:
        raise ValueError(
            f"the training split of --data {corpus.spec!r} is empty: all its documents fell into "
            "validation/test (splits are by path); add more files or JSONL lines"
        )


def _load_complete(directory: Path, key: str) -> PreparedData | None:
    """The entry if its manifest exists and every file matches it, else None."""
    manifest_path = directory / MANIFEST_FILE
    if not manifest_path.is_file():
        return None
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if manifest.get("version") != FORMAT_VERSION or manifest.get("key") != key:
        return None
    tokenizer_path = directory / TOKENIZER_FILE
    if not tokenizer_path.is_file():
        return None
    tokenizer = Tokenizer.load(tokenizer_path)
    if tokenizer.sha256() != manifest["tokenizer"]["sha256"]:
        return None
    for entry in manifest["splits"].values():
        path = directory / entry["file"]
        if not path.is_file() or path.stat().st_size != entry["size"]:
            return None
    return _prepared(directory, tokenizer, manifest, reused=True)


def _prepared(directory: Path, tokenizer: Tokenizer, manifest: dict, reused: bool) -> PreparedData:
    splits = manifest["splits"]
    return PreparedData(
        directory=directory,
        tokenizer=tokenizer,
        paths={split: directory / entry["file"] for split, entry in splits.items()},
        num_tokens={split: entry["num_tokens"] for split, entry in splits.items()},
        dtype=np.dtype(manifest["dtype"]),
        manifest=manifest,
        reused=reused,
    )


@contextmanager
def _lock(path: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``path`` (POSIX); a no-op where fcntl is missing."""
    with open(path, "a+b") as handle:
        if fcntl is not None:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _sha256_json(value: object) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode("utf-8")).hexdigest()

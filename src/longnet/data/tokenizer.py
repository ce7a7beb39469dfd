"""Byte-level BPE tokenizer (Hugging Face ``tokenizers``) trained on the training split.

Byte-level pre-tokenization (GPT-2 regex) and decoding make every UTF-8 string round-trip
exactly. Two special tokens: ``<|endoftext|>`` (id 0, separates documents in token files) and
``<|pad|>`` (id 1). Special-token strings that occur in the *text* are encoded as ordinary
text, so data can never inject a document separator.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from longnet.utils.atomic import atomic_write_text

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = (EOS_TOKEN, PAD_TOKEN)
TOKENIZER_FILE = "tokenizer.json"
SPECIAL_TOKENS_FILE = "special_tokens.json"
"""Names of the end-of-sequence and padding tokens when they are not the two above."""
DEFAULT_MAX_TRAIN_BYTES = 16 * 1024 * 1024
"""Tokenizer training reads at most this much text (16 MiB: about 9 s for 8192 ids on 2 cores)."""

_MIN_VOCAB = 256 + len(SPECIAL_TOKENS)


class Tokenizer:
    """A thin wrapper over a byte-level BPE ``tokenizers.Tokenizer``."""

    def __init__(self, backend: _HFTokenizer, *, eos_token: str = EOS_TOKEN, pad_token: str = PAD_TOKEN) -> None:
        if not isinstance(backend, _HFTokenizer):
            raise TypeError(f"backend must be a tokenizers.Tokenizer, got {type(backend).__name__}")
        eos_id = backend.token_to_id(eos_token)
        pad_id = backend.token_to_id(pad_token)
        if eos_id is None or pad_id is None:
            raise ValueError(f"backend lacks the special tokens {(eos_token, pad_token)}")
        backend.encode_special_tokens = True  # "<|endoftext|>" inside text is plain text
        self.backend = backend
        # other special tokens (a Hugging Face model's own tokenizer) are saved next to it
        self.special_tokens = {"eos_token": eos_token, "pad_token": pad_token}
        self.eos_id: int = eos_id
        self.pad_id: int = pad_id

    @property
    def vocab_size(self) -> int:
        """Number of token ids, special tokens included."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no special tokens added)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of several texts, encoded in parallel by the Rust backend."""
        encodings = self.backend.encode_batch_fast(texts, add_special_tokens=False)
        return [encoding.ids for encoding in encodings]

    def decode(self, ids: Iterable[int]) -> str:
        """The text of ``ids``; special tokens are kept as their strings."""
        return self.backend.decode(list(ids), skip_special_tokens=False)

    def to_str(self) -> str:
        """The tokenizer as the JSON text of ``tokenizer.json``."""
        return self.backend.to_str()

    def sha256(self) -> str:
        """Hash of the serialized tokenizer: identifies it in token-file manifests."""
        return hashlib.sha256(self.to_str().encode("utf-8")).hexdigest()

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``<directory>/tokenizer.json`` atomically and return its path."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / TOKENIZER_FILE
        atomic_write_text(path, self.to_str())
        if self.special_tokens != {"eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN}:
            atomic_write_text(directory / SPECIAL_TOKENS_FILE, json.dumps(self.special_tokens) + "\n")
        return path

    @classmethod
    def load(cls, directory: str | os.PathLike) -> Tokenizer:
        """Load ``<directory>/tokenizer.json`` (or a path to the file itself).

        ``directory`` may be a run folder of ``longnet train`` or one of its
        ``checkpoints/step-*``: ``Tokenizer.load("runs/tiny")`` is the run's tokenizer, the one
        its model was trained with (``special_tokens.json`` beside it, written for a Hugging Face
        model's own tokenizer, names the end-of-sequence and padding tokens).
        """
        path = Path(directory)
        if path.is_dir():
            path = path / TOKENIZER_FILE
        if not path.is_file():
            raise ValueError(f"tokenizer file {path} not found")
        special = path.parent / SPECIAL_TOKENS_FILE
        names = json.loads(special.read_text(encoding="utf-8")) if special.is_file() else {}
        return cls(_HFTokenizer.from_file(str(path)), **names)

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, eos_id={self.eos_id}, pad_id={self.pad_id})"


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    *,
    max_train_bytes: int | None = DEFAULT_MAX_TRAIN_BYTES,
    min_frequency: int = 2,
) -> Tokenizer:
    """Train a byte-level BPE tokenizer of ``vocab_size`` ids from an iterator of texts.

    Texts are streamed to the trainer (no temporary copy); once ``max_train_bytes`` UTF-8 bytes
    have been read the last text is cut and the rest ignored (``None``: no cap). The 256 byte
    symbols and the special tokens are always in the vocabulary.
    """
    check_vocab_size(vocab_size)
    if max_train_bytes is not None and max_train_bytes < 1:
        raise ValueError(f"max_train_bytes must be positive or None, got {max_train_bytes}")
    backend = _HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    counter = _ByteCounter(texts, max_train_bytes)
    backend.train_from_iterator(counter, trainer=trainer)
    if counter.bytes_read == 0:
        raise ValueError("cannot train a tokenizer: the training texts are empty")
    return Tokenizer(backend)


def check_vocab_size(vocab_size: int) -> None:
    """Raise TypeError/ValueError unless ``vocab_size`` is an int in [258, 2**32]."""
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool):
        raise TypeError(f"vocab_size must be an int, got {type(vocab_size).__name__}")
    if not _MIN_VOCAB <= vocab_size <= 2**32:
        raise ValueError(f"vocab_size must be in [{_MIN_VOCAB}, 2**32], got {vocab_size}")


class _ByteCounter:
    """Iterates texts up to a byte budget, counting what was read."""

    def __init__(self, texts: Iterable[str], max_bytes: int | None) -> None:
        self.texts = texts
        self.max_bytes = max_bytes
        self.bytes_read = 0

    def __iter__(self) -> Iterator[str]:
        for text in self.texts:
            data = text.encode("utf-8")
            if self.max_bytes is not None and self.bytes_read + len(data) > self.max_bytes:
                data = data[: self.max_bytes - self.bytes_read]
                self.bytes_read += len(data)
                if data:
                    yield data.decode("utf-8", errors="ignore")
                return
            self.bytes_read += len(data)
            if data:
                yield text

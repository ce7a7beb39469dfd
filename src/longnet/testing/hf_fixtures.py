"""A tiny Hugging Face model folder and corpus for tests and checks (made locally, no downloads).

:func:`write_llama` saves a random 2-layer Llama (GQA: 4 query heads, 2 key/value heads, original
context 8) with a byte-level BPE tokenizer trained on :func:`write_corpus`'s text: what
``longnet train --hf-model`` reads from a real model folder, small enough for CPU tests.
Needs ``transformers`` and ``tokenizers``.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

__all__ = ["write_corpus", "write_llama"]

WORDS = ["alpha", "beta", "gamma", "delta", "value", "items", "count", "(", ")", ":", "=", "+", "1", "2"]


def write_corpus(root: Path, files: int = 40, seed: int = 0) -> Path:
    """``files`` text files of 30 lines of random words from a 14-word vocabulary, in ``root``."""
    rng = random.Random(seed)
    root.mkdir(parents=True)
    for f in range(files):
        lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))) for _ in range(30)]
        (root / f"doc{f:03d}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def write_llama(folder: Path, corpus: Path) -> Path:
    """A random tiny Llama with a Llama-like tokenizer (<s>, </s>, no longnet special tokens)."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM

    backend = Backend(models.BPE(unk_token=None))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=120, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator([p.read_text() for p in sorted(corpus.iterdir())], trainer)
    folder.mkdir(parents=True)
    backend.save(str(folder / "tokenizer.json"))
    vocab = backend.get_vocab_size()
    config = LlamaConfig(vocab_size=vocab + 3, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8,
                         bos_token_id=backend.token_to_id("<s>"), eos_token_id=backend.token_to_id("</s>"),
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder

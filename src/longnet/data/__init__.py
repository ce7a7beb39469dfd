"""longnet.data: corpora, tokenizer, token files and loaders.

Typical use::

    prepared = prepare_data("stdlib", "~/.cache/longnet", vocab_size=8192)
    train = TrainBatches(prepared.tokens("train"), seq_len=8192, batch_size=8, seed=0)
    input_ids, labels = train.get(step)
    for input_ids, labels in EvalBatches(prepared.tokens("validation"), seq_len=8192):
        ...
"""

from longnet.data.corpus import (
    SPLITS,
    Corpus,
    CorpusSplit,
    Document,
    load_corpus,
    split_of,
    stdlib_root,
)
from longnet.data.loader import EvalBatches, TokenStream, TrainBatches
from longnet.data.tokenizer import EOS_TOKEN, PAD_TOKEN, Tokenizer, train_tokenizer
from longnet.data.tokens import PreparedData, prepare_data, token_dtype, write_token_file

__all__ = [
    "SPLITS",
    "Corpus",
    "CorpusSplit",
    "Document",
    "load_corpus",
    "split_of",
    "stdlib_root",
    "EOS_TOKEN",
    "PAD_TOKEN",
    "Tokenizer",
    "train_tokenizer",
    "PreparedData",
    "prepare_data",
    "token_dtype",
    "write_token_file",
    "TokenStream",
    "TrainBatches",
    "EvalBatches",
]

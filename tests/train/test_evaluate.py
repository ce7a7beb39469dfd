"""Scoring held-out tokens: batched windows give the one-window-at-a-time loss; NaN is an error."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from longnet.data import EvalBatches, TokenStream
from longnet.models import LongNetConfig, LongNetLM
from longnet.train.evaluate import (
    EVAL_BATCH_TOKENS,
    NonFiniteLoss,
    eval_batch_size,
    mean_loss,
    perplexities,
)

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def model(micro_model) -> LongNetLM:
    torch.manual_seed(0)
    config = LongNetConfig.from_preset("tiny", **micro_model, vocab_size=300, max_train_length=32)
    return LongNetLM(config).eval()


@pytest.fixture(scope="module")
def micro_model():
    return {"embed_dim": 32, "num_layers": 2, "num_heads": 2, "ffn_dim": 64,
            "segment_lengths": [8, 16], "dilation_rates": [1, 2]}


@pytest.fixture(scope="module")
def tokens(tmp_path_factory) -> TokenStream:
    path = tmp_path_factory.mktemp("tokens") / "validation.bin"
    np.random.default_rng(0).integers(0, 300, 4097, dtype=np.uint16).tofile(path)
    return TokenStream(path, np.uint16)


def _one_at_a_time(model: LongNetLM, tokens: TokenStream, seq_len: int, windows: int) -> float:
    """Mean loss of the first ``windows`` windows, scored one forward pass each, summed in float64."""
    total = 0.0
    with torch.no_grad():
        for i in range(windows):
            window = torch.from_numpy(tokens[i * seq_len: (i + 1) * seq_len + 1].astype(np.int64))[None]
            logits = model(window[:, :-1]).logits.double()  # (1, L, V)
            total += torch.nn.functional.cross_entropy(logits[0], window[0, 1:], reduction="sum").item()
    return total / (windows * seq_len)


@pytest.mark.parametrize("seq_len", [8, 32, 128])
def test_batched_scoring_matches_one_window_at_a_time(model, tokens, seq_len):
    batches = EvalBatches(tokens, seq_len, max_sequences=1024 // seq_len)
    want = _one_at_a_time(model, tokens, seq_len, len(batches))
    for batch_size in (None, 1, 5, len(batches)):  # None: the default budget
        loss, count = mean_loss(model, batches, CPU, torch.float32, batch_size=batch_size)
        assert count == len(batches) * seq_len == 1024
        assert loss == pytest.approx(want, abs=1e-6), batch_size


def test_perplexities_use_the_budget_and_score_the_same_tokens(model, tokens):
    assert eval_batch_size(32) == EVAL_BATCH_TOKENS // 32 > 1
    assert eval_batch_size(10 * EVAL_BATCH_TOKENS) == 1
    batched = perplexities(model, tokens, [16, 64], max_tokens=1024, device=CPU, dtype=torch.float32)
    single = perplexities(model, tokens, [16, 64], max_tokens=1024, device=CPU, dtype=torch.float32,
                          batch_size=1)
    for b, s in zip(batched, single):
        assert (b.tokens, b.windows, b.split) == (s.tokens, s.windows, s.split) == (1024, 1024 // b.seq_len,
                                                                                    "validation")
        assert b.loss == pytest.approx(s.loss, abs=1e-6)


def test_a_non_finite_loss_is_an_error_that_names_the_cause(model, tokens):
    broken = LongNetLM(model.config).eval()
    broken.load_state_dict(model.state_dict())
    name = next(n for n, _ in broken.named_parameters() if "norm" in n)
    with torch.no_grad():
        broken.get_parameter(name).fill_(math.nan)
    with pytest.raises(NonFiniteLoss, match=r"loss on 256 tokens of the validation split.* is nan.*"
                                            + name.replace(".", r"\.")):
        mean_loss(broken, EvalBatches(tokens, 32, max_sequences=8), CPU, torch.float32)

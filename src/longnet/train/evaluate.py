"""Perplexity on held-out tokens: non-overlapping windows, loss averaged over every token.

Window i of length L reads tokens ``[i*L, (i+1)*L + 1)``: every position of the window is scored
(its label is the next token), windows do not overlap, so ``max_tokens`` tokens give
``max_tokens // L`` windows over the *same* text for every L. Perplexity is ``exp`` of the mean
loss over all scored tokens. All lengths score the same tokens (see :func:`perplexities`).

Beyond the training length the model keeps its attention kind: LongNet keeps its dilated pattern
(it runs at any length), the dense baseline switches to blockwise causal attention of its training
length (``LongNetConfig.for_eval_length``), as in the paper's evaluation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from tqdm import tqdm

from longnet.data import EvalBatches, TokenStream
from longnet.models import LongNetLM
from longnet.train.runtime import autocast


@dataclass
class PerplexityResult:
    """The perplexity at one context length, or why that length was skipped."""

    seq_len: int
    windows: int = 0
    tokens: int = 0
    loss: float = math.nan
    skipped: str | None = None

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss) if self.skipped is None else math.nan


@torch.no_grad()
def mean_loss(
    model: torch.nn.Module,
    batches: EvalBatches,
    device: torch.device,
    dtype: torch.dtype,
    batch_size: int = 1,
    progress: bool | None = False,
    desc: str = "eval",
) -> tuple[float, int]:
    """``(mean next-token loss over every scored token, number of tokens)`` of ``batches``."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    bar = tqdm(total=len(batches), desc=desc, unit="win", leave=False,
               disable=None if progress is None else not progress)
    try:
        for input_ids, labels in batches.batches(batch_size):
            input_ids = input_ids.to(device, non_blocking=True)  # (b, L)
            labels = labels.to(device, non_blocking=True)  # (b, L)
            with autocast(device, dtype):
                out = model(input_ids, labels=labels)
            n = labels.numel()
            total += float(out.loss.double()) * n
            count += n
            bar.update(input_ids.shape[0])
    finally:
        bar.close()
        model.train(was_training)
    return total / count, count


def model_for_length(model: LongNetLM, seq_len: int) -> LongNetLM:
    """``model`` itself, or a copy sharing its weights set up for ``seq_len`` (dense -> blockwise)."""
    config = model.config.for_eval_length(seq_len)
    if config == model.config:
        return model
    other = LongNetLM(config)
    other.load_state_dict(model.state_dict())
    param = next(model.parameters())
    return other.to(device=param.device, dtype=param.dtype)


def perplexities(
    model: LongNetLM,
    tokens: TokenStream,
    seq_lens: list[int],
    *,
    max_tokens: int | None,
    device: torch.device,
    dtype: torch.dtype,
    batch_size: int = 1,
    progress: bool | None = None,
) -> list[PerplexityResult]:
    """Perplexity of ``model`` on ``tokens`` at each context length in ``seq_lens``.

    Lengths the split cannot fill (fewer than L + 1 tokens) are returned with ``skipped`` set.
    Every other length scores the same first ``T`` tokens of the split: ``T`` is ``max_tokens``
    (None: the whole split) rounded down to a multiple of the longest such length (at least one
    window of it), so the figures compare the same text. Lengths that do not divide ``T`` score
    the ``T // L`` whole windows that fit.
    """
    fillable = [n for n in seq_lens if len(tokens) >= n + 1]
    budget = 0
    if fillable:
        longest = max(fillable)
        available = len(tokens) - 1 if max_tokens is None else min(max_tokens, len(tokens) - 1)
        budget = max(longest, available // longest * longest)
    results = []
    for seq_len in seq_lens:
        if seq_len not in fillable:
            results.append(PerplexityResult(seq_len, skipped=(
                f"the {tokens.name} split has {len(tokens):,} tokens, fewer than {seq_len + 1:,}")))
            continue
        batches = EvalBatches(tokens, seq_len, max_sequences=budget // seq_len)
        runner = model_for_length(model, seq_len)
        loss, count = mean_loss(runner, batches, device, dtype, batch_size, progress, desc=f"eval @{seq_len}")
        results.append(PerplexityResult(seq_len, windows=len(batches), tokens=count, loss=loss))
    return results

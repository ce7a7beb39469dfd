"""Perplexity on held-out tokens: non-overlapping windows, loss averaged over every token.

Window i of length L reads tokens ``[i*L, (i+1)*L + 1)``: every position of the window is scored
(its label is the next token), windows do not overlap, so ``max_tokens`` tokens give
``max_tokens // L`` windows over the *same* text for every L. Perplexity is ``exp`` of the mean
loss over all scored tokens. All lengths score the same tokens (see :func:`perplexities`).

Short windows are scored many at a time: a forward pass takes ``EVAL_BATCH_TOKENS // L`` windows
(at least one), which changes only the float32 summation order, not which tokens are scored.
A loss that is NaN or infinite raises :class:`NonFiniteLoss` rather than becoming a figure.

Beyond the training length the model keeps its attention kind: LongNet keeps its dilated pattern
(it runs at any length), the dense baseline switches to blockwise causal attention of its training
length (``LongNetConfig.for_eval_length``), as in the paper's evaluation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from tqdm import tqdm

from longnet.data import EvalBatches, TokenStream
from longnet.models import LongNetLM
from longnet.train.runtime import autocast

EVAL_BATCH_TOKENS = 4096
"""Tokens per forward pass when scoring: ``EVAL_BATCH_TOKENS // L`` windows of length ``L`` (at least
one). Scoring 32-token windows one at a time spends most of the time in per-call overhead."""


class NonFiniteLoss(ArithmeticError):
    """The evaluation loss is NaN or infinite: the weights or the arithmetic broke, not the data."""


def eval_batch_size(seq_len: int, tokens_per_forward: int = EVAL_BATCH_TOKENS) -> int:
    """Windows of ``seq_len`` tokens per forward pass: ``tokens_per_forward // seq_len``, at least 1."""
    return max(1, tokens_per_forward // seq_len)


def non_finite_parameters(model: torch.nn.Module) -> list[str]:
    """Names of ``model``'s parameters and buffers that hold a NaN or an infinity."""
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    return [name for name, t in tensors if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def check_finite_loss(loss: float, model: torch.nn.Module, what: str, dtype: torch.dtype) -> None:
    """Raise :class:`NonFiniteLoss` saying why when ``loss`` (the mean loss of ``what``) is NaN/inf."""
    if math.isfinite(loss):
        return
    broken = non_finite_parameters(model)
    if broken:
        cause = (f"{len(broken)} of the model's weight tensors hold NaN or infinity (first: {broken[0]}); "
                 "these weights cannot be evaluated: use an earlier checkpoint, or retrain with a lower --lr")
    else:
        cause = (f"the weights are finite but the forward pass overflows in {str(dtype).replace('torch.', '')}; "
                 "evaluate with --dtype float32")
    raise NonFiniteLoss(f"the loss on {what} is {loss}: {cause}")


@dataclass
class PerplexityResult:
    """The perplexity at one context length, or why that length was skipped."""

    seq_len: int
    windows: int = 0
    tokens: int = 0
    """How many tokens were scored (``windows * seq_len``)."""
    loss: float = math.nan
    skipped: str | None = None
    split: str = ""
    """The name of the split the tokens came from (``validation``, ``test``)."""

    @property
    def perplexity(self) -> float:
        """``exp(loss)`` (infinity past float64's range); NaN for a skipped length."""
        if self.skipped is not None:
            return math.nan
        try:
            return math.exp(self.loss)
        except OverflowError:  # a finite loss above ~709.8 nats
            return math.inf


@torch.no_grad()
def mean_loss(
    model: torch.nn.Module,
    batches: EvalBatches,
    device: torch.device,
    dtype: torch.dtype,
    batch_size: int | None = None,
    progress: bool | None = False,
    desc: str = "eval",
    mesh: Any = None,
) -> tuple[float, int]:
    """``(mean next-token loss over every scored token, number of tokens)`` of ``batches``.

    ``batch_size``: windows per forward pass (None: :func:`eval_batch_size`); the loss does not
    depend on it beyond float32 rounding. ``mesh``: a :class:`~longnet.parallel.TrainMesh` whose
    ranks share the work (windows split over the data-parallel ranks, columns over the
    sequence-parallel ones, up to ``dp - 1`` trailing windows left out so that every rank runs
    as many batches; every rank gets the same result), or None for this process alone. Raises
    :class:`NonFiniteLoss` when the loss is NaN/inf.
    """
    start, stop = mesh.columns(batches.seq_len) if mesh is not None else (0, batches.seq_len)
    rank, world = (mesh.dp_rank, mesh.dp) if mesh is not None else (0, 1)
    batch_size = eval_batch_size(stop - start) if batch_size is None else batch_size
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64)  # (loss sum, token count)
    bar = tqdm(total=len(batches) // world, desc=desc, unit="win", leave=False,
               disable=None if progress is None else not progress)
    try:
        for input_ids, labels in batches.batches(batch_size, start, stop, rank=rank, world=world):
            input_ids = input_ids.to(device, non_blocking=True)  # (b, n)
            labels = labels.to(device, non_blocking=True)  # (b, n)
            with autocast(device, dtype):
                out = model(input_ids, labels=labels)
            n = labels.numel()
            total[0] += float(out.loss.double()) * n
            total[1] += n
            bar.update(input_ids.shape[0])
    finally:
        bar.close()
        model.train(was_training)
    if mesh is not None:
        total = mesh.sum(total.to(device)).cpu()
    loss, count = float(total[0]) / float(total[1]), int(total[1])
    check_finite_loss(loss, model, f"{count:,} tokens of the {batches.tokens.name} split in windows of "
                      f"{batches.seq_len:,}", dtype)
    return loss, count


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
    batch_size: int | None = None,
    progress: bool | None = None,
    for_length: Any = None,
) -> list[PerplexityResult]:
    """Perplexity of ``model`` on ``tokens`` at each context length in ``seq_lens``.

    Lengths the split cannot fill (fewer than L + 1 tokens) are returned with ``skipped`` set.
    Every other length scores the same first ``T`` tokens of the split: ``T`` is ``max_tokens``
    (None: the whole split) rounded down to a multiple of the longest such length (at least one
    window of it), so the figures compare the same text. Lengths that do not divide ``T`` score
    the ``T // L`` whole windows that fit. ``batch_size``: windows per forward pass (None: as
    many as fit in :data:`EVAL_BATCH_TOKENS`). ``for_length(model, L)``: the model to score
    length ``L`` with (None: :func:`model_for_length`, a LongNet model's rule; a model family's
    ``for_length``). Raises :class:`NonFiniteLoss` on a NaN/inf loss.
    """
    for_length = model_for_length if for_length is None else for_length
    fillable = [n for n in seq_lens if len(tokens) >= n + 1]
    budget = 0
    if fillable:
        longest = max(fillable)
        available = len(tokens) - 1 if max_tokens is None else min(max_tokens, len(tokens) - 1)
        budget = max(longest, available // longest * longest)
    results = []
    for seq_len in seq_lens:
        if seq_len not in fillable:
            results.append(PerplexityResult(seq_len, split=tokens.name, skipped=(
                f"the {tokens.name} split has {len(tokens):,} tokens, fewer than {seq_len + 1:,}")))
            continue
        batches = EvalBatches(tokens, seq_len, max_sequences=budget // seq_len)
        runner = for_length(model, seq_len)
        loss, count = mean_loss(runner, batches, device, dtype, batch_size, progress, desc=f"eval @{seq_len}")
        results.append(PerplexityResult(seq_len, windows=len(batches), tokens=count, loss=loss, split=tokens.name))
    return results

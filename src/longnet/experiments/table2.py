"""The paper's Table 2 in miniature: dense, sparse and dilated attention trained on one budget.

Design (the paper's, section 4, at CPU scale):

- Six rows, all of one model shape, trained with the same data, tokenizer, seed (hence data
  order), optimizer, number of steps and tokens per step: a dense Transformer trained at 2K, a
  Sparse Transformer and LongNet trained at 8K and at 32K (the paper's five rows), and LongNet
  with shifted segments (``shift_segments``) trained at 8K, a causal variant without blind spots.
- The paper's pattern: ``w = 2048 ... 32768``, ``r = 1, 2, 4, 6, 12`` (``w = min(w, N)``), on 12
  heads so that every residue of every branch has a head (``num_heads >= max r``).
- Every model is evaluated at 2K, 8K and 32K on the same held-out tokens; beyond its training
  length the dense model runs blockwise causal attention, as in the paper
  (:meth:`LongNetConfig.for_eval_length`).
- Uncertainty: the scored tokens are the same at every length and for every model, so they are
  cut into blocks (``bootstrap_block`` tokens) and resampled with replacement; one resample is
  shared by all models and lengths, which gives paired intervals for differences too.
- What context is used for: the mean loss at each position of the longest window (log-spaced
  buckets), and a copy probe: a held-out span, other held-out text, then the same span again;
  the loss drop on the repeat, at several distances, says whether a model copies from that far.

Scales: :meth:`Table2Plan.preset` ``"default"`` (2-core CPU, about an hour), ``"quick"``
(lengths / 16, a smoke run of a few minutes) and ``"large"`` (a GPU run). Every row trains in its
own run folder through :func:`longnet.train.train`, so an interrupted experiment resumes where it
stopped; a row that is complete (``row.json``) is not run again.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from longnet.paper import PAPER_DILATION_RATES, PAPER_EVAL_LENGTHS, PAPER_SEGMENT_LENGTHS, PAPER_TABLE2


@dataclass(frozen=True)
class Row:
    """One model of the table: ``model`` names the attention, ``train_length`` is at full scale."""

    model: str
    attention: str
    train_length: int
    shift_segments: bool = False

    @property
    def key(self) -> str:
        return f"{self.model}-{self.train_length}"


ROWS: tuple[Row, ...] = (
    Row("transformer", "dense", 2048),
    Row("sparse", "sparse", 8192),
    Row("longnet", "dilated", 8192),
    Row("sparse", "sparse", 32768),
    Row("longnet", "dilated", 32768),
    Row("longnet-shifted", "dilated", 8192, shift_segments=True),
)
"""The paper's five rows and the shifted-segment variant."""

SPARSE_BLOCK = 2048
"""Local block of the Sparse Transformer rows (full scale); its stride is the largest rate."""


@dataclass
class Table2Plan:
    """Everything one run of the experiment depends on; lengths are divided by ``scale``."""

    scale: int = 1
    embed_dim: int = 192
    num_layers: int = 2
    num_heads: int = 12
    ffn_dim: int = 768
    vocab_size: int = 4096
    steps: int = 64
    tokens_per_step: int = 32768
    lr: float = 3e-3
    warmup_steps: int = 4
    seed: int = 0
    data: str = "stdlib"
    split: str = "test"
    """Held-out split scored (the stdlib corpus: 0.93M test tokens, 0.12M validation tokens)."""
    eval_tokens: int | None = 262_144
    """Scored tokens per length (rounded down to a multiple of the longest); None = the whole split."""
    copy_span: int = 512
    copy_distances: tuple[int, ...] = (512, 4096, 16384, 31744)
    """Distances (full scale) between the two copies of the probe span; each must be >= copy_span."""
    copy_samples: int = 4
    bootstrap_block: int = 2048
    bootstrap_samples: int = 2000
    rows: tuple[str, ...] = tuple(r.key for r in ROWS)
    """Row keys to run (``model-train_length``, full scale)."""

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "Table2Plan":
        """``"default"`` (CPU, about an hour), ``"quick"`` (minutes) or ``"large"`` (one GPU, hours)."""
        presets: dict[str, dict[str, Any]] = {
            "default": {},
            "quick": dict(scale=16, embed_dim=48, num_layers=2, ffn_dim=96, vocab_size=512, steps=6,
                          tokens_per_step=2048, warmup_steps=1, eval_tokens=6144, copy_samples=2,
                          bootstrap_samples=200),
            "large": dict(embed_dim=384, num_layers=6, ffn_dim=1536, vocab_size=8192, steps=2000,
                          tokens_per_step=262_144, lr=1e-3, warmup_steps=100),
        }
        from longnet.experiments.presets import from_preset

        return from_preset(cls, presets, name, overrides)

    def __post_init__(self) -> None:
        self.copy_distances = tuple(self.copy_distances)
        self.rows = tuple(self.rows)
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad field."""
        for name in ("scale", "embed_dim", "num_layers", "num_heads", "ffn_dim", "vocab_size", "steps",
                     "tokens_per_step", "copy_span", "copy_samples", "bootstrap_block", "bootstrap_samples"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if PAPER_SEGMENT_LENGTHS[0] % self.scale or PAPER_EVAL_LENGTHS[0] % self.scale:
            raise ValueError(f"scale must divide {PAPER_SEGMENT_LENGTHS[0]}, got {self.scale}")
        if self.num_heads < max(PAPER_DILATION_RATES):
            raise ValueError(f"num_heads must be >= {max(PAPER_DILATION_RATES)} (the largest dilation rate) so "
                             f"every residue of every branch has a head, got {self.num_heads}")
        keys = {r.key for r in ROWS}
        bad = [k for k in self.rows if k not in keys]
        if bad or not self.rows:
            raise ValueError(f"rows must be a non-empty subset of {sorted(keys)}, got {list(self.rows)}")
        if self.tokens_per_step < self.max_train_length:
            raise ValueError(f"tokens_per_step must be >= the longest training length {self.max_train_length}, "
                             f"got {self.tokens_per_step}")
        if self.tokens_per_step % self.max_train_length:
            raise ValueError(f"tokens_per_step must be a multiple of {self.max_train_length} (every row takes "
                             f"whole sequences), got {self.tokens_per_step}")
        for d in self.copy_distances:
            if d < self.copy_span or d // self.scale + self.copy_span // self.scale > self.eval_lengths[-1]:
                raise ValueError(f"copy_distances must be >= copy_span ({self.copy_span}) and fit the longest "
                                 f"eval window with the span; got {d}")
        if self.eval_tokens is not None and (isinstance(self.eval_tokens, bool) or not isinstance(self.eval_tokens, int)
                                             or self.eval_tokens < 1):
            raise ValueError(f"eval_tokens must be a positive integer or None, got {self.eval_tokens!r}")
        if self.split not in ("validation", "test"):
            raise ValueError(f"split must be 'validation' or 'test', got {self.split!r}")

    # lengths at this scale ----------------------------------------------------------------
    def length(self, n: int) -> int:
        return n // self.scale

    @property
    def segment_lengths(self) -> tuple[int, ...]:
        return tuple(self.length(w) for w in PAPER_SEGMENT_LENGTHS)

    @property
    def dilation_rates(self) -> tuple[int, ...]:
        return PAPER_DILATION_RATES

    @property
    def eval_lengths(self) -> tuple[int, ...]:
        return tuple(self.length(n) for n in PAPER_EVAL_LENGTHS)

    @property
    def max_train_length(self) -> int:
        return max(self.length(r.train_length) for r in self.selected_rows)

    @property
    def selected_rows(self) -> list[Row]:
        return [r for r in ROWS if r.key in self.rows]

    def model_overrides(self, row: Row) -> dict[str, Any]:
        """The LongNetConfig fields of ``row`` (the preset's other fields are not used)."""
        return dict(embed_dim=self.embed_dim, num_layers=self.num_layers, num_heads=self.num_heads,
                    ffn_dim=self.ffn_dim, segment_lengths=list(self.segment_lengths),
                    dilation_rates=list(self.dilation_rates), position="xpos", attention=row.attention,
                    sparse_block=self.length(SPARSE_BLOCK), sparse_stride=max(self.dilation_rates),
                    shift_segments=row.shift_segments)

    def train_settings(self, row: Row, cache_dir: str | None, device: str, progress: bool | None) -> dict[str, Any]:
        """The ``longnet train`` settings of ``row``: everything but the model's attention is shared."""
        settings = dict(preset="tiny", model_overrides=self.model_overrides(row), data=self.data,
                        vocab_size=self.vocab_size, seq_len=self.length(row.train_length),
                        batch_tokens=self.tokens_per_step, seed=self.seed, lr=self.lr,
                        warmup_steps=self.warmup_steps, decay_steps=self.steps, max_steps=self.steps,
                        eval_every=self.steps, eval_tokens=self.tokens_per_step, save_every=max(1, self.steps // 4),
                        device=device, progress=progress)
        if cache_dir is not None:
            settings["cache_dir"] = cache_dir
        return settings

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))


# ------------------------------------------------------------------------------------ scoring
@torch.no_grad()
def _per_token_loss(runner, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(b * n,) next-token losses of ``runner`` (autocast as ``longnet eval``: bf16 on GPU), on the CPU."""
    from longnet.train.runtime import autocast, resolve_dtype

    device = input_ids.device
    with autocast(device, resolve_dtype("auto", device)):
        logits = runner(input_ids).logits
    return F.cross_entropy(logits.float().flatten(0, 1), labels.to(device).flatten(), reduction="none").cpu()


@torch.no_grad()
def token_losses(model, tokens, seq_len: int, num_windows: int, device: torch.device,
                 desc: str = "eval") -> np.ndarray:
    """Next-token loss of every scored token of the first ``num_windows`` windows: (windows, seq_len)."""
    from longnet.data import EvalBatches
    from longnet.train.evaluate import model_for_length

    runner = model_for_length(model, seq_len)
    runner.eval()
    out = np.empty((num_windows, seq_len), dtype=np.float64)
    batches = EvalBatches(tokens, seq_len, max_sequences=num_windows)
    for i, (input_ids, labels) in enumerate(tqdm(batches.batches(1), total=len(batches), desc=desc,
                                                  unit="win", leave=False, disable=None)):
        out[i] = _per_token_loss(runner, input_ids.to(device), labels).double().numpy()
    return out


def position_buckets(losses: np.ndarray) -> list[dict[str, float]]:
    """Mean loss over windows per position, in log2-spaced buckets ``[2^k, 2^(k+1))`` (1-based)."""
    per_position = losses.mean(axis=0)
    n = per_position.shape[0]
    buckets, start = [], 1
    while start <= n:
        stop = min(2 * start, n + 1)
        if n + 1 - stop < start:  # a last bucket shorter than this one is folded into it
            stop = n + 1
        buckets.append({"start": start, "stop": stop - 1, "loss": float(per_position[start - 1 : stop - 1].mean())})
        start = stop
    return buckets


def copy_probe(model, tokens, plan: Table2Plan, device: torch.device) -> dict[str, Any]:
    """How much seeing a span ``distance`` tokens earlier lowers the loss on it.

    Sample ``s`` takes held-out text at a fixed place: its first ``distance`` tokens (span ``A``,
    then the text after it) and ``A`` again, so the repeat starts ``distance`` tokens after the
    first copy. The control replaces the first copy by another held-out span of the same length.
    ``gain`` = loss on the repeat in the control - loss on the repeat after the copy (nats): about 0
    for a model that does not copy from that far, up to the control loss for perfect copying.
    """
    from longnet.train.evaluate import model_for_length

    span = plan.length(plan.copy_span)
    results = []
    for distance_full in plan.copy_distances:
        distance = plan.length(distance_full)
        length = distance + span - 1
        runner = model_for_length(model, length)
        runner.eval()
        copied, control = [], []
        stride = max(length + span, (len(tokens) - length - span - 1) // max(1, plan.copy_samples))
        for s in range(plan.copy_samples):
            begin = s * stride
            if begin + distance + span > len(tokens):
                break
            text = np.asarray(tokens[begin : begin + distance + span], dtype=np.int64)
            first, other = text[:span], text[distance : distance + span]  # `other`: the text after the gap
            for prefix, into in ((first, copied), (other, control)):
                seq = np.concatenate([prefix, text[span:distance], first])
                ids = torch.from_numpy(seq[:-1]).unsqueeze(0).to(device)
                labels = torch.from_numpy(seq[1:]).unsqueeze(0).to(device)
                loss = _per_token_loss(runner, ids, labels)
                into.append(float(loss[distance : distance + span - 1].mean()))  # targets 1.. of the repeat
        if copied:
            results.append({"distance": distance, "control": float(np.mean(control)),
                            "after_copy": float(np.mean(copied)),
                            "gain": float(np.mean(control) - np.mean(copied)), "samples": len(copied)})
    return {"span": span, "by_distance": results}


def bootstrap_indices(num_blocks: int, samples: int, seed: int) -> np.ndarray:
    """(samples, num_blocks) block indices drawn with replacement; shared by every model and length."""
    rng = np.random.default_rng([seed, 2])
    return rng.integers(0, num_blocks, size=(samples, num_blocks))


def block_means(flat_losses: np.ndarray, block: int) -> np.ndarray:
    """Mean loss of each ``block``-token block of the scored tokens (the tail block may be shorter)."""
    edges = np.arange(0, flat_losses.shape[0], block)
    return np.add.reduceat(flat_losses, edges) / np.diff(np.append(edges, flat_losses.shape[0]))


def _interval(values: np.ndarray) -> list[float]:
    lo, hi = np.percentile(values, [2.5, 97.5])
    return [float(lo), float(hi)]


# ---------------------------------------------------------------------------------- the run
@dataclass
class RowResult:
    """What one row records (``RUN/<row>/row.json``)."""

    row: dict[str, Any]
    parameters: int
    train_tokens: int
    train_flops: float
    train_wall_s: float
    eval_wall_s: float
    train_loss: float
    loss: dict[str, float]
    loss_by_position: list[dict[str, float]]
    copy: dict[str, Any]
    plan: dict[str, Any] = field(default_factory=dict)


def run_table2(plan: Table2Plan, out: str | Path, *, cache_dir: str | None = None, device: str = "auto",
               progress: bool | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train and evaluate every row of ``plan`` in ``out`` (resumable); return the results document."""
    from longnet.bench.report import device_name
    from longnet.data import prepare_data
    from longnet.models import LongNetLM
    from longnet.train import default_cache_dir, train
    from longnet.train.runtime import resolve_device
    from longnet.utils.atomic import atomic_write_json

    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    torch_device = resolve_device(device)
    cache = cache_dir or default_cache_dir()
    prepared = prepare_data(plan.data, cache, plan.vocab_size, progress=progress)
    held_out = prepared.tokens(plan.split)
    longest = plan.eval_lengths[-1]
    available = len(held_out) - 1 if plan.eval_tokens is None else min(plan.eval_tokens, len(held_out) - 1)
    if available < longest:
        raise ValueError(f"the {plan.split} split of --data {plan.data!r} has {len(held_out):,} tokens, fewer than "
                         f"the longest eval length {longest + 1:,}; use more data or a smaller --scale")
    scored = available // longest * longest
    log(f"table2: {len(plan.selected_rows)} models, {plan.steps} steps x {plan.tokens_per_step:,} tokens, "
        f"eval at {list(plan.eval_lengths)} on {scored:,} {plan.split} tokens; runs in {out}")

    results: dict[str, RowResult] = {}
    for index, row in enumerate(plan.selected_rows, 1):
        folder = out / row.key
        done = folder / "row.json"
        if done.is_file():
            stored = json.loads(done.read_text(encoding="utf-8"))
            if stored.get("plan") == plan.to_dict():
                results[row.key] = RowResult(**stored)
                log(f"[{index}/{len(plan.selected_rows)}] {row.key}: done earlier ({done})")
                continue
            raise ValueError(f"{done} was written by another plan; use a new --out or remove {folder}")
        log(f"[{index}/{len(plan.selected_rows)}] {row.key}: train at {plan.length(row.train_length):,} tokens")
        settings = plan.train_settings(row, cache, device, progress)
        resume = (folder / "run.json").is_file()
        trained = train(settings, folder, resume=resume, log=log)
        model = LongNetLM.from_pretrained(trained.checkpoint).to(torch_device)
        elapsed = _train_elapsed(trained)
        start = time.perf_counter()
        losses: dict[str, float] = {}
        flat: dict[int, np.ndarray] = {}
        by_position: list[dict[str, float]] = []
        for n in plan.eval_lengths:
            per_token = token_losses(model, held_out, n, scored // n, torch_device, desc=f"{row.key} eval @{n}")
            flat[n] = per_token.reshape(-1)
            losses[str(n)] = float(flat[n].mean())
            if n == longest:
                by_position = position_buckets(per_token)
        np.savez_compressed(folder / "token_losses.npz", **{str(n): v.astype(np.float32) for n, v in flat.items()})
        probe = copy_probe(model, held_out, plan, torch_device)
        result = RowResult(row=dataclasses.asdict(row), parameters=model.num_parameters(),
                           train_tokens=trained.tokens,
                           train_flops=float(model.flops_per_token(plan.length(row.train_length)) * trained.tokens),
                           train_wall_s=elapsed, eval_wall_s=time.perf_counter() - start,
                           train_loss=trained.train_loss, loss=losses, loss_by_position=by_position, copy=probe,
                           plan=plan.to_dict())
        atomic_write_json(done, dataclasses.asdict(result))
        results[row.key] = result
        log(f"    {row.key}: " + ", ".join(f"ppl@{n} {math.exp(losses[str(n)]):.2f}" for n in plan.eval_lengths)
            + f"; train {elapsed:.0f} s, eval {result.eval_wall_s:.0f} s")

    doc = summarize(plan, results, out, device_name(torch_device), torch_device.type)
    return doc


def _train_elapsed(trained) -> float:
    times = [r["time"] for r in trained.history if r.get("kind") == "train" and "time" in r]
    return float(times[-1]) if times else float("nan")


def _flat_losses(out: Path, key: str) -> dict[int, np.ndarray]:
    with np.load(out / key / "token_losses.npz") as data:
        return {int(n): data[n].astype(np.float64) for n in data.files}


def summarize(plan: Table2Plan, results: dict[str, RowResult], out: Path, device: str, device_type: str
              ) -> dict[str, Any]:
    """Perplexities with bootstrap intervals, paired comparisons and the paper's orderings."""
    lengths = plan.eval_lengths
    flats = {key: _flat_losses(out, key) for key in results}
    num_tokens = next(iter(flats.values()))[lengths[0]].shape[0]
    block = plan.length(plan.bootstrap_block)
    num_blocks = math.ceil(num_tokens / block)
    draws = bootstrap_indices(num_blocks, plan.bootstrap_samples, plan.seed)
    weights = np.diff(np.append(np.arange(0, num_tokens, block), num_tokens)).astype(np.float64)[draws]
    totals = weights.sum(axis=1)  # tokens in each resample (blocks are weighted by their length)

    def resampled(values: np.ndarray) -> np.ndarray:  # (samples,) mean loss of each resample
        return (block_means(values, block)[draws] * weights).sum(axis=1) / totals

    boot = {key: {n: resampled(flats[key][n]) for n in lengths} for key in results}
    rows = []
    for key, res in results.items():
        rows.append({
            "model": res.row["model"], "train_length": plan.length(res.row["train_length"]),
            "key": key, "parameters": res.parameters, "tokens": res.train_tokens,
            "train_flops": res.train_flops, "train_wall_s": round(res.train_wall_s, 1),
            "eval_wall_s": round(res.eval_wall_s, 1), "train_loss": res.train_loss,
            "perplexity": {str(n): math.exp(res.loss[str(n)]) for n in lengths},
            "interval": {str(n): [math.exp(v) for v in _interval(boot[key][n])] for n in lengths},
            "loss_by_position": res.loss_by_position, "copy": res.copy,
        })
    comparisons = paper_orderings(plan, boot, results)
    agree = sum(c["agrees"] for c in comparisons)
    significant = sum(c["agrees"] and c["significant"] for c in comparisons)
    against = sum((not c["agrees"]) and c["significant"] for c in comparisons)
    return {
        "experiment": "table2", "device": device, "device_type": device_type, "torch": torch.__version__,
        "plan": plan.to_dict(), "eval": {"split": plan.split, "tokens": num_tokens, "lengths": list(lengths),
                                         "bootstrap_block": block, "bootstrap_samples": plan.bootstrap_samples},
        "rows": rows, "paper": {k: {str(plan.length(n)): v for n, v in d.items()} for k, d in PAPER_TABLE2.items()},
        "orderings": {"checked": len(comparisons), "agree": agree, "agree_significant": significant,
                      "disagree_significant": against, "comparisons": comparisons},
    }


def paper_orderings(plan: Table2Plan, boot: dict[str, dict[int, np.ndarray]], results: dict[str, RowResult]
                    ) -> list[dict[str, Any]]:
    """Every ordering the paper's table states, checked on ours with a paired bootstrap.

    Between rows at each length (``a < b`` in perplexity) and within each row between lengths; an
    ordering ``agrees`` when our point estimates order the same way and is ``significant`` when
    the 95% interval of the paired difference of mean losses excludes 0.
    """
    paper = PAPER_TABLE2
    out = []
    lengths = PAPER_EVAL_LENGTHS
    keys = [k for k in paper if k in results]
    for n in lengths:
        m = plan.length(n)
        for i, a in enumerate(keys):
            for b in keys[i + 1:]:
                lo, hi = (a, b) if paper[a][n] < paper[b][n] else (b, a)
                out.append(_compare(f"{lo} < {hi} at {m}", boot[lo][m], boot[hi][m], results[lo].loss[str(m)],
                                    results[hi].loss[str(m)]))
    for a in keys:
        for n1, n2 in zip(lengths, lengths[1:]):
            lo, hi = (n1, n2) if paper[a][n1] < paper[a][n2] else (n2, n1)
            ml, mh = plan.length(lo), plan.length(hi)
            out.append(_compare(f"{a}: {ml} < {mh}", boot[a][ml], boot[a][mh], results[a].loss[str(ml)],
                                results[a].loss[str(mh)]))
    return out


def _compare(what: str, low: np.ndarray, high: np.ndarray, low_loss: float, high_loss: float) -> dict[str, Any]:
    diff = high - low  # positive where the ordering holds
    lo, hi = _interval(diff)
    return {"ordering": what, "agrees": bool(high_loss > low_loss), "loss_difference": high_loss - low_loss,
            "interval": [lo, hi], "significant": bool(lo > 0 or hi < 0)}

"""Does a LongNet model use long context? Multi-query associative recall at distance.

Design (see :mod:`longnet.experiments.recall_data` for the sequences):

- Five rows of one model shape, trained with the same data (a pure function of the seed), seed,
  initial weights, optimizer, schedule, steps and tokens per step; only the attention differs:
  dense attention over the whole sequence (the quadratic reference), dense attention in blocks of
  ``block`` tokens (the paper's Transformer-2K), a Sparse Transformer (local blocks of the
  smallest segment plus a strided branch of stride ``max(r)`` over the training length), LongNet
  (the paper's pattern scaled to the training length: ``w = N/16 ... N``, ``r = 1, 2, 4, 6,
  12``), and LongNet with shifted segments.
- Why two layers and twelve heads: a dilated branch's query reads only keys of its own residue
  modulo ``r``, so finding a pair at an arbitrary distance takes two hops. The first layer copies
  the pair into the next ``r`` positions (its ``r = 1`` branch reads them all), and the second
  layer's query meets one of those copies in its own residue. Items are at least ``SLOT - 13``
  tokens apart so the copies have room. Twelve heads give every residue of every branch a head;
  dense attention needs the same two layers (an induction head).
- A curriculum, the same for every row: ``short_steps`` steps at ``short_length`` tokens (the
  association is learnt cheaply; every pattern covers a short sequence), then ``long_steps`` steps
  at the training length.
- Loss on the answers only. Accuracy (argmax over the whole vocabulary) is reported in
  log-spaced distance buckets at the training length and at ``eval_factor`` times it, with 95%
  Wilson intervals. Chance is ``1 / num_values``.

Every row trains in its own folder with a checkpoint every ``save_every`` steps (and on Ctrl-C),
so an interrupted run resumes where it stopped; a finished row (``row.json``) is not run again,
and a row written by another plan is refused.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tqdm import tqdm

from longnet.experiments.recall_data import RecallVocab, make_batch, max_queries
from longnet.paper import PAPER_DILATION_RATES, PAPER_SEGMENT_LENGTHS, PAPER_TRAIN_LENGTH


@dataclass(frozen=True)
class RecallRow:
    """One model of the comparison; ``key`` names it on the command line and in the results."""

    key: str
    label: str
    attention: str
    shift_segments: bool = False


ROWS: tuple[RecallRow, ...] = (
    RecallRow("dense", "dense (full)", "dense"),
    RecallRow("dense-block", "dense in blocks", "block"),
    RecallRow("sparse", "Sparse Transformer", "sparse"),
    RecallRow("longnet", "LongNet", "dilated"),
    RecallRow("longnet-shifted", "LongNet, shifted segments", "dilated", shift_segments=True),
)
ROW_KEYS = tuple(r.key for r in ROWS)


@dataclass
class RecallPlan:
    """Everything one run depends on (stored with every row; a changed plan is refused)."""

    train_length: int = 4096
    """Training sequence length N (the long phase); the LongNet pattern is scaled to it."""
    short_length: int = 256
    """Sequence length of the curriculum's first phase."""
    short_steps: int = 400
    long_steps: int = 200
    tokens_per_step: int = 8192
    block: int = 2048
    """Block length of the ``dense-block`` row (the paper's Transformer-2K)."""
    embed_dim: int = 192
    num_layers: int = 2
    num_heads: int = 12
    ffn_dim: int = 384
    position: str = "xpos"
    num_keys: int = 32
    num_values: int = 32
    num_filler: int = 128
    queries_per_sequence: int = 16
    """At most this many pairs (and queries) per sequence, at every length: recall is then about
    distance, not about telling more and more keys apart as sequences grow."""
    min_distance: int = 64
    """Shortest query-to-pair distance (training and evaluation; the short phase uses half)."""
    lr: float = 1e-2
    """Peak learning rate: the best of 3e-3, 1e-2 and 3e-2 in a 150-step sweep on the dense row
    (see docs/experiments.md for the task version it was run on)."""
    warmup_steps: int = 20
    weight_decay: float = 0.01
    eval_factor: int = 2
    """Evaluation also runs at ``eval_factor * train_length``."""
    eval_sequences: int = 64
    """Sequences scored at each evaluation length."""
    save_every: int = 25
    seed: int = 0
    rows: tuple[str, ...] = ROW_KEYS

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "RecallPlan":
        """``"default"`` (2-core CPU, about an hour) or ``"quick"`` (seconds, for smoke tests)."""
        presets: dict[str, dict[str, Any]] = {
            "default": {},
            "quick": dict(train_length=512, short_length=128, short_steps=3, long_steps=2, tokens_per_step=1024,
                          block=256, embed_dim=24, ffn_dim=48, num_keys=16, num_values=16, num_filler=16,
                          queries_per_sequence=8,
                          warmup_steps=1, eval_sequences=2, save_every=2),
        }
        from longnet.experiments.presets import from_preset

        return from_preset(cls, presets, name, overrides)

    def __post_init__(self) -> None:
        self.rows = tuple(self.rows)
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad field."""
        for name in ("train_length", "short_length", "tokens_per_step", "block", "embed_dim", "num_layers",
                     "num_heads", "ffn_dim", "num_keys", "num_values", "num_filler", "queries_per_sequence",
                     "min_distance",
                     "eval_factor", "eval_sequences", "save_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("short_steps", "long_steps", "warmup_steps", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        if self.short_steps + self.long_steps < 1:
            raise ValueError("short_steps + long_steps must be >= 1")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.train_length % (PAPER_TRAIN_LENGTH // PAPER_SEGMENT_LENGTHS[0]):
            raise ValueError(f"train_length must be a multiple of {PAPER_TRAIN_LENGTH // PAPER_SEGMENT_LENGTHS[0]} "
                             f"(the pattern's smallest segment is train_length / 16), got {self.train_length}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim ({self.embed_dim}) must be a multiple of num_heads ({self.num_heads})")
        if self.num_heads < max(PAPER_DILATION_RATES):
            raise ValueError(f"num_heads must be >= {max(PAPER_DILATION_RATES)} so every residue of every branch "
                             f"has a head, got {self.num_heads}")
        for name, length in (("short_length", self.short_length), ("train_length", self.train_length)):
            if self.tokens_per_step % length:
                raise ValueError(f"tokens_per_step ({self.tokens_per_step}) must be a multiple of {name} ({length})")
            if 2 * self.min_distance > length:
                raise ValueError(f"{name} ({length}) must be >= 2 * min_distance ({self.min_distance})")
        if self.short_length > self.train_length:
            raise ValueError(f"short_length ({self.short_length}) must be <= train_length ({self.train_length})")
        if self.queries_per_sequence > self.num_keys:
            raise ValueError(f"queries_per_sequence ({self.queries_per_sequence}) must be <= num_keys "
                             f"({self.num_keys}): the keys of a sequence are distinct")
        if self.position not in ("xpos", "rope", "none"):
            raise ValueError(f"position must be 'xpos', 'rope' or 'none', got {self.position!r}")
        bad = [k for k in self.rows if k not in ROW_KEYS]
        if bad or not self.rows:
            raise ValueError(f"rows must be a non-empty subset of {list(ROW_KEYS)}, got {list(self.rows)}")

    # ------------------------------------------------------------------------------ derived
    @property
    def vocab(self) -> RecallVocab:
        return RecallVocab(self.num_keys, self.num_values, self.num_filler)

    @property
    def steps(self) -> int:
        return self.short_steps + self.long_steps

    @property
    def segment_lengths(self) -> tuple[int, ...]:
        return tuple(w * self.train_length // PAPER_TRAIN_LENGTH for w in PAPER_SEGMENT_LENGTHS)

    @property
    def eval_lengths(self) -> tuple[int, int]:
        return (self.train_length, self.eval_factor * self.train_length)

    @property
    def selected_rows(self) -> list[RecallRow]:
        return [r for r in ROWS if r.key in self.rows]

    def bucket_edges(self) -> list[int]:
        """Distance buckets ``[edges[i], edges[i+1])``: 64, 256, 1K (log4), then N/2, N, 2N."""
        n = self.train_length
        points = {self.min_distance, 4 * self.min_distance, 16 * self.min_distance, n // 2, n,
                  self.eval_lengths[-1]}
        return sorted(p for p in points if self.min_distance <= p <= self.eval_lengths[-1])

    def num_queries(self, length: int) -> int:
        """Queries in a sequence of ``length``: ``queries_per_sequence``, fewer where the slots run out."""
        return min(self.queries_per_sequence, max_queries(length))

    def phase(self, step: int) -> tuple[int, int]:
        """``(sequence length, shortest distance)`` of optimizer step ``step`` (0-based)."""
        if step < self.short_steps:
            return self.short_length, max(1, self.min_distance // 2)
        return self.train_length, self.min_distance

    def lr_at(self, step: int) -> float:
        """Linear warm-up, then cosine decay to a tenth over all steps."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps)
        return self.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))

    def model_config(self, row: RecallRow):
        """The :class:`~longnet.LongNetConfig` of ``row``: only the attention differs between rows."""
        from longnet.models import LongNetConfig

        attention = {"block": "dilated"}.get(row.attention, row.attention)
        segments, rates = list(self.segment_lengths), list(PAPER_DILATION_RATES)
        if row.attention == "block":
            segments, rates = [self.block], [1]
        return LongNetConfig(
            vocab_size=self.vocab.size, embed_dim=self.embed_dim, num_layers=self.num_layers,
            num_heads=self.num_heads, ffn_dim=self.ffn_dim, segment_lengths=segments, dilation_rates=rates,
            position=self.position, attention=attention, shift_segments=row.shift_segments,
            # full dense attention stays full at every evaluation length; the sparse pattern's
            # strided window is the training length
            max_train_length=self.eval_lengths[-1] if row.attention == "dense" else self.train_length,
            sparse_block=self.segment_lengths[0], sparse_stride=max(PAPER_DILATION_RATES))

    def to_dict(self) -> dict[str, Any]:
        """Every field but ``rows``: what a row's results depend on (rows may be run by separate
        commands into one folder, for example in parallel, and then reported together)."""
        doc = json.loads(json.dumps(dataclasses.asdict(self)))
        del doc["rows"]
        return doc


# ------------------------------------------------------------------------------ statistics
def wilson_interval(correct: int, total: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion (95% by default); ``(0, 1)`` when empty."""
    if total <= 0:
        return 0.0, 1.0
    p = correct / total
    denom = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denom
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denom
    low = 0.0 if correct == 0 else max(0.0, centre - half)
    high = 1.0 if correct == total else min(1.0, centre + half)
    return low, high


def bucket_accuracy(distances: np.ndarray, correct: np.ndarray, edges: list[int]) -> list[dict[str, Any]]:
    """Accuracy with its Wilson interval in each bucket ``[lo, hi)`` (the last bucket includes ``hi``)."""
    out = []
    for i, (lo, hi) in enumerate(zip(edges, edges[1:])):
        last = i == len(edges) - 2
        inside = (distances >= lo) & ((distances <= hi) if last else (distances < hi))
        n, k = int(inside.sum()), int(correct[inside].sum())
        low, high = wilson_interval(k, n)
        out.append({"lo": lo, "hi": hi, "n": n, "correct": k, "accuracy": k / n if n else None,
                    "interval": [low, high]})
    return out


# ------------------------------------------------------------------------------ training
@dataclass
class RowResult:
    """What one row records (``OUT/<row>/row.json``)."""

    row: dict[str, Any]
    parameters: int
    attention_flops_per_token: float
    train_tokens: int
    train_flops: float
    train_wall_s: float
    train_cpu_s: float
    threads: int
    eval_wall_s: float
    final_loss: float
    history: list[dict[str, float]]
    accuracy: dict[str, list[dict[str, Any]]]
    plan: dict[str, Any]


def _state_path(folder: Path) -> Path:
    return folder / "state.pt"


def _save_state(folder: Path, model, optimizer, step: int, elapsed: float, cpu: float, history: list,
                plan: RecallPlan) -> None:
    from longnet.utils.atomic import atomic_save

    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "elapsed": elapsed,
             "cpu": cpu, "history": history, "plan": plan.to_dict()}
    atomic_save(_state_path(folder), lambda path: torch.save(state, path))


def _answer_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    mask = labels >= 0
    return (logits.argmax(-1)[mask] == labels[mask]).float().mean()


def train_row(plan: RecallPlan, row: RecallRow, folder: Path, device: torch.device, *,
              progress: bool | None = None, log: Callable[[str], None] = print):
    """Train ``row`` in ``folder`` (resuming from its checkpoint); return ``(model, history, seconds)``,
    the seconds being ``(wall, process CPU)`` time of the training steps."""
    from longnet.models import LongNetLM

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(plan.seed)
    model = LongNetLM(plan.model_config(row)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=plan.lr, betas=(0.9, 0.98), weight_decay=plan.weight_decay)
    step, elapsed, cpu, history = 0, 0.0, 0.0, []
    path = _state_path(folder)
    if path.is_file():
        state = torch.load(path, map_location=device, weights_only=True)
        if state.get("plan") != plan.to_dict():
            raise ValueError(f"{path} was written by another plan; use a new --out or remove {folder}")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, elapsed, history = int(state["step"]), float(state["elapsed"]), list(state["history"])
        cpu = float(state.get("cpu", 0.0))
        log(f"    {row.key}: resuming at step {step} of {plan.steps}")
    model.train()
    bar = tqdm(total=plan.steps, initial=step, desc=f"{row.key} train", unit="step", leave=False,
               disable=None if progress is None else not progress)
    try:
        while step < plan.steps:
            start, start_cpu = time.perf_counter(), time.process_time()
            length, min_distance = plan.phase(step)
            batch = make_batch(plan.seed, 0, step, batch_size=plan.tokens_per_step // length, length=length,
                               vocab=plan.vocab, num_queries=plan.num_queries(length),
                               min_distance=min_distance, max_distance=length)
            for group in optimizer.param_groups:
                group["lr"] = plan.lr_at(step)
            out = model(batch.input_ids.to(device), labels=batch.labels.to(device))
            if not torch.isfinite(out.loss):
                raise FloatingPointError(f"{row.key}: loss is {out.loss.item()} at step {step}")
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            step += 1
            elapsed += time.perf_counter() - start
            cpu += time.process_time() - start_cpu
            acc = float(_answer_accuracy(out.logits.detach(), batch.labels.to(device)))
            history.append({"step": step, "length": length, "loss": float(out.loss.detach()), "accuracy": acc,
                            "time": round(elapsed, 2)})
            bar.update(1)
            bar.set_postfix(loss=f"{float(out.loss.detach()):.3f}", acc=f"{acc:.2f}", refresh=False)
            if step % plan.save_every == 0 or step == plan.steps:
                _save_state(folder, model, optimizer, step, elapsed, cpu, history, plan)
    except KeyboardInterrupt:
        _save_state(folder, model, optimizer, step, elapsed, cpu, history, plan)
        log(f"    {row.key}: interrupted at step {step}; saved, run the same command again to continue")
        raise
    finally:
        bar.close()
    return model, history, (elapsed, cpu)


@torch.no_grad()
def evaluate_row(plan: RecallPlan, model, device: torch.device, *, desc: str = "eval",
                 progress: bool | None = None) -> dict[str, dict[str, np.ndarray]]:
    """Every query's distance and whether the answer was right, at each evaluation length.

    The evaluation sequences (streams 1, 2, ...) are the same for every row.
    """
    from longnet.train.evaluate import model_for_length

    model.eval()
    out: dict[str, dict[str, np.ndarray]] = {}
    for stream, length in enumerate(plan.eval_lengths, 1):
        runner = model_for_length(model, length)
        runner.eval()
        per_batch = max(1, plan.tokens_per_step // length)
        distances, correct = [], []
        batches = math.ceil(plan.eval_sequences / per_batch)
        for i in tqdm(range(batches), desc=f"{desc} @{length}", unit="batch", leave=False,
                      disable=None if progress is None else not progress):
            size = min(per_batch, plan.eval_sequences - i * per_batch)
            batch = make_batch(plan.seed, stream, i, batch_size=size, length=length, vocab=plan.vocab,
                               num_queries=plan.num_queries(length),
                               min_distance=plan.min_distance, max_distance=length)
            logits = runner(batch.input_ids.to(device)).logits
            mask = batch.labels >= 0
            right = logits.argmax(-1).cpu()[mask] == batch.labels[mask]
            distances.append(batch.distances[mask].numpy())
            correct.append(right.numpy())
        out[str(length)] = {"distance": np.concatenate(distances), "correct": np.concatenate(correct)}
    return out


def attention_flops_per_token(model, length: int) -> float:
    """Forward attention FLOPs per token at ``length`` (all layers; causal pairs only)."""
    from longnet.ops.pattern import DilatedPattern

    c = model.config
    total = 0.0
    for pattern in c.patterns():
        if pattern is None:
            total += DilatedPattern.dense_flops(length, c.head_dim, c.num_heads, is_causal=True)
        else:
            total += pattern.flops(length, c.head_dim, c.num_heads, is_causal=True)
    return total / length


def run_recall(plan: RecallPlan, out: str | Path, *, device: str = "auto", progress: bool | None = None,
               log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train and evaluate every row of ``plan`` in ``out`` (resumable); return the results document."""
    from longnet.bench.report import device_name
    from longnet.train.runtime import resolve_device
    from longnet.utils.atomic import atomic_write_json

    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    torch_device = resolve_device(device)
    log(f"recall: {len(plan.selected_rows)} models, {plan.short_steps} steps at {plan.short_length} + "
        f"{plan.long_steps} at {plan.train_length} tokens ({plan.tokens_per_step:,} tokens per step); "
        f"eval at {list(plan.eval_lengths)}; runs in {out}")
    results: dict[str, RowResult] = {}
    for index, row in enumerate(plan.selected_rows, 1):
        folder = out / row.key
        done = folder / "row.json"
        if done.is_file():
            stored = json.loads(done.read_text(encoding="utf-8"))
            if stored.get("plan") != plan.to_dict():
                raise ValueError(f"{done} was written by another plan; use a new --out or remove {folder}")
            results[row.key] = RowResult(**stored)
            log(f"[{index}/{len(plan.selected_rows)}] {row.key}: done earlier ({done})")
            continue
        folder.mkdir(parents=True, exist_ok=True)
        log(f"[{index}/{len(plan.selected_rows)}] {row.key}: train")
        model, history, (elapsed, cpu) = train_row(plan, row, folder, torch_device, progress=progress, log=log)
        start = time.perf_counter()
        scored = evaluate_row(plan, model, torch_device, desc=f"{row.key} eval", progress=progress)
        eval_wall = time.perf_counter() - start
        np.savez_compressed(folder / "answers.npz", **{f"{k}_{n}": v for n, d in scored.items() for k, v in d.items()})
        edges = plan.bucket_edges()
        accuracy = {n: bucket_accuracy(d["distance"], d["correct"], [e for e in edges if e <= int(n)])
                    for n, d in scored.items()}
        tokens = plan.tokens_per_step * plan.steps
        flops = sum(model.flops_per_token(plan.phase(s)[0]) * plan.tokens_per_step for s in range(plan.steps))
        tail = history[-10:]
        result = RowResult(row=dataclasses.asdict(row), parameters=model.num_parameters(),
                           attention_flops_per_token=attention_flops_per_token(model, plan.train_length),
                           train_tokens=tokens, train_flops=float(flops), train_wall_s=round(elapsed, 1),
                           train_cpu_s=round(cpu, 1), threads=torch.get_num_threads(),
                           eval_wall_s=round(eval_wall, 1),
                           final_loss=float(np.mean([h["loss"] for h in tail])) if tail else float("nan"),
                           history=history, accuracy=accuracy, plan=plan.to_dict())
        atomic_write_json(done, dataclasses.asdict(result))
        results[row.key] = result
        summary = ", ".join(f"{b['lo']}-{b['hi']}: {b['accuracy']:.2f}" for b in accuracy[str(plan.eval_lengths[-1])]
                            if b["accuracy"] is not None)
        log(f"    {row.key}: accuracy @{plan.eval_lengths[-1]} by distance {summary}; train {elapsed:.0f} s")
    return summarize(plan, results, device_name(torch_device), torch_device.type)


def summarize(plan: RecallPlan, results: dict[str, RowResult], device: str, device_type: str) -> dict[str, Any]:
    """The results document: the plan, chance, buckets and one entry per row."""
    rows = []
    for key, res in results.items():
        rows.append({"key": key, "label": res.row["label"], "parameters": res.parameters,
                     "attention_flops_per_token": res.attention_flops_per_token, "train_tokens": res.train_tokens,
                     "train_flops": res.train_flops, "train_wall_s": res.train_wall_s,
                     "train_cpu_s": res.train_cpu_s, "threads": res.threads, "eval_wall_s": res.eval_wall_s,
                     "final_loss": res.final_loss, "accuracy": res.accuracy,
                     "curve": [{k: h[k] for k in ("step", "loss", "accuracy")} for h in res.history]})
    return {"experiment": "recall", "device": device, "device_type": device_type, "torch": torch.__version__,
            "plan": plan.to_dict(), "chance": 1.0 / plan.num_values, "eval_lengths": list(plan.eval_lengths),
            "segment_lengths": list(plan.segment_lengths), "dilation_rates": list(PAPER_DILATION_RATES),
            "buckets": plan.bucket_edges(), "rows": rows}

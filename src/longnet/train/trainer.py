"""The training loop of ``longnet train``: data, model, AdamW, schedule, checkpoints, metrics.

One optimizer step = ``batch_size = batch_tokens // seq_len`` sequences drawn by
``TrainBatches.get(step)`` (a pure function of seed and step), run as micro-batches whose
gradients accumulate, so the step minimizes the mean token loss of the whole batch. Then the
gradient norm is clipped, the learning rate of the step is set from the schedule, and AdamW steps
(:mod:`longnet.train.step`). On CPU the run is deterministic: a run resumed from a checkpoint ends
with the same weights, bit for bit, as one that never stopped.

The trainer is written once for every layout and every model family. It holds a
:class:`~longnet.parallel.TrainMesh` (one process, or a data x sequence grid under torchrun), a
model made ready for it by :func:`longnet.parallel.parallelize`, and a
:class:`~longnet.train.families.ModelFamily` that builds, loads, saves and describes the model
(LongNet preset or Hugging Face causal LM). Under torchrun the same loop matches one process up
to float32 summation order.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm import tqdm

from longnet.data import EvalBatches, PreparedData, TrainBatches, prepare_data
from longnet.models import CheckpointError
from longnet.parallel import Parallelized, TrainMesh, init_mesh, parallelize
from longnet.parallel.runtime import check_pattern_split, local_micro_batch
from longnet.train.checkpoint import (
    SHARDS_DIR,
    TrainerCheckpoint,
    latest_checkpoint,
    load_trainer_checkpoint,
    publish_top_level,
    restore_rng_states,
    resume_checkpoint,
    save_trainer_checkpoint,
    stage_checkpoint,
    staged_folder,
)
from longnet.train.config import MICRO_BATCH_TOKENS, TrainConfig, resolve_config
from longnet.train.evaluate import NonFiniteLoss, mean_loss
from longnet.train.families import ModelFamily, family_for
from longnet.train.metrics import MetricsLog, plot_losses
from longnet.train.optim import build_optimizer
from longnet.train.rundir import open_run_dir, write_run_file
from longnet.train.runtime import resolve_device, resolve_dtype
from longnet.train.schedule import learning_rate
from longnet.train.step import train_step

RUNTIME_FIELDS = ("grad_checkpointing", "backend")
"""Config fields that may differ between a checkpoint and the resumed run (they change no math)."""


class TrainingInterrupted(Exception):
    """SIGINT/SIGTERM stopped training after a checkpoint was saved."""

    def __init__(self, signum: int, step: int, run_dir: Path) -> None:
        self.signum, self.step, self.run_dir = signum, step, run_dir
        name = signal.Signals(signum).name
        super().__init__(f"interrupted by {name} at step {step}: checkpoint saved in {run_dir}; "
                         f"continue with: longnet train --out {run_dir} --resume")


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


@dataclass
class TrainResult:
    """What :func:`train` returns."""

    run_dir: Path
    step: int
    tokens: int
    train_loss: float
    val_loss: float | None
    checkpoint: Path | None
    history: list[dict[str, Any]] = field(default_factory=list)


class _StopFlag:
    """Records SIGINT/SIGTERM during training; a second SIGINT interrupts at once."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "_StopFlag":
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def build_config(config: TrainConfig, vocab_size: int) -> Any:
    """The model configuration of a run (:meth:`ModelFamily.model_config` of its family)."""
    return family_for(config).model_config(config, vocab_size)


def train(config: TrainConfig | dict[str, Any], out: str | Path, resume: bool = False,
          log: Callable[[str], None] = print) -> TrainResult:
    """Train (or resume) the run in ``out``; see ``longnet train --help`` for the settings.

    Under torchrun (``WORLD_SIZE`` set) every process calls this: the processes form a data x
    sequence parallel mesh (``sequence_parallel`` ranks per sequence) and rank 0 alone logs,
    writes metrics and checkpoints.

    The run has three steps: :func:`_build` (config, data, model, optimizer, resumed state),
    :func:`_run_steps` (the optimizer steps, evaluations and periodic checkpoints) and
    :func:`_finish` (final checkpoint, plot, report). A resume at or past ``--max-steps`` has no
    steps to run and changes nothing on disk (not even ``run.json``).

    Args:
        config: a :class:`~longnet.train.config.TrainConfig`, or the settings given explicitly as
            a flat dict (``{"lr": 1e-3, ...}``; None = not given).
        out: the run folder.
        resume: continue the run in ``out`` from its latest checkpoint.
        log: where one-line notes go (``print`` by default; rank 0 only under torchrun).

    Raises:
        ValueError (and :class:`CheckpointError`): bad settings, data, folder or checkpoint.
        TrainingInterrupted: SIGINT/SIGTERM; a checkpoint was saved first.
        TrainingDiverged: the loss became NaN/inf (the last checkpoint is kept).
    """
    run_dir, stored = open_run_dir(out, resume)  # reads only: every rank may do it
    config = resolve_config(config, stored)
    p = config.parallel
    # checks --sequence-parallel against the launch before any process group: one clear error
    mesh = init_mesh(p.sequence_parallel, resolve_device(config.run.device), timeout_s=p.dist_timeout, fsdp=p.fsdp)
    run = _build(config, run_dir, resumed=stored is not None, mesh=mesh, log=log if mesh.is_main else _quiet)
    if _has_work(config, run.start):
        result = _finish(run, _run_steps(run))
    else:  # a resume past --max-steps: nothing on disk changes
        result = _result(run, run.start)
    mesh.close()  # on errors the process exits and torchrun ends the others
    return result


# ------------------------------------------------------------------------------------ build
@dataclass
class _Run:
    """Everything :func:`_build` sets up; the step loop and :func:`_finish` only read it."""

    config: TrainConfig
    run_dir: Path
    resumed: bool
    """The run folder held a run (``--resume``)."""
    mesh: TrainMesh
    dtype: torch.dtype
    log: Callable[[str], None]
    family: ModelFamily
    tokenizer: Any
    trained: Parallelized
    """The model (``trained.model``: saved, evaluated) and what the steps call."""
    optimizer: torch.optim.Optimizer
    batches: TrainBatches
    val_batches: EvalBatches | None
    micro: int
    """Sequences per forward/backward (per rank under torchrun)."""
    schedule: dict[str, Any]
    """:func:`learning_rate` keyword arguments."""
    start: "_Progress"
    """Where the run starts: step 0, or the resumed checkpoint's figures."""

    @property
    def model(self) -> torch.nn.Module:
        return self.trained.model

    @property
    def step_tokens(self) -> int:
        return self.config.batch_size * self.config.seq_len


@dataclass
class _Progress:
    """What changes as the run goes: step, counters, latest losses, the last checkpoint."""

    step: int = 0
    tokens: int = 0
    elapsed: float = 0.0
    train_loss: float = math.nan
    val_loss: float | None = None
    saved_step: int = 0
    checkpoint: Path | None = None
    history: list[dict[str, Any]] = field(default_factory=list)


def _build(config: TrainConfig, run_dir: Path, *, resumed: bool, mesh: TrainMesh, log) -> _Run:
    """Data, model, optimizer and (when resuming) the checkpoint's state; writes ``run.json``."""
    family, device, seq_len = family_for(config), mesh.device, config.seq_len
    mesh.barrier()  # every rank has read the run folder before rank 0 writes to it
    dtype = resolve_dtype(config.run.dtype, device)
    # the pattern does not depend on the vocabulary: check the split before any data work
    check_pattern_split(family.model_config(config, config.data.vocab_size), seq_len, mesh.sp,
                        compile=config.parallel.compile)
    micro = local_micro_batch(config.batch_size, mesh.dp, seq_len // mesh.sp, config.optim.micro_batch,
                              MICRO_BATCH_TOKENS)
    prepared = _prepare_data(config, family, mesh)
    tokenizer = prepared.tokenizer
    model_config = family.model_config(config, tokenizer.vocab_size)

    ckpt_dir = resume_checkpoint(run_dir, log) if resumed else None  # a torn latest one: the previous
    torch.manual_seed(config.run.seed)
    model, trainer_ckpt = _load_or_init_model(family, model_config, ckpt_dir, config, tokenizer, device)
    model.to(device)
    model.train()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # float32 runs (--dtype float32) use TF32 matmuls
        torch.backends.cudnn.allow_tf32 = True
    num_parameters = model.num_parameters()
    mixed = dtype != torch.float32 and device.type == "cuda"  # FSDP: bf16 weights gathered, float32 reduce
    trained = parallelize(model, mesh, config.parallel, param_dtype=dtype if mixed else None)
    o = config.optim
    optimizer = build_optimizer(model, lr=o.lr, betas=(o.beta1, o.beta2), weight_decay=o.weight_decay,
                                fused=device.type == "cuda")
    start = _Progress(checkpoint=ckpt_dir)
    batches = TrainBatches(prepared.tokens("train"), seq_len, config.batch_size, config.run.seed)
    if trainer_ckpt is not None:
        start = _resume_state(trainer_ckpt, optimizer, batches, trained)
    writes = mesh.is_main and _has_work(config, start)  # a resume with nothing to do leaves the folder as it is
    if writes and trainer_ckpt is not None:
        publish_top_level(run_dir, ckpt_dir)
    if writes:
        write_run_file(run_dir, config, model_config=model_config.to_dict(), num_parameters=num_parameters,
                       data={"cache_entry": str(prepared.directory), "num_tokens": prepared.num_tokens,
                             "tokenizer_sha256": tokenizer.sha256()},
                       parallel={"world": mesh.world, "data_parallel": mesh.dp, "sequence_parallel": mesh.sp,
                                 **({"fsdp": config.parallel.fsdp_shard} if trained.sharded else {})})
    val_tokens = prepared.tokens("validation")
    val_batches = None
    if len(val_tokens) >= seq_len + 1:
        val_batches = EvalBatches(val_tokens, seq_len, max_sequences=max(1, config.eval.eval_tokens // seq_len))
    else:
        log(f"note: the validation split has {len(val_tokens):,} tokens, fewer than --seq-len "
            f"{seq_len} + 1: no validation loss")
    s = config.schedule
    schedule = dict(peak_lr=o.lr, warmup_steps=s.warmup_steps, decay_steps=s.decay_steps, decay=s.decay,
                    min_lr_ratio=s.min_lr_ratio)
    run = _Run(config=config, run_dir=run_dir, resumed=resumed, mesh=mesh, dtype=dtype, log=log, family=family,
               tokenizer=tokenizer, trained=trained, optimizer=optimizer, batches=batches, val_batches=val_batches,
               micro=micro, schedule=schedule, start=start)
    _log_start(run, prepared)
    return run


def _has_work(config: TrainConfig, start: _Progress) -> bool:
    """Whether steps remain before ``--max-steps``; without any, a (resumed) run writes nothing."""
    return start.step < config.schedule.max_steps


def _prepare_data(config: TrainConfig, family: ModelFamily, mesh: TrainMesh) -> PreparedData:
    """Token files and tokenizer (the model's own, or a BPE trained on the data): rank 0 first (it
    may train the tokenizer and fill the cache), then the others read its cache."""
    d = config.data
    prepared = None
    for main in (True, False):
        if mesh.is_main == main:
            prepared = prepare_data(d.data, d.cache_dir, d.vocab_size, tokenizer=family.tokenizer(config),
                                    progress=config.run.progress if main else False)
        if main:
            mesh.barrier()
    assert prepared is not None
    if prepared.num_tokens["train"] < config.seq_len + 1:
        raise ValueError(
            f"the training split of --data {d.data!r} has {prepared.num_tokens['train']:,} tokens, fewer "
            f"than --seq-len {config.seq_len} + 1; use a shorter --seq-len or more data")
    return prepared


def _load_or_init_model(family: ModelFamily, model_config: Any, ckpt_dir: Path | None, config: TrainConfig,
                        tokenizer: Any, device: torch.device) -> tuple[torch.nn.Module, TrainerCheckpoint | None]:
    """A new model of ``model_config``, or the checkpoint's model and trainer state (checked to fit)."""
    if ckpt_dir is None:
        return family.create(model_config), None
    model = family.load(ckpt_dir)
    saved, expected = model.config.to_dict(), model_config.to_dict()
    diff = [k for k in saved if k not in RUNTIME_FIELDS and saved[k] != expected.get(k)]
    if diff:
        k = diff[0]
        raise CheckpointError(f"{ckpt_dir}: checkpoint is of another model config ({k}={saved[k]!r}, this run "
                              f"needs {expected.get(k)!r}); use the run's own settings or a new --out")
    trainer_ckpt = load_trainer_checkpoint(ckpt_dir, device)
    if trainer_ckpt.state.get("tokenizer_sha256") != tokenizer.sha256():
        raise CheckpointError(f"{ckpt_dir}: checkpoint was trained with another tokenizer than the one "
                              f"--data {config.data.data!r} gives now; the data or its cache changed")
    return model, trainer_ckpt


def _resume_state(ckpt: TrainerCheckpoint, optimizer: torch.optim.Optimizer, batches: TrainBatches,
                  trained: Parallelized) -> _Progress:
    """Load the optimizer, RNG and data position of ``ckpt``; the progress it records.

    Whatever layout wrote the checkpoint (one process, DDP, FSDP2 shards on any number of ranks),
    its state is read into this run's layout (:meth:`Parallelized.load_state`)."""
    try:
        trained.load_state(optimizer, shards=ckpt.shards, optimizer_state=ckpt.optimizer)
    except (ValueError, KeyError, RuntimeError) as err:
        raise CheckpointError(f"{ckpt.path}: optimizer state does not fit the model ({err})") from err
    restore_rng_states(ckpt.rng)
    if "data" in ckpt.state:
        try:  # same windows as before the interruption: same sizes and the same token stream
            batches.load_state_dict(ckpt.state["data"])
        except (ValueError, KeyError) as err:
            raise CheckpointError(f"{ckpt.path}: cannot continue on this data ({err}); "
                                  "resume with the data the run started with, or start a new --out") from err
    # the figures of the checkpoint, until new steps replace them
    return _Progress(step=ckpt.step, tokens=int(ckpt.state.get("tokens", 0)),
                     elapsed=float(ckpt.state.get("elapsed_s", 0.0)),
                     train_loss=float(ckpt.state.get("train_loss") or math.nan),
                     val_loss=ckpt.state.get("val_loss"), saved_step=ckpt.step, checkpoint=ckpt.path)


def _log_start(run: _Run, prepared: PreparedData) -> None:
    c, mesh, log = run.config, run.mesh, run.log
    s = c.schedule
    log(f"run {run.run_dir}: {run.family.describe(run.model, c)}, {run.model.num_parameters():,} parameters, "
        f"vocab {run.tokenizer.vocab_size}, on {mesh.device} ({str(run.dtype)[6:]})")
    log(f"layout: {run.trained.describe(c.parallel.fsdp_shard)}; each rank runs {c.batch_size // mesh.dp} "
        f"sequence(s) x {c.seq_len // mesh.sp} tokens per step in {c.batch_size // mesh.dp // run.micro} "
        f"micro-batch(es) of {run.micro}")
    log(f"data {c.data.data!r}: " + ", ".join(f"{k} {v:,}" for k, v in prepared.num_tokens.items())
        + f" tokens; step = {c.batch_size} x {c.seq_len} tokens; lr {c.optim.lr:g}, warmup "
        f"{s.warmup_steps}, {s.decay} decay to step {s.decay_steps}")
    if run.start.step:
        log(f"resuming from {run.start.checkpoint} at step {run.start.step}")
    if run.start.step >= s.max_steps:
        log(f"nothing to do: the run is at step {run.start.step} >= --max-steps {s.max_steps}; the run folder "
            "is left as it is")


# -------------------------------------------------------------------------------- step loop
def _run_steps(run: _Run) -> _Progress:
    """Optimizer steps up to ``--max-steps``, evaluating and saving on schedule.

    Raises :class:`TrainingInterrupted` after saving when SIGINT/SIGTERM arrives (on any rank:
    every rank stops at the same step).
    """
    c, main = run.config, run.mesh.is_main
    max_steps = c.schedule.max_steps
    progress = dataclasses.replace(run.start, history=[])
    metrics = MetricsLog(run.run_dir, resume_step=progress.step if run.resumed else None) if main else None
    bar = tqdm(total=max_steps, initial=progress.step, unit="step", desc="train", dynamic_ncols=True,
               disable=(not main) or (None if c.run.progress is None else not c.run.progress), file=sys.stderr)
    try:
        with _StopFlag() as stop:
            while progress.step < max_steps and not run.mesh.any(stop.signum is not None):
                record = _one_step(run, progress)
                if metrics is not None:
                    metrics.log(record)
                bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}",
                                tok_s=f"{record['tokens_per_s']:,.0f}", refresh=False)
                bar.update(1)
                step = progress.step
                if run.val_batches is not None and (step % c.eval.eval_every == 0 or step == max_steps):
                    _evaluate(run, progress, metrics)
                if step % c.checkpoint.save_every == 0 or step == max_steps:
                    _save(run, progress)
            if progress.step < max_steps:  # a signal here or on another rank
                bar.close()
                if progress.step > progress.saved_step or progress.checkpoint is None:
                    _save(run, progress)
                if main:
                    plot_losses(run.run_dir)
                raise TrainingInterrupted(stop.signum or signal.SIGTERM, progress.step, run.run_dir)
    finally:
        bar.close()
        if metrics is not None:
            metrics.close()
    return progress


def _one_step(run: _Run, progress: _Progress) -> dict[str, Any]:
    """Run optimizer step ``progress.step``, advance ``progress``; the step's metrics record."""
    c, mesh = run.config, run.mesh
    t0 = time.perf_counter()
    lr = learning_rate(progress.step, **run.schedule)
    # this rank's rows and sequence chunk: (batch_size / dp, seq_len / sp)
    input_ids, labels = run.batches.get(progress.step, *mesh.columns(c.seq_len), rank=mesh.dp_rank, world=mesh.dp)
    loss, grad_norm = train_step(run.trained, run.optimizer, input_ids, labels, lr=lr, grad_clip=c.optim.grad_clip,
                                 micro=run.micro, dtype=run.dtype)
    progress.train_loss = loss
    progress.step += 1
    progress.tokens += run.step_tokens
    dt = time.perf_counter() - t0
    progress.elapsed += dt
    if not math.isfinite(loss):
        raise TrainingDiverged(
            f"the training loss is {loss} at step {progress.step}; lower --lr (now {c.optim.lr:g}) and resume "
            f"from the last checkpoint ({progress.checkpoint or 'none yet'}) with a new --out")
    record = {"kind": "train", "step": progress.step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
              "tokens": progress.tokens, "tokens_per_s": run.step_tokens / dt, "time": progress.elapsed}
    progress.history.append(record)
    return record


def _evaluate(run: _Run, progress: _Progress, metrics: MetricsLog | None) -> None:
    """Validation loss now (every rank takes part under torchrun); rank 0 logs and plots it.

    The line says which tokens it scored (``longnet eval --seq-len L --max-tokens N`` scores the
    same ones and gives the same figure). Raises :class:`TrainingDiverged` on a NaN/inf loss."""
    batches = run.val_batches
    try:
        val_loss, count = mean_loss(run.model, batches, run.mesh.device, run.dtype, mesh=run.mesh)
    except NonFiniteLoss as err:
        raise TrainingDiverged(f"at step {progress.step}, {err}; the last checkpoint is "
                               f"{progress.checkpoint or 'none yet'}") from err
    progress.val_loss = val_loss
    split = batches.tokens.name
    record = {"kind": "eval", "step": progress.step, "val_loss": val_loss,
              "val_perplexity": math.exp(min(val_loss, 700.0)), "val_tokens": count, "val_split": split,
              "val_seq_len": batches.seq_len, "tokens": progress.tokens}
    progress.history.append(record)
    if metrics is not None:
        metrics.log(record)
        tqdm.write(f"step {progress.step}: train loss {progress.train_loss:.4f}, validation loss {val_loss:.4f} "
                   f"(perplexity {record['val_perplexity']:.2f} on the first {count:,} tokens of the {split} split, "
                   f"windows of {batches.seq_len:,})", file=sys.stderr)
        plot_losses(run.run_dir)


def _save(run: _Run, progress: _Progress) -> None:
    """Checkpoint the current step (every rank waits until it is complete).

    Rank 0 stages the folder; under FSDP2 every rank writes its model and optimizer shards
    (``dcp/``) into it; rank 0 then writes the full weights (gathered from the shards, or the
    model's own), the optimizer state (when it is not in shards) and the rest, and publishes it."""
    trained, mesh = run.trained, run.mesh
    trained.check_in_sync()  # every replica took the same steps
    progress.saved_step = progress.step
    full = trained.full_state()  # under FSDP2 every rank takes part in the gather
    if mesh.is_main:
        stage_checkpoint(run.run_dir, progress.step)
    mesh.barrier()
    staged = staged_folder(run.run_dir, progress.step)
    in_shards = trained.write_shards(staged / SHARDS_DIR, run.optimizer)
    mesh.barrier()  # every shard is on disk before rank 0 completes the folder
    if mesh.is_main:
        state = {"tokens": progress.tokens, "elapsed_s": progress.elapsed,
                 "data": run.batches.state_dict() | {"step": progress.step},
                 "tokenizer_sha256": run.tokenizer.sha256(), "schedule": run.schedule,
                 "train_loss": progress.train_loss, "val_loss": progress.val_loss}
        progress.checkpoint = save_trainer_checkpoint(
            run.run_dir, step=progress.step, write_model=lambda folder: run.family.save(run.model, folder, full),
            write_tokenizer=run.tokenizer.save, optimizer_state=None if in_shards else run.optimizer.state_dict(),
            trainer_state=state, staged=staged)
    mesh.barrier()  # the checkpoint is complete before any rank moves on (or exits)
    if not mesh.is_main:
        progress.checkpoint = latest_checkpoint(run.run_dir)


# ----------------------------------------------------------------------------------- finish
def _finish(run: _Run, progress: _Progress) -> TrainResult:
    """The final checkpoint (unless the last step was saved), the loss plot and the closing line."""
    if progress.step > progress.saved_step or progress.checkpoint is None:
        _save(run, progress)
    else:
        run.trained.check_in_sync()
    png = plot_losses(run.run_dir) if run.mesh.is_main else None
    if run.mesh.is_main and png is None:
        run.log("note: matplotlib is not installed, so no loss plot; pip install matplotlib")
    run.log(f"done: step {progress.step}, {progress.tokens:,} tokens, train loss {progress.train_loss:.4f}"
            + (f", validation loss {progress.val_loss:.4f}" if progress.val_loss is not None else "")
            + f"; checkpoint {progress.checkpoint}" + (f"; plot {png}" if png else ""))
    return _result(run, progress)


def _result(run: _Run, progress: _Progress) -> TrainResult:
    """What :func:`train` returns for the run as ``progress`` leaves it."""
    return TrainResult(run_dir=run.run_dir, step=progress.step, tokens=progress.tokens,
                       train_loss=progress.train_loss, val_loss=progress.val_loss, checkpoint=progress.checkpoint,
                       history=progress.history)


def _quiet(message: str) -> None:
    """The log of ranks other than 0 under torchrun."""

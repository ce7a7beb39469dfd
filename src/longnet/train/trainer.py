"""The training loop of ``longnet train``: data, model, AdamW, schedule, checkpoints, metrics.

One optimizer step = ``batch_size = batch_tokens // seq_len`` sequences drawn by
``TrainBatches.get(step)`` (a pure function of seed and step), run as micro-batches whose
gradients accumulate (each micro-batch loss is divided by their number, so the step minimizes
the mean loss of the whole batch). Then the gradient norm is clipped, the learning rate of the
step is set from the schedule, and AdamW steps (:mod:`longnet.train.step`). On CPU the run is
deterministic: a run resumed from a checkpoint ends with the same weights, bit for bit, as one
that never stopped. Under torchrun the same loop runs on a data x sequence parallel mesh
(:mod:`longnet.train.distributed`) and matches one process up to float32 summation order.
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
from longnet.models import CheckpointError, LongNetConfig, LongNetLM
from longnet.train.checkpoint import (
    TrainerCheckpoint,
    latest_checkpoint,
    load_trainer_checkpoint,
    publish_top_level,
    restore_rng_states,
    resume_checkpoint,
    save_trainer_checkpoint,
)
from longnet.train.distributed import (
    Parallel,
    check_in_sync,
    check_pattern_split,
    local_device,
    local_micro_batch,
    parallel_mean_loss,
    setup_parallel,
    torchrun_world_size,
)
from longnet.train.evaluate import NonFiniteLoss, check_finite_loss, mean_loss
from longnet.train.metrics import MetricsLog, plot_losses
from longnet.train.optim import build_optimizer
from longnet.train.rundir import open_run_dir, write_run_file
from longnet.train.runtime import resolve_device, resolve_dtype
from longnet.train.schedule import learning_rate
from longnet.train.settings import MICRO_BATCH_TOKENS, TrainSettings
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


def build_config(settings: TrainSettings, vocab_size: int) -> LongNetConfig:
    """The model configuration of a run: preset + overrides, the tokenizer's vocabulary size,
    ``max_train_length = seq_len`` and the runtime flags (``--hf-model``: that model's config
    switched to dilated attention, :class:`~longnet.integrations.hf_train.HFRunConfig`)."""
    if settings.hf_model is not None:
        from longnet.integrations.hf_train import HFRunConfig

        return HFRunConfig.from_settings(settings)
    overrides = dict(settings.model_overrides)
    overrides.update(vocab_size=vocab_size, max_train_length=settings.seq_len,
                     grad_checkpointing=settings.grad_checkpointing)
    return LongNetConfig.from_preset(settings.preset, **overrides)


def _check_same_config(saved: LongNetConfig, expected: LongNetConfig, where: Path) -> None:
    a, b = saved.to_dict(), expected.to_dict()
    diff = [k for k in a if k not in RUNTIME_FIELDS and a[k] != b.get(k)]
    if diff:
        k = diff[0]
        raise CheckpointError(f"{where}: checkpoint is of another model config ({k}={a[k]!r}, this run "
                              f"needs {b.get(k)!r}); use the run's own settings or a new --out")


def train(settings_given: dict[str, Any], out: str | Path, resume: bool = False,
          log=print) -> TrainResult:
    """Train (or resume) the run in ``out``; see ``longnet train --help`` for the settings.

    Under torchrun (``WORLD_SIZE`` set) every process calls this: the processes form a data x
    sequence parallel mesh (``sequence_parallel`` ranks per sequence, see
    :mod:`longnet.train.distributed`) and rank 0 alone logs, writes metrics and checkpoints.

    The run has three steps: :func:`_build` (settings, data, model, optimizer, resumed state),
    :func:`_run_steps` (the optimizer steps, evaluations and periodic checkpoints) and
    :func:`_finish` (final checkpoint, plot, report). A resume at or past ``--max-steps`` has no
    steps to run and changes nothing on disk (not even ``run.json``).

    Args:
        settings_given: :class:`TrainSettings` fields given explicitly (None = not given).
        out: the run folder.
        resume: continue the run in ``out`` from its latest checkpoint.
        log: where one-line notes go (``print`` by default; rank 0 only under torchrun).

    Raises:
        ValueError (and :class:`CheckpointError`): bad settings, data, folder or checkpoint.
        TrainingInterrupted: SIGINT/SIGTERM; a checkpoint was saved first.
        TrainingDiverged: the loss became NaN/inf (the last checkpoint is kept).
    """
    run_dir, stored = open_run_dir(out, resume)  # reads only: every rank may do it
    settings = TrainSettings.resolve(settings_given, stored["settings"] if stored else None)
    device = resolve_device(settings.device)
    if torchrun_world_size() is not None:
        device = local_device(device)  # cuda means cuda:LOCAL_RANK
    # checks --sequence-parallel against the launch before any process group: one clear error
    parallel = setup_parallel(settings.sequence_parallel, device, timeout_s=settings.dist_timeout,
                              fsdp=settings.fsdp)
    if parallel is not None and not parallel.is_main:
        log = _quiet
    run = _build(settings, run_dir, resumed=stored is not None, device=device, parallel=parallel, log=log)
    if _has_work(run.settings, run.start):
        result = _finish(run, _run_steps(run))
    else:  # a resume past --max-steps: nothing on disk changes
        result = _result(run, run.start)
    if parallel is not None:  # on errors the process exits and torchrun ends the others
        parallel.close()
    return result


# ------------------------------------------------------------------------------------ build
@dataclass
class _Run:
    """Everything :func:`_build` sets up; the step loop and :func:`_finish` only read it."""

    settings: TrainSettings
    run_dir: Path
    resumed: bool
    """The run folder held a run (``--resume``)."""
    device: torch.device
    dtype: torch.dtype
    parallel: Parallel | None
    log: Callable[[str], None]
    tokenizer: Any
    model: LongNetLM
    """The model itself: saved, evaluated."""
    forward: Callable
    """What the steps call: the model, DDP-wrapped under torchrun, compiled with --compile."""
    optimizer: torch.optim.Optimizer
    params: list[torch.nn.Parameter]
    batches: TrainBatches
    val_batches: EvalBatches | None
    micro: int
    """Sequences per forward/backward (per rank under torchrun)."""
    schedule: dict[str, Any]
    """:func:`learning_rate` keyword arguments."""
    start: "_Progress"
    """Where the run starts: step 0, or the resumed checkpoint's figures."""

    @property
    def main(self) -> bool:
        return self.parallel is None or self.parallel.is_main

    @property
    def step_tokens(self) -> int:
        return self.settings.batch_size * self.settings.seq_len


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


def _build(settings: TrainSettings, run_dir: Path, *, resumed: bool, device: torch.device,
           parallel: Parallel | None, log) -> _Run:
    """Data, model, optimizer and (when resuming) the checkpoint's state; writes ``run.json``."""
    main = parallel is None or parallel.is_main
    if parallel is not None:
        parallel.barrier()  # every rank has read the run folder before rank 0 writes to it
    dtype = resolve_dtype(settings.dtype, device)
    sp, dp = (parallel.sp, parallel.dp) if parallel is not None else (1, 1)
    if settings.hf_model is not None and parallel is not None:
        raise ValueError("--hf-model trains on one process (not under torchrun) in this version")
    if settings.hf_model is None:  # the pattern does not depend on the vocabulary: check it before any data work
        check_pattern_split(build_config(settings, settings.vocab_size), settings.seq_len, sp, compile=settings.compile)
    if parallel is None:
        micro = settings.micro_batch_size
    else:
        micro = local_micro_batch(settings.batch_size, dp, settings.seq_len // sp, settings.micro_batch,
                                  MICRO_BATCH_TOKENS)
    prepared = _prepare_data(settings, parallel)
    tokenizer = prepared.tokenizer
    config = build_config(settings, tokenizer.vocab_size)

    ckpt_dir = resume_checkpoint(run_dir, log) if resumed else None  # a torn latest one: the previous
    torch.manual_seed(settings.seed)
    model, trainer_ckpt = _load_or_init_model(config, ckpt_dir, settings, tokenizer, device)
    model.to(device)
    model.train()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # float32 runs (--dtype float32) use TF32 matmuls
        torch.backends.cudnn.allow_tf32 = True
    num_parameters = model.num_parameters()
    # DDP over the data axis, or FSDP2 shards (bf16 compute on GPU): before the optimizer, which
    # must hold the sharded parameters
    mixed = dtype != torch.float32 and device.type == "cuda"  # FSDP: bf16 weights gathered, float32 reduce
    trained = (parallel.data_parallel(model, fsdp=settings.fsdp, param_dtype=dtype if mixed else None,
                                      fsdp_shard=settings.fsdp_shard)
               if parallel is not None else model)
    optimizer = build_optimizer(model, lr=settings.lr, betas=(settings.beta1, settings.beta2),
                                weight_decay=settings.weight_decay, fused=device.type == "cuda")
    start = _Progress(checkpoint=ckpt_dir)
    batches = TrainBatches(prepared.tokens("train"), settings.seq_len, settings.batch_size, settings.seed)
    if trainer_ckpt is not None:
        start = _resume_state(trainer_ckpt, optimizer, batches, model)
    writes = main and _has_work(settings, start)  # a resume with nothing to do leaves the folder as it is
    if writes and trainer_ckpt is not None:
        publish_top_level(run_dir, ckpt_dir)
    if writes:
        write_run_file(run_dir, settings.to_dict(), model_config=config.to_dict(),
                       num_parameters=num_parameters, data={
                           "cache_entry": str(prepared.directory), "num_tokens": prepared.num_tokens,
                           "tokenizer_sha256": tokenizer.sha256()},
                       **({"parallel": {"world": parallel.world, "data_parallel": dp, "sequence_parallel": sp,
                                        **({"fsdp": settings.fsdp_shard} if settings.fsdp else {})}}
                          if parallel is not None else {}))
    val_tokens = prepared.tokens("validation")
    val_batches = None
    if len(val_tokens) >= settings.seq_len + 1:
        val_batches = EvalBatches(val_tokens, settings.seq_len,
                                  max_sequences=max(1, settings.eval_tokens // settings.seq_len))
    else:
        log(f"note: the validation split has {len(val_tokens):,} tokens, fewer than --seq-len "
            f"{settings.seq_len} + 1: no validation loss")
    forward = torch.compile(trained) if settings.compile else trained
    schedule = dict(peak_lr=settings.lr, warmup_steps=settings.warmup_steps,
                    decay_steps=settings.decay_steps, decay=settings.decay,
                    min_lr_ratio=settings.min_lr_ratio)
    run = _Run(settings=settings, run_dir=run_dir, resumed=resumed, device=device, dtype=dtype, parallel=parallel,
               log=log, tokenizer=tokenizer, model=model, forward=forward, optimizer=optimizer,
               params=[p for g in optimizer.param_groups for p in g["params"]], batches=batches,
               val_batches=val_batches, micro=micro, schedule=schedule, start=start)
    _log_start(run, prepared)
    return run


def _has_work(settings: TrainSettings, start: _Progress) -> bool:
    """Whether steps remain before ``--max-steps``; without any, a (resumed) run writes nothing."""
    return start.step < settings.max_steps


def _prepare(settings: TrainSettings) -> PreparedData:
    tokenizer = None
    if settings.hf_model is not None:  # the model's own tokenizer
        from longnet.integrations.hf_train import load_hf_tokenizer, prepare_hf_config

        tokenizer = load_hf_tokenizer(settings.hf_model, prepare_hf_config(settings.hf_model, seq_len=settings.seq_len))
    prepared = prepare_data(settings.data, settings.cache_dir, settings.vocab_size, tokenizer=tokenizer,
                            progress=settings.progress)
    if prepared.num_tokens["train"] < settings.seq_len + 1:
        raise ValueError(
            f"the training split of --data {settings.data!r} has {prepared.num_tokens['train']:,} tokens, fewer "
            f"than --seq-len {settings.seq_len} + 1; use a shorter --seq-len or more data")
    return prepared


def _prepare_data(settings: TrainSettings, parallel: Parallel | None) -> PreparedData:
    """Token files and tokenizer: rank 0 first (it may train the tokenizer and fill the cache)."""
    if parallel is None:
        return _prepare(settings)
    prepared = _prepare(settings) if parallel.is_main else None
    parallel.barrier()
    if prepared is None:
        prepared = _prepare(dataclasses.replace(settings, progress=False))  # reads rank 0's cache
    return prepared


def _load_or_init_model(config: LongNetConfig, ckpt_dir: Path | None, settings: TrainSettings, tokenizer,
                        device: torch.device) -> tuple[LongNetLM, TrainerCheckpoint | None]:
    """A new model of ``config``, or the checkpoint's model and trainer state (checked to fit)."""
    model_class = LongNetLM
    if settings.hf_model is not None:
        from longnet.integrations.hf_train import HFCausalLM as model_class
    if ckpt_dir is None:
        return (LongNetLM(config) if settings.hf_model is None else model_class.from_run_config(config)), None
    model = model_class.from_pretrained(ckpt_dir)
    _check_same_config(model.config, config, ckpt_dir)
    model.config.grad_checkpointing = settings.grad_checkpointing
    trainer_ckpt = load_trainer_checkpoint(ckpt_dir, device)
    if trainer_ckpt.state.get("tokenizer_sha256") != tokenizer.sha256():
        raise CheckpointError(f"{ckpt_dir}: checkpoint was trained with another tokenizer than the one "
                              f"--data {settings.data!r} gives now; the data or its cache changed")
    return model, trainer_ckpt


def _resume_state(ckpt: TrainerCheckpoint, optimizer: torch.optim.Optimizer, batches: TrainBatches,
                  model: torch.nn.Module) -> _Progress:
    """Load the optimizer, RNG and data position of ``ckpt``; the progress it records.

    A sharded (FSDP) checkpoint's model and optimizer are read into this run's layout, whatever
    it is (:func:`longnet.parallel.fsdp.load_sharded` reshards)."""
    try:
        from longnet.parallel.fsdp import is_sharded, load_full_optimizer, load_sharded

        if ckpt.shards is not None:
            load_sharded(ckpt.shards, model, optimizer)
        elif is_sharded(model):  # a DDP or one-process checkpoint resumed with --fsdp
            load_full_optimizer(model, optimizer, ckpt.optimizer)
        else:
            optimizer.load_state_dict(ckpt.optimizer)
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
    s, parallel, log = run.settings, run.parallel, run.log
    dp = parallel.dp if parallel is not None else 1
    what = run.model.describe() if s.hf_model is not None else f"{s.preset} LongNet ({run.model.config.attention})"
    log(f"run {run.run_dir}: {what}, "
        f"{run.model.num_parameters():,} parameters, vocab {run.tokenizer.vocab_size}, on {run.device} "
        f"({str(run.dtype)[6:]})")
    if parallel is not None:
        log(f"torchrun: {parallel.world} processes = {dp} data parallel x {parallel.sp} sequence parallel; each "
            f"rank runs {s.batch_size // dp} sequence(s) x {s.seq_len // parallel.sp} tokens per step; "
            + ((f"FSDP2: parameters, gradients and AdamW states sharded over the {parallel.world} ranks"
                if s.fsdp_shard == "mesh" else
                f"FSDP2: parameters, gradients and AdamW states sharded over the {dp} data-parallel ranks, "
                f"replicated over the {parallel.sp} sequence-parallel ones")
               if s.fsdp else "DDP: every rank holds the whole model")
            + f"; {parallel.backend}, collective timeout {s.dist_timeout:g} s (a rank whose peer died exits "
            "non-zero within it)")
    log(f"data {s.data!r}: " + ", ".join(f"{k} {v:,}" for k, v in prepared.num_tokens.items())
        + f" tokens; step = {s.batch_size} x {s.seq_len} tokens ({s.batch_size // dp // run.micro} micro-batch(es) "
        f"of {run.micro}{' per rank' if parallel is not None else ''}); lr {s.lr:g}, warmup "
        f"{s.warmup_steps}, {s.decay} decay to step {s.decay_steps}")
    if run.start.step:
        log(f"resuming from {run.start.checkpoint} at step {run.start.step}")
    if run.start.step >= s.max_steps:
        log(f"nothing to do: the run is at step {run.start.step} >= --max-steps {s.max_steps}; the run folder "
            "is left as it is")


# -------------------------------------------------------------------------------- step loop
def _run_steps(run: _Run) -> _Progress:
    """Optimizer steps up to ``--max-steps``, evaluating and saving on schedule.

    Raises :class:`TrainingInterrupted` after saving when SIGINT/SIGTERM arrives (on any rank).
    """
    s = run.settings
    progress = dataclasses.replace(run.start, history=[])
    metrics = MetricsLog(run.run_dir, resume_step=progress.step if run.resumed else None) if run.main else None
    bar = tqdm(total=s.max_steps, initial=progress.step, unit="step", desc="train", dynamic_ncols=True,
               disable=(not run.main) or (None if s.progress is None else not s.progress), file=sys.stderr)
    try:
        with _StopFlag() as stop:
            while progress.step < s.max_steps and not _stopping(run, stop):
                record = _one_step(run, progress)
                if metrics is not None:
                    metrics.log(record)
                bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}",
                                tok_s=f"{record['tokens_per_s']:,.0f}", refresh=False)
                bar.update(1)
                step = progress.step
                if run.val_batches is not None and (step % s.eval_every == 0 or step == s.max_steps):
                    _evaluate(run, progress, metrics)
                if step % s.save_every == 0 or step == s.max_steps:
                    _save(run, progress)
            if stop.signum is not None or (run.parallel is not None and progress.step < s.max_steps):
                bar.close()
                if progress.step > progress.saved_step or progress.checkpoint is None:
                    _save(run, progress)
                if run.main:
                    plot_losses(run.run_dir)
                raise TrainingInterrupted(stop.signum or signal.SIGTERM, progress.step, run.run_dir)
    finally:
        bar.close()
        if metrics is not None:
            metrics.close()
    return progress


def _stopping(run: _Run, stop: _StopFlag) -> bool:
    if run.parallel is None:
        return stop.signum is not None
    return run.parallel.any(stop.signum is not None, run.device)  # every rank stops at the same step


def _one_step(run: _Run, progress: _Progress) -> dict[str, Any]:
    """Run optimizer step ``progress.step``, advance ``progress``; the step's metrics record."""
    s, parallel = run.settings, run.parallel
    t0 = time.perf_counter()
    lr = learning_rate(progress.step, **run.schedule)
    if parallel is None:
        input_ids, labels = run.batches.get(progress.step)  # (batch_size, seq_len) each
    else:  # this rank's rows and sequence chunk: (batch_size / dp, seq_len / sp)
        input_ids, labels = run.batches.get(progress.step, *parallel.columns(s.seq_len), rank=parallel.dp_rank,
                                            world=parallel.dp)
    loss, grad_norm = train_step(run.forward, run.params, run.optimizer, input_ids, labels, lr=lr,
                                 grad_clip=s.grad_clip, micro=run.micro, device=run.device, dtype=run.dtype,
                                 parallel=parallel)
    progress.train_loss = loss
    progress.step += 1
    progress.tokens += run.step_tokens
    dt = time.perf_counter() - t0
    progress.elapsed += dt
    if not math.isfinite(loss):
        raise TrainingDiverged(
            f"the training loss is {loss} at step {progress.step}; lower --lr (now {s.lr:g}) and resume "
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
        if run.parallel is None:
            val_loss, count = mean_loss(run.model, batches, run.device, run.dtype)
        else:
            val_loss, count = parallel_mean_loss(run.model, batches, run.device, run.dtype, run.parallel)
            check_finite_loss(val_loss, run.model, f"the {batches.tokens.name} split", run.dtype)
    except NonFiniteLoss as err:
        raise TrainingDiverged(f"at step {progress.step}, {err}; the last checkpoint is "
                               f"{progress.checkpoint or 'none yet'}") from err
    progress.val_loss = val_loss
    split = batches.tokens.name
    record = {"kind": "eval", "step": progress.step, "val_loss": val_loss,
              "val_perplexity": math.exp(min(val_loss, 700.0)), "val_tokens": count, "val_split": split,
              "val_seq_len": batches.seq_len, "tokens": progress.tokens}
    progress.history.append(record)
    if run.main:
        metrics.log(record)
        tqdm.write(f"step {progress.step}: train loss {progress.train_loss:.4f}, validation loss {val_loss:.4f} "
                   f"(perplexity {record['val_perplexity']:.2f} on the first {count:,} tokens of the {split} split, "
                   f"windows of {batches.seq_len:,})", file=sys.stderr)
        plot_losses(run.run_dir)


def _save(run: _Run, progress: _Progress) -> None:
    """Checkpoint the current step (rank 0 writes; every rank waits until it is complete).

    Under FSDP every rank first writes its model and optimizer shards (``dcp/``) into the staged
    folder, and rank 0 the full weights (``save_pretrained``, gathered) and the rest."""
    parallel = run.parallel
    if parallel is not None:
        check_in_sync(run.params, parallel)  # every replica took the same steps
    progress.saved_step = progress.step
    staged, write_model = None, run.model.save_pretrained
    if parallel is not None and parallel.fsdp is not None:
        staged, write_model = _save_shards(run, progress.step)
    if run.main:
        state = {"tokens": progress.tokens, "elapsed_s": progress.elapsed,
                 "data": run.batches.state_dict() | {"step": progress.step},
                 "tokenizer_sha256": run.tokenizer.sha256(), "schedule": run.schedule,
                 "train_loss": progress.train_loss, "val_loss": progress.val_loss}
        progress.checkpoint = save_trainer_checkpoint(
            run.run_dir, step=progress.step, write_model=write_model, write_tokenizer=run.tokenizer.save,
            optimizer_state=None if staged is not None else run.optimizer.state_dict(), trainer_state=state,
            staged=staged)
    if parallel is not None:
        parallel.barrier()  # the checkpoint is complete before any rank moves on (or exits)
        if not run.main:
            progress.checkpoint = latest_checkpoint(run.run_dir)


def _save_shards(run: _Run, step: int) -> tuple[Path, Callable[[Path], None]]:
    """FSDP: every rank writes its shards into the staged folder; ``(folder, rank 0's model writer)``."""
    from longnet.models.checkpoint import save_model
    from longnet.parallel.fsdp import full_model_state, save_sharded, unsharded_class
    from longnet.train.checkpoint import SHARDS_DIR, stage_checkpoint, staged_folder

    parallel, model = run.parallel, run.model
    full = full_model_state(model)  # all ranks gather, rank 0 keeps the full weights on CPU
    if run.main:
        stage_checkpoint(run.run_dir, step)
    parallel.barrier()
    staged = staged_folder(run.run_dir, step)
    save_sharded(staged / SHARDS_DIR, model, run.optimizer)
    parallel.barrier()  # every shard is on disk before rank 0 completes the folder

    class _Full:  # save_model reads state_dict(): the gathered weights
        def state_dict(self):
            return full

    def write_model(folder: Path) -> None:
        save_model(_Full(), folder, model_type=unsharded_class(model).__name__, config=model.config,
                   extra=model._extra(), tied=model.tied_keys)

    return staged, write_model


# ----------------------------------------------------------------------------------- finish
def _finish(run: _Run, progress: _Progress) -> TrainResult:
    """The final checkpoint (unless the last step was saved), the loss plot and the closing line."""
    if progress.step > progress.saved_step or progress.checkpoint is None:
        _save(run, progress)
    elif run.parallel is not None:
        check_in_sync(run.params, run.parallel)
    png = plot_losses(run.run_dir) if run.main else None
    if run.main and png is None:
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
